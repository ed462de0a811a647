"""Running a model block by block (see `sqonnx.streaming.blocks`): the samples, the values carried between blocks, and
the passes that calibrate, build, judge and write one block at a time.

A block is worked on as a model of its own: `extract_block` clones its nodes with the values that cross its
borders as inputs and outputs, and computes its deferred weights (rotations) then; the full model keeps
only the graph and memory-mapped or deferred weights. Each run of a sample through a block is fed the
sample's model inputs and the values the earlier blocks left for it (`Carry`), and leaves the values later
blocks read. A decode chain's steps also feed the block the key/value cache its own run before returned.

One pass (`pipeline.Pipeline.run_pass`) goes over the blocks once: calibrate the FP block on every sample (the first
pass only; later passes reuse the statistics), build each track's INT8 block (a config and the layers kept in
float), run the track's evaluation samples through it, write one track's block to the output, free the block.
`--alpha auto` judges its candidates as tracks of the first pass; `--keep-float-budget` runs a pass per trial.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from sqonnx.calibrators.carry import Carry, Key
from sqonnx.calibrators.channel_max import ROW_SAMPLES, ActivationStats, StatisticsSession, read_probes
from sqonnx.calibrators.data import LOGITS, CalibrationFeeds, DecodeChain
from sqonnx.calibrators.probes import Probe
from sqonnx.errors import SqonnxError
from sqonnx.graph.tensors import SHARED, release
from sqonnx.math.metrics import log_softmax
from sqonnx.passes.transposed import FOLDED_TENSOR
from sqonnx.pause import pause_point
from sqonnx.runtime.session import PREPACK_TOKENS, Session, cpu_runs, has_half_floats, open_session
from sqonnx.runtime.upcast import upcast_to_float32
from sqonnx.streaming.blocks import Block, Partition, block_initializers

logger = logging.getLogger(__name__)

# Carried values stay in memory up to this; beyond, in files in the scratch folder.
CARRY_MEMORY_BYTES = 512 << 20


@dataclass(frozen=True)
class Run:
    """One onnxruntime run: a prefill sample (step 0), or a step of a decode chain (prompt 0, tokens 1..)."""

    key: Key
    feeds: dict[str, np.ndarray]  # the model inputs of this run (a decode step's cache comes from the block)
    rows: bool  # calibration rows may be taken from it


@dataclass
class Sequence:
    """A sample: runs that follow each other through a block, the later ones fed the cache of the one before
    (`recurrent`: cache input -> the output that returns it one token longer)."""

    index: int
    counted: bool  # adds to the statistics (held-back samples only pass through)
    make_runs: Callable[[], Iterator[Run]]
    recurrent: dict[str, str] = field(default_factory=dict)

    def runs(self) -> Iterator[Run]:
        return self.make_runs()


class Samples:
    """The calibration samples (the last `held_out` of them only pass through, for judging whole models) and the
    decode chains (teacher-forced with the model's own greedy tokens, generated beforehand)."""

    def __init__(self, feeds: CalibrationFeeds, held_out: int, chains: list[DecodeChain], check: int = 0,
                 other: int = 0) -> None:
        self.feeds = feeds
        self.count = feeds.count
        self.held_out = held_out
        self.check = check  # samples the quality check compares (the held-back ones, else the last calibration ones)
        self.other = other  # the last samples: the quality check's second set (text unlike the calibration's)
        self.chains = chains
        self.calibration_count = self.count - held_out - other
        self.row_samples = min(ROW_SAMPLES, self.calibration_count)

    @classmethod
    def empty(cls) -> Samples:
        return cls(CalibrationFeeds(0, lambda: iter(()), ""), 0, [])

    def tokens(self, count: int) -> int:
        """Tokens in `count` samples (a sample's length: its widest model input), plus the decode steps."""
        first = next(iter(self.feeds), None)
        length = max((a.shape[-1] for a in first.values() if a.ndim), default=1) if first else 1
        return count * length + sum(chain.steps for chain in self.chains)

    @property
    def counted_keys(self) -> set[int]:
        """The samples and decode chains the statistics count (all but the held-back samples)."""
        return set(range(self.calibration_count)) | {self.count + i for i in range(len(self.chains))}

    @property
    def held_out_keys(self) -> list[int]:
        return list(range(self.calibration_count, self.count - self.other))

    @property
    def other_keys(self) -> list[int]:
        """The quality check's second set."""
        return list(range(self.count - self.other, self.count))

    @property
    def check_keys(self) -> list[int]:
        """What the quality check compares: the held-back samples, else (too few samples to keep any back) the
        last `check` calibration samples."""
        if self.held_out:
            return self.held_out_keys[-self.check:] if self.check else []
        return list(range(max(0, self.calibration_count - self.check), self.calibration_count))

    @property
    def total_runs(self) -> int:
        return self.count + sum(chain.steps + 1 for chain in self.chains)

    def sequences(self, only: set[int] | None = None) -> Iterator[Sequence]:
        """Every sample in order (or those with index in `only`), model inputs made afresh."""
        for index, feed in enumerate(iter(self.feeds)):
            if only is None or index in only:
                yield Sequence(index, index < self.calibration_count,
                               lambda index=index, feed=feed: iter([Run((index, 0), feed, True)]))
        for number, chain in enumerate(self.chains):
            index = self.count + number
            if only is None or index in only:
                yield Sequence(index, True, lambda index=index, chain=chain: _chain_runs(index, chain),
                               dict(chain.present))


def _chain_runs(index: int, chain: DecodeChain) -> Iterator[Run]:
    yield Run((index, 0), chain.prompt, False)
    for step in range(chain.steps):
        yield Run((index, step + 1), chain.step_feeds(step), False)


def extract_block(model: ir.Model, block: Block) -> ir.Model:
    """Block `block` of `model` as a model of its own (new nodes and values, the same tensors), with its
    deferred weights computed: what crosses into it are inputs, what later blocks or the model's outputs read
    are outputs."""
    graph = model.graph
    values: dict[str, ir.Value] = {str(v.name): v for v in graph.inputs}
    for node in block.nodes:
        for value in node.inputs:
            if value is not None:
                values.setdefault(str(value.name), value)
        for out in node.outputs:
            values[str(out.name)] = out
    initializers = {id(v): v for node in block.nodes for v in node.inputs if v is not None and v.is_initializer()}
    view = ir.GraphView([values[name] for name in block.inputs], [values[name] for name in block.outputs],
                        nodes=block.nodes, initializers=tuple(initializers.values()),
                        opset_imports=dict(graph.opset_imports), name=f"{graph.name or 'graph'}_block{block.index}")
    clone = view.clone()
    inside = {id(node) for node in block.nodes}
    for original in initializers.values():
        if any(id(use.node) not in inside for use in original.uses()) or original.is_graph_output():
            clone.initializers[str(original.name)].meta[SHARED] = True
    for value in clone.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.LazyTensor):
            value.const_value = ir.tensor(tensor.numpy(), name=value.name)
            if value.meta.get(FOLDED_TENSOR) is tensor:
                value.meta[FOLDED_TENSOR] = value.const_value
    part = ir.Model(clone, ir_version=model.ir_version, producer_name=model.producer_name,
                    producer_version=model.producer_version, domain=model.domain, model_version=model.model_version,
                    functions=list(model.functions.values()))
    part.metadata_props.update(model.metadata_props)
    return part


def release_block(model: ir.Model, block: Block) -> None:
    """Unmap the memory-mapped weights `block` read (their pages leave the process's resident memory)."""
    for value in block_initializers(block):
        release(value.const_value)


ROWS = 64  # positions per step of a comparison's sums (float64 temporaries of 64 x vocab)


@dataclass
class Comparison:
    """A model's first output against the FP model's, summed over evaluation samples: relative L2 error, and the
    quality loss (perplexity ratio - 1 for a language model with `logits` and `input_ids`, else 1 - cosine), also
    per sample (`sample_losses`), for the spread the quality check's noise is measured from."""

    squared_error: float = 0.0
    squared_reference: float = 0.0
    nll_reference: float = 0.0
    nll: float = 0.0
    kl: float = 0.0  # KL(FP || this model) of the next-token distributions, summed over positions
    tokens: int = 0
    cosines: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # per sample: mean NLL per token minus the FP model's (nats)
    language_model: bool = True
    agreed: int = 0  # positions whose most likely next token is the FP model's

    def add(self, name: str, reference: np.ndarray, output: np.ndarray, feeds: dict[str, np.ndarray]) -> None:
        """Sums in float64, taken ROWS positions at a time: a SmolLM2 window's logits are 100 MB in float32, and
        whole float64 copies and softmax temporaries of them were a gigabyte at the check's peak."""
        ids = feeds.get("input_ids")
        language = name == LOGITS and ids is not None and ids.shape[1] >= 2
        if not language:
            self.language_model = False
        ref2 = reference.reshape(-1, reference.shape[-1]) if reference.ndim > 1 else reference.reshape(1, -1)
        out2 = output.reshape(ref2.shape)
        dot = norm_a = norm_b = 0.0
        for start in range(0, len(ref2), ROWS):
            a = ref2[start:start + ROWS].astype(np.float64)
            b = out2[start:start + ROWS].astype(np.float64)
            self.squared_error += float(np.sum((b - a) ** 2))
            dot += float(np.sum(a * b))
            norm_a += float(np.sum(a * a))
            norm_b += float(np.sum(b * b))
        self.squared_reference += norm_a
        self.cosines.append(dot / max(np.sqrt(norm_a) * np.sqrt(norm_b), 1e-30))
        if not language:
            return
        assert ids is not None
        tokens = ids[0, 1:]
        gap = 0.0
        for start in range(0, len(tokens), ROWS):
            stop = min(start + ROWS, len(tokens))
            log_p = log_softmax(reference[0, start:stop].astype(np.float64))
            log_q = log_softmax(output[0, start:stop].astype(np.float64))
            picked = np.arange(stop - start), tokens[start:stop]
            nll_reference, nll = -float(log_p[picked].sum()), -float(log_q[picked].sum())
            self.nll_reference += nll_reference
            self.nll += nll
            gap += nll - nll_reference
            self.kl += float(np.sum(np.exp(log_p) * (log_p - log_q)))
            self.agreed += int(np.count_nonzero(log_p.argmax(axis=1) == log_q.argmax(axis=1)))
        self.gaps.append(gap / len(tokens))
        self.tokens += len(tokens)

    def merged(self, other: Comparison) -> Comparison:
        """Both sets of samples in one comparison."""
        if not other.cosines:
            return self
        if not self.cosines:
            return other
        return Comparison(self.squared_error + other.squared_error, self.squared_reference + other.squared_reference,
                          self.nll_reference + other.nll_reference, self.nll + other.nll, self.kl + other.kl,
                          self.tokens + other.tokens, self.cosines + other.cosines, self.gaps + other.gaps,
                          self.language_model and other.language_model, self.agreed + other.agreed)

    @property
    def output_error(self) -> float:
        return float(np.sqrt(self.squared_error / max(self.squared_reference, 1e-30)))

    @property
    def quality_loss(self) -> float:
        if self.language_model and self.tokens:
            return float(np.exp((self.nll - self.nll_reference) / self.tokens)) - 1.0
        return 1.0 - float(np.mean(self.cosines)) if self.cosines else 0.0

    @property
    def sample_losses(self) -> list[float]:
        """The quality loss of each sample alone (each run: a decode step is one), in the order they were added;
        with samples of one length their mean is `quality_loss` (to first order for the perplexity ratio)."""
        if self.language_model and self.tokens:
            return [float(np.expm1(gap)) for gap in self.gaps]
        return [1.0 - c for c in self.cosines]

    @property
    def top1_agreement(self) -> float:
        """The share of positions whose most likely next token is the FP model's."""
        return self.agreed / self.tokens if self.tokens else 0.0

    @property
    def mean_kl(self) -> float:
        """Mean KL divergence per position from the FP model's next-token distribution (nats): what the perplexity
        ratio measures on text the FP model predicts well, and also where it does not (random-token data, on which
        a wrecked model's perplexity can fall below the FP model's)."""
        return self.kl / self.tokens if self.tokens else 0.0


class BlockRunner:
    """Runs samples through one block's session, feeding each run the values carried in and keeping the
    values later blocks read."""

    def __init__(self, part: Partition, samples: Samples) -> None:
        self.part = part
        self.samples = samples
        readers_after: dict[int, set[str]] = {}
        for block in part.blocks:
            readers_after[block.index] = {name for later in part.blocks[block.index + 1:] for name in later.inputs}
        self.readers_after = readers_after
        self.last_reader = part.last_reader()

    def carried_out(self, block: Block) -> list[str]:
        return [name for name in block.outputs if name in self.readers_after[block.index]]

    def feeds(self, block: Block, run: Run, carry: Carry, state: dict[str, np.ndarray],
              recurrent: dict[str, str], prompt: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The inputs of one run of `block`: the run's model inputs, the values carried in, and at a decode step
        the key/value cache this block returned at the step before (`state`). A block that only reads the
        shape of another block's cache (optimum's mask arithmetic reads Shape(past_key_values.0.key) ahead of
        layer 0) gets an array of that shape: the prompt's length plus the tokens decoded so far."""
        step = run.key[1]
        feeds = {name: array for name, array in run.feeds.items() if not (step and name in recurrent)}
        for name in block.inputs:
            if name in recurrent and step:
                present = recurrent[name]
                if present in state:
                    feeds[name] = state[present]
                elif name in block.shape_only and prompt is not None and name in prompt:
                    feeds[name] = _cache_of_length(prompt[name], prompt, step)
                else:
                    raise SqonnxError(f"block {block.index} ({block.label}) reads the key/value cache '{name}' that "
                                      "another block writes; calibrate with --decode-steps 0, or a larger "
                                      "--block-size")
            elif name not in feeds and carry.has(run.key, name):
                feeds[name] = carry.get(run.key, name)
        return feeds

    def forward(self, block: Block, run_one: Callable[[Sequence, Run, dict[str, np.ndarray], list[str]],
                                                      dict[str, np.ndarray]],
                carry: Carry, only: set[int] | None = None, extra: Callable[[Sequence, Run], list[str]] | None = None,
                after_run: Callable[[Sequence, Run, dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
                drop: set[str] | frozenset[str] = frozenset(), keep: set[int] | frozenset[int] = frozenset(),
                ) -> None:
        """Every run of the samples (or those in `only`) through `block`, in order; `run_one(sequence, run, feeds,
        fetch)` runs one and returns the fetched outputs. The carried values go to `carry`; the inputs named in
        `drop` leave it once read, but those of the samples in `keep`."""
        out_names = self.carried_out(block)
        produced = set(block.outputs)
        for sequence in self.samples.sequences(only):
            state: dict[str, np.ndarray] = {}
            presents = [p for p in sequence.recurrent.values() if p in produced]
            prompt: dict[str, np.ndarray] | None = None
            for run in sequence.runs():
                prompt = run.feeds if prompt is None else prompt
                feeds = self.feeds(block, run, carry, state, sequence.recurrent, prompt)
                wanted = [*out_names, *presents, *(extra(sequence, run) if extra else [])]
                fetched = run_one(sequence, run, feeds, list(dict.fromkeys(wanted)))
                if sequence.index not in keep:
                    for name in drop:
                        carry.discard(run.key, name)
                for name in out_names:
                    carry.put(run.key, name, fetched[name])
                state = {name: fetched[name] for name in presents}
                if after_run is not None:
                    after_run(sequence, run, feeds, fetched)

    def finish_block(self, block: Block, carry: Carry) -> None:
        carry.drop({name for name, last in self.last_reader.items() if last <= block.index})


def _cache_of_length(empty: np.ndarray, prompt: dict[str, np.ndarray], step: int) -> np.ndarray:
    """A cache shaped like `empty` (the prompt's, of length 0 along its sequence axis) after the prompt and
    `step` - 1 decoded tokens (zeros: only its shape is read)."""
    axis = next((i for i, size in enumerate(empty.shape) if size == 0), len(empty.shape) - 2)
    shape = list(empty.shape)
    shape[axis] = prompt["input_ids"].shape[1] + step - 1
    return np.zeros(shape, empty.dtype)


def calibrate_block(runner: BlockRunner, block: Block, model: ir.Model, activations: dict[str, int],
                    probes: list[Probe], keep_rows: int, carry: Carry, references: set[int],
                    reference_carry: Carry, tick: Callable[[], None], stream: Carry | None = None,
                    gram: bool = False, providers: list[str | tuple[str, dict[str, str]]] | None = None
                    ) -> ActivationStats:
    """Statistics of `block` (its FP model) over the counted samples, and the carried values for the next blocks
    from every sample. The FP model's first output is kept (in `reference_carry`) for the samples in
    `references`, which (with the held-back samples) run in a plain session of their own, so that the
    statistics session need not compute that output for every sample.

    `stream`: where the counted samples' values come from (--sequential: what the INT8 blocks before computed;
    the caller replaces them once this block is built), while `carry` keeps the FP values of the references,
    which then run in the plain session at every block. Without it, a counted sample's inputs that no later
    block reads are dropped as soon as this block has read them: the carried values hold one border, not two
    (a Llama-2-7B border of 128 x 512 tokens is 1 GB)."""
    samples = runner.samples
    what = f"block {block.index} ({block.label})"
    if has_half_floats(model):
        model = upcast_to_float32(model)  # once for the sessions below
    produced = set(block.outputs)
    presents = sorted({p for chain in samples.chains for p in chain.present.values()} & produced)
    carried = runner.carried_out(block)
    counted = {s.index for s in samples.sequences() if s.counted} if activations else set()
    counted_carry = carry if stream is None else stream
    stats = ActivationStats({})
    if probes and counted:  # read on the first sample, before its inputs are dropped
        first = next(runner.samples.sequences({min(counted)}))
        run = next(first.runs())
        stats.maps.update(read_probes(model, probes, runner.feeds(block, run, counted_carry, {}, {}), what))
    dying = {name for name in block.inputs if runner.last_reader.get(name) == block.index}
    first_output = reference_output(runner.part)
    wanted = references if first_output in produced else set()
    every = {s.index for s in samples.sequences()}
    passing = {s.index for s in samples.sequences() if s.counted} - counted  # no statistics here: they pass through
    held = set()  # held-back samples run in the statistics session, counted nowhere
    if counted:  # a block without linear layers has no statistics: its samples only pass through (below)
        session = StatisticsSession(model, activations, keep_rows=keep_rows, row_samples=samples.row_samples,
                                    outputs=[*carried, *presents], what=what,
                                    prepack=samples.tokens(len(counted)) >= PREPACK_TOKENS, gram=gram,
                                    providers=providers)

        def run_counted(sequence: Sequence, run: Run, feeds: dict[str, np.ndarray],
                        fetch: list[str]) -> dict[str, np.ndarray]:
            where = f"calibration sample {sequence.index}" + (
                f" (decode step {run.key[1]}; --decode-steps 0 calibrates prefill only)" if sequence.recurrent
                else "")
            fetched = session.run(feeds, sample=sequence.index, rows=run.rows, fetch=fetch, where=where)
            tick()
            if sequence.index == 0 and run.key[1] == 0:
                pause_point("calibration")
            return fetched

        runner.forward(block, run_counted, counted_carry, only=counted, drop=dying if stream is None else set(),
                       keep=references)
        if stream is None and not wanted and (carried or presents):
            # the held-back samples (the quality check's) only carry values on here: no plain session for them
            held = every - counted - passing

            def run_held(sequence: Sequence, run: Run, feeds: dict[str, np.ndarray],
                         fetch: list[str]) -> dict[str, np.ndarray]:
                fetched = session.passthrough(feeds, fetch, f"calibration sample {sequence.index}")
                tick()
                return fetched

            runner.forward(block, run_held, carry, only=held)
        maps = stats.maps
        stats = session.statistics()
        stats.maps.update(maps)
        session.close()
    plain_keys = (every - counted - passing - held) | wanted | (references if stream is not None else set())
    if not (carried or presents or wanted):
        plain_keys = passing = set()  # nothing later reads what this block makes
    if plain_keys or passing:
        outputs = [*carried, *presents, *([first_output] if wanted else [])]
        plain = open_session(_pruned(model, outputs), what=what,
                             prepack=samples.tokens(len(plain_keys | passing)) >= PREPACK_TOKENS)

        def run_plain(sequence: Sequence, run: Run, feeds: dict[str, np.ndarray],
                      fetch: list[str]) -> dict[str, np.ndarray]:
            fetch = [*fetch, first_output] if sequence.index in wanted and run.key[1] == 0 else fetch
            fetched = dict(zip(fetch, plain.run(fetch, feeds, f"calibration sample {sequence.index}"), strict=True))
            if first_output in fetch:
                reference_carry.put(run.key, first_output, fetched[first_output])
            tick()
            return fetched

        runner.forward(block, run_plain, carry, only=plain_keys | (passing if stream is None else set()))
        if stream is not None and passing:
            runner.forward(block, run_plain, stream, only=passing)
    return stats


def _pruned(model: ir.Model, outputs: list[str]) -> ir.Model:
    """A copy of `model` that computes only `outputs` (onnxruntime runs every node of a session)."""
    clone = model.clone()
    values = {str(v.name): v for node in clone.graph for v in node.outputs}
    values.update({str(v.name): v for v in clone.graph.inputs})
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(values[name] for name in dict.fromkeys(outputs))
    common_passes.RemoveUnusedNodesPass()(clone)
    return clone


def reference_output(part: Partition) -> str:
    """The output models are compared on: the model's first output (`logits` for a language model)."""
    return part.graph_outputs[0]


def run_track_block(runner: BlockRunner, block: Block, session: Session, carry: Carry, keys: set[int],
                    reference_carry: Carry, comparison: Callable[[int], Comparison], timed: dict[str, float]) -> None:
    """The evaluation samples `keys` through a track's INT8 block; at the block that makes the first output,
    compare it with the FP model's, in `comparison(sample)`. `timed['seconds']` adds the run time of the first."""
    first_output = reference_output(runner.part)
    produces = first_output in block.outputs
    first = min(keys) if keys else -1

    def run_one(sequence: Sequence, run: Run, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        fetch = [*fetch, first_output] if produces and first_output not in fetch else fetch
        start = time.perf_counter()
        results = session.run(fetch, feeds, f"evaluation sample {sequence.index}")
        if sequence.index == first:
            timed["seconds"] = timed.get("seconds", 0.0) + time.perf_counter() - start
        fetched = dict(zip(fetch, results, strict=True))
        if produces:
            comparison(sequence.index).add(first_output, reference_carry.get(run.key, first_output),
                                           fetched[first_output], feeds)
        return fetched

    runner.forward(block, run_one, carry, only=keys)


def forward_block(runner: BlockRunner, block: Block, session: Session, carry: Carry, keys: set[int],
                  tick: Callable[[], None]) -> None:
    """The samples `keys` through `block` in `session`, leaving what later blocks read in `carry` (replacing the
    values there): --sequential feeds the next block the INT8 block's outputs."""

    def run_one(sequence: Sequence, run: Run, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        results = session.run(fetch, feeds, f"calibration sample {sequence.index}")
        tick()
        return dict(zip(fetch, results, strict=True))

    runner.forward(block, run_one, carry, only=keys)


def time_fp_block(runner: BlockRunner, block: Block, model: ir.Model, carry: Carry, key: int,
                  timed: dict[str, float]) -> None:
    """The FP block's run time on sample `key` (plain session, no statistics): the speed reference (a bfloat16 block's
    upcast, as the quantized blocks are timed: onnxruntime's CPU has no bfloat16 kernels)."""
    session = open_session(model, float32=not cpu_runs(model), what=f"block {block.index}")
    scratch = Carry(carry.folder / "timing", CARRY_MEMORY_BYTES)

    def run_one(sequence: Sequence, run: Run, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        results = session.run(fetch or session.output_names[:1], feeds, f"sample {sequence.index}")
        timed["seconds"] = timed.get("seconds", 0.0) + time.perf_counter() - start
        return dict(zip(fetch, results, strict=False))

    source = _ReadOnly(carry, scratch)
    runner.forward(block, run_one, source, only={key})  # type: ignore[arg-type]
    scratch.clear()


class _ReadOnly:
    """Reads from one carry, writes to another (a timing run must not replace the calibration's values)."""

    def __init__(self, source: Carry, sink: Carry) -> None:
        self.source, self.sink = source, sink

    def has(self, key: Key, name: str) -> bool:
        return self.source.has(key, name)

    def get(self, key: Key, name: str) -> np.ndarray:
        return self.source.get(key, name)

    def put(self, key: Key, name: str, array: np.ndarray) -> None:
        self.sink.put(key, name, array)
