"""Calibration feeds: token windows from text (files, a folder, or Python's own pydoc topics), or an .npz; then the
quality check's second set (`CalibrationFeeds.other`: --eval-data, or the model's own text).

Text is tokenized with the tokenizer.json that optimum saves beside the model. The built-in text is
`pydoc_data.topics`, which every CPython ships: topics are split deterministically into a calibration
part and a held-out evaluation part, so quality is never measured on the calibration text. A decoder that can
write (see `Sampling`) may have a share of its windows filled with its own sampled text (--own-text), and its check
measures it on its own text from other seed words as well: pydoc is one register, and numbers on it flatter.

A decoder with a key/value cache (an optimum with-past export, an onnxruntime-genai model) is calibrated as
a prefill: its past_key_values inputs are empty, [1, kv_heads, 0, head_size]. When the graph leaves a size
symbolic (genai writes [batch_size, 3, past_sequence_length, kv_cache_dim]), it comes from the configuration
beside the model: genai_config.json (`model.decoder.num_key_value_heads`, `head_size`), else config.json
(`num_key_value_heads`, `head_dim` or hidden_size / num_attention_heads).

With text data such a decoder is also calibrated the way it runs in use, one token at a time: after the
prefill windows, a few decode chains (a prompt, then `decode_steps` single tokens in all, each fed the cache
the previous run returned). See `DecodeChain`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sqonnx.config import CalibrationConfig
from sqonnx.errors import SqonnxError
from sqonnx.graph.match import NoMatch

logger = logging.getLogger(__name__)

EVAL_EVERY = 5  # every 5th pydoc topic (sorted by name) is held out for evaluation

# (a bfloat16 input is fed float32: onnxruntime's CPU has no bfloat16 kernels, and runs such models upcast)
_NUMPY_OF = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.FLOAT: np.float32,
             ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: np.float32}
CACHE_PREFIXES = ("past_key_values", "past_key", "past_value")
DECODE_CHAINS = 4  # decode steps are split among (at least) this many prompts
LOGITS = "logits"


def pydoc_text(split: str) -> str:
    """The calibration ("calibration") or held-out ("evaluation") part of Python's pydoc topics."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held_out = split == "evaluation"
    return "\n\n".join(topics[k] for i, k in enumerate(keys) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out)


def load_tokenizer(model_dir: Path):  # -> tokenizers.Tokenizer
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise SqonnxError(f"no tokenizer.json beside the model in {model_dir}; export with optimum "
                          "(it saves one) or pass --calib-data as an .npz of input feeds")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    # transformers saves its padding/truncation settings in tokenizer.json (MiniLM: pad and cut at 128),
    # which would cut the whole calibration text to one window.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:  # noqa: ANN001 (tokenizers.Tokenizer)
    """The tokens the model's tokenizer puts before and after a text: BERT [CLS] .. [SEP], Llama <s> ...

    Calibration windows carry them so the model sees what it sees in use (BERT's special tokens
    have activation patterns of their own that static ranges must cover).
    """
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def token_windows(token_ids: list[int], num_samples: int, seq_len: int,
                  prefix: list[int] | None = None, suffix: list[int] | None = None,
                  what: str = "calibration text") -> np.ndarray:
    """`num_samples` windows of `seq_len` tokens (special tokens included) at evenly spaced offsets of the
    text, overlapping if the text is short."""
    prefix, suffix = prefix or [], suffix or []
    body = seq_len - len(prefix) - len(suffix)
    if body < 1 or len(token_ids) < body:
        raise SqonnxError(f"{what} has {len(token_ids)} tokens, too few for --seq-len {seq_len}; "
                          "give more text or a smaller --seq-len")
    ids = np.asarray(token_ids, dtype=np.int64)
    offsets = np.linspace(0, len(ids) - body, num_samples).astype(np.int64)
    return np.stack([np.concatenate([prefix, ids[o:o + body], suffix]).astype(np.int64) for o in offsets])


def feeds_for_tokens(inputs: list[ir.Value], tokens: np.ndarray,
                     cache_dims: CacheDims | None = None) -> dict[str, np.ndarray]:
    """Feeds for one [seq] window, for the inputs a transformer export has; `cache_dims`: the key/value
    cache's heads and head size where the graph leaves them symbolic (see `cache_dims`)."""
    seq = tokens.shape[0]
    feeds: dict[str, np.ndarray] = {}
    for value in inputs:
        name = str(value.name)
        dtype = _NUMPY_OF.get(value.dtype, np.int64) if value.dtype is not None else np.int64
        if name == "input_ids":
            array = tokens
        elif name == "attention_mask":
            array = np.ones(seq, dtype=np.int64)
        elif name == "position_ids":
            array = np.arange(seq, dtype=np.int64)
        elif name == "token_type_ids":
            array = np.zeros(seq, dtype=np.int64)
        elif name.startswith(CACHE_PREFIXES) and (shape := _empty_cache_shape(value, cache_dims)) is not None:
            # A with-past export run as a prefill: the key/value cache is empty (length 0).
            feeds[name] = np.zeros(shape, dtype=dtype)
            continue
        else:
            hint = ("; its heads or head size are symbolic and no genai_config.json or config.json beside the "
                    "model states them" if name.startswith(CACHE_PREFIXES) else "")
            raise SqonnxError(f"model input '{name}' cannot be filled from text{hint}; "
                              "pass --calib-data as an .npz with one array per model input")
        feeds[name] = array[None, :].astype(dtype)
    return feeds


def _empty_cache_shape(value: ir.Value, fallback: CacheDims | None) -> tuple[int, int, int, int] | None:
    """[1, kv_heads, 0, head_size] for a cache input: the model's fixed dimensions, else `fallback`'s."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    fixed_heads, fixed_size = shape[1], shape[3]
    heads = fixed_heads if isinstance(fixed_heads, int) else fallback.kv_heads if fallback is not None else None
    head_size = fixed_size if isinstance(fixed_size, int) else fallback.head_size if fallback is not None else None
    if heads is None or head_size is None:
        return None
    return (1, heads, 0, head_size)


@dataclass(frozen=True)
class CacheDims:
    """The key/value cache's heads and head size, as the configuration beside a model states them."""

    kv_heads: int
    head_size: int


def cache_dims(model_dir: Path) -> CacheDims | None:
    """From genai_config.json (onnxruntime-genai's model builder writes it), else config.json (transformers,
    optimum); None when neither states them. A file that cannot be read counts as absent: the model's own
    fixed dimensions may still do, and an input left unfilled is an error that names it."""
    genai = _read_json(model_dir / "genai_config.json")
    decoder = genai.get("model", {}).get("decoder", {}) if isinstance(genai.get("model"), dict) else {}
    if isinstance(decoder, dict):
        found = _dims(decoder.get("num_key_value_heads") or decoder.get("num_attention_heads"),
                      decoder.get("head_size"))
        if found is not None:
            return found
    layout = head_layout(model_dir)
    return CacheDims(layout.kv_heads, layout.head_dim) if isinstance(layout, HeadLayout) else None


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads as config.json states them."""

    heads: int
    kv_heads: int
    head_dim: int


def head_layout(model_dir: Path | None) -> HeadLayout | NoMatch | None:
    """The layout from `model_dir/config.json` (transformers' names, a multimodal model's text_config); None
    without one, a reason when it is unclear. The one reading of config.json's heads: the cache's dimensions
    (`cache_dims`) and the rotation's value heads (passes/rotate.py, R2) both come from it."""
    path = model_dir / "config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return NoMatch(f"{path} cannot be read ({exc})")
    config = config if isinstance(config, dict) else {}
    config = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        return NoMatch(f"{path} has no num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size", 0)
    head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) else 0)
    if not isinstance(kv_heads, int) or kv_heads <= 0 or not isinstance(head_dim, int) or head_dim <= 0 \
            or heads % kv_heads:
        return NoMatch(f"{path} states no usable head layout (heads {heads}, kv heads {kv_heads}, "
                       f"head_dim {head_dim})")
    return HeadLayout(heads, kv_heads, head_dim)


def _dims(kv_heads: object, head_size: object) -> CacheDims | None:
    if isinstance(kv_heads, int) and isinstance(head_size, int) and kv_heads > 0 and head_size > 0:
        return CacheDims(kv_heads, head_size)
    return None


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


@dataclass(frozen=True)
class DecodeChain:
    """A prompt, then `steps` single tokens through the key/value cache, as a with-past decoder runs in use.

    Each step's feeds come from the previous run's outputs, so the calibrator drives the chain: it runs
    `prompt`, then `next_feeds` of each run's `fetch` outputs. The next token is the model's own greedy
    choice: free-running tokens are the one thing a prefill over text cannot show (fed the text's own next
    tokens, `forced`, a decode computes the same per-token activations as a prefill of those tokens).
    Memory stays flat: one cache at a time.
    """

    prompt: dict[str, np.ndarray]  # prefill feeds, empty cache
    steps: int
    present: dict[str, str]  # cache input -> the output that returns it one token longer
    forced: np.ndarray | None = None  # tokens to feed instead of the model's choice (teacher forcing)

    @property
    def fetch(self) -> list[str]:
        return [*self.present.values(), *([LOGITS] if self.forced is None else [])]

    def with_tokens(self, tokens: np.ndarray) -> DecodeChain:
        """The same chain, teacher-forced with `tokens` (generated beforehand by the model itself)."""
        return DecodeChain(self.prompt, self.steps, self.present, np.asarray(tokens, np.int64))

    def step_feeds(self, step: int) -> dict[str, np.ndarray]:
        """Model inputs of single-token step `step` (from 0) of a teacher-forced chain, without the cache (the
        caller feeds the cache the run before returned)."""
        assert self.forced is not None
        return step_feeds(self.prompt, self.forced[step:step + 1], step)

    def next_feeds(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                   step: int) -> dict[str, np.ndarray]:
        """Feeds of single-token step `step` (from 0), after a run on `feeds` (the chain's, from its prompt) returned
        `outputs`: the cache it returned, and `step_feeds`'s inputs."""
        token = self.forced[step] if self.forced is not None else outputs[LOGITS][0, -1].argmax()
        following = {name: outputs[present] for name, present in self.present.items()}
        return following | step_feeds(self.prompt, np.asarray([token]), step)


def step_feeds(prompt: dict[str, np.ndarray], tokens: np.ndarray, step: int) -> dict[str, np.ndarray]:
    """Model inputs of single-token step `step` (from 0) after `prompt` (rows of one length), each row fed its token
    of `tokens` [rows]; without the cache (the caller feeds the one the run before returned)."""
    rows, length = prompt["input_ids"].shape
    feeds: dict[str, np.ndarray] = {}
    for name, array in prompt.items():
        if name == "input_ids":
            feeds[name] = np.asarray(tokens, array.dtype).reshape(rows, 1)
        elif name == "attention_mask":  # covers past and new tokens (optimum and genai alike)
            feeds[name] = np.ones((rows, length + step + 1), array.dtype)
        elif name == "position_ids":
            feeds[name] = np.full((rows, 1), length + step, array.dtype)
        elif name == "token_type_ids":
            feeds[name] = array[:, -1:]
    return feeds


def cache_outputs(inputs: list[ir.Value]) -> dict[str, str]:
    """Each cache input and the output that returns it one token longer (optimum and onnxruntime-genai name
    them past_key_values.N.key / present.N.key)."""
    return {str(v.name): str(v.name).replace("past_key_values", "present")
            for v in inputs if str(v.name).startswith(CACHE_PREFIXES)}


def decode_chains(inputs: list[ir.Value], outputs: list[ir.Value], windows: np.ndarray, steps: int,
                  dims: CacheDims | None, teacher_forced: bool = False) -> list[DecodeChain]:
    """`steps` single tokens in all, split among DECODE_CHAINS (or more) windows, each after the first
    half of its window as the prompt; none for a model without a cache, or without the present outputs
    to feed back.

    A chain stays within one window's length (positions the prefill already uses). Prompts come from the
    first three quarters of the windows: --alpha auto judges models on up to a quarter held back at the end.
    `teacher_forced` feeds each window's own next tokens (tests: the same maxima as a prefill of them).
    """
    present = cache_outputs(inputs)
    if steps == 0 or not present:
        return []
    returned = {str(v.name) for v in outputs}
    missing = [name for name in [*present.values(), *([] if teacher_forced else [LOGITS])] if name not in returned]
    if missing:
        logger.info("calibrating prefill only: no output '%s' to decode from", missing[0])
        return []
    prompt = windows.shape[1] // 2
    room = windows.shape[1] - prompt
    usable = windows[:len(windows) - len(windows) // 4]
    count = min(len(usable), steps, max(DECODE_CHAINS, -(-steps // room)))
    picked = usable[np.linspace(0, len(usable) - 1, count).astype(np.int64)]
    split = [min(room, steps // count + (i < steps % count)) for i in range(count)]
    return [DecodeChain(feeds_for_tokens(inputs, window[:prompt], dims), n, present,
                        window[prompt:prompt + n] if teacher_forced else None)
            for window, n in zip(picked, split, strict=True)]


# The default calibration text of a language model that can write its own (a key/value cache, `logits`, small
# enough to generate in memory: sqonnx.run.front): pydoc, and a share of the windows (CalibrationConfig.own_text,
# every round(1 / share)-th window) sampled by the FP model itself, SAMPLED_LENGTH tokens a sequence from one word of
# SEED_WORDS at temperature 1 (what the model writes when free: prose, lists, code, chat), packed to the window
# length. pydoc alone is one register (Python's reference manual); the model's own text is the broadest text there is
# for it, and costs a decode step a token (batched: sqonnx.streaming.generate), which is why it is a share.
SAMPLED_LENGTH = 128
TEMPERATURE = 1.0
SEED_WORDS = ("The", "In", "A", "When", "It", "This", "We", "If", "As", "There", "One", "After", "For", "I", "How",
              "Many")
# The quality check's second set, when no --eval-data is given: the model's own text from other words and another
# seed, which the statistics never see (the alpha search, the LM head's verdict and --keep-float-budget judge on it
# as well: what they choose should hold on text unlike the calibration's).
CHECK_SEED_WORDS = ("She", "Our", "Today", "Why", "Every", "Some", "My", "Before")
CALIBRATION_SEED, CHECK_SEED = 0, 1


@dataclass(frozen=True)
class Sampling:
    """Text the FP model is to write (sqonnx.streaming.generate.sample_text): `prompts` (model inputs of one word
    each after the tokenizer's opening tokens, an empty cache) continued to `length` tokens at `temperature`,
    seeded; `fill` packs them into the feeds' windows (CalibrationFeeds.with_sampled)."""

    prompts: list[dict[str, np.ndarray]]
    present: dict[str, str]  # cache input -> the output that returns it one token longer
    length: int
    temperature: float
    rows: list[int]  # the windows the sequences fill, len(prompts) // len(rows) sequences each, in order
    # prompts[:calibration] are the calibration's (seeded CALIBRATION_SEED), the rest the check's (CHECK_SEED): the
    # check's text is the same whatever --num-samples or --own-text
    calibration: int = 0

    @property
    def groups(self) -> list[tuple[list[dict[str, np.ndarray]], int]]:
        """The prompts, each group with its seed."""
        return [(part, seed) for part, seed in ((self.prompts[:self.calibration], CALIBRATION_SEED),
                                                (self.prompts[self.calibration:], CHECK_SEED)) if part]


@dataclass
class CalibrationFeeds:
    """A re-iterable, countable source of feeds; samples are made one at a time. `decode`: decode chains
    to calibrate after the samples, kept apart from them (--alpha auto selects among the last samples).
    `sampling`: windows the FP model writes before anything runs (`with_sampled` fills them). `other`: the last
    `other` samples are the quality check's second set, never counted (`other_description` says what they are)."""

    count: int
    _make: object  # Callable[[], Iterator[dict[str, np.ndarray]]]
    description: str
    decode: list[DecodeChain] = field(default_factory=list)
    sampling: Sampling | None = None
    other: int = 0
    other_description: str = ""
    windows: np.ndarray | None = None  # the token windows of text feeds (`_make` feeds them)
    _feeds_of: object = None  # Callable[[np.ndarray], dict[str, np.ndarray]]: one window's feeds

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._make()  # type: ignore[operator]

    def with_sampled(self, tokens: np.ndarray) -> CalibrationFeeds:
        """These feeds with the sampled windows filled from `tokens` [sequences, length] (sample_text's)."""
        assert self.sampling is not None and self.windows is not None
        windows = self.windows.copy()
        rows = self.sampling.rows
        per_window = len(tokens) // len(rows)
        for number, row in enumerate(rows):
            windows[row] = tokens[number * per_window:(number + 1) * per_window].reshape(-1)[:windows.shape[1]]
        feeds_of, make, count = self._feeds_of, self._make, len(windows)
        # an .npz second set follows the windows (_with_other): kept after them
        return replace(self, _make=lambda: itertools.chain(  # type: ignore[misc]
            (feeds_of(w) for w in windows), itertools.islice(make(), count, None)),  # type: ignore[operator]
            sampling=None, windows=windows)


def calibration_feeds(graph: ir.Graph, model_dir: Path, config: CalibrationConfig, check: int = 0,
                      can_sample: bool = False) -> CalibrationFeeds:
    """The calibration samples, then `check` samples of the quality check's second set (`CalibrationFeeds.other`:
    --eval-data, else the model's own text from CHECK_SEED_WORDS where it can write it). `can_sample`: the FP model
    can write text (a share of the calibration windows, `config.own_text`), as sqonnx.run.front decides."""
    inputs = [v for v in graph.inputs if not v.is_initializer()]
    sources = data_sources(config.data)
    data = sources[0] if len(sources) == 1 else None
    _check_data(config.eval_data, "--eval-data")
    if data is not None and data.suffix == ".npz":
        feeds = _npz_feeds(inputs, data, config.num_samples)
        if config.eval_data is not None and config.eval_data.suffix != ".npz":
            raise SqonnxError(f"--eval-data {config.eval_data.name} is text but --calib-data is an .npz of feeds; "
                              "give the second set as an .npz too")
        if config.eval_data is not None and check:
            feeds = _with_other(feeds, _npz_feeds(inputs, config.eval_data, check), config.eval_data.name)
        return feeds
    tokenizer = load_tokenizer(model_dir)
    dims = cache_dims(model_dir) if any(str(v.name).startswith(CACHE_PREFIXES) for v in inputs) else None
    present = cache_outputs(inputs)
    # the model can write text (the check's second set); its own text joins the calibration only beside pydoc
    can_sample = can_sample and bool(present) and \
        LOGITS in {str(v.name) for v in graph.outputs} and "input_ids" in {str(v.name) for v in inputs}
    special = special_tokens(tokenizer)
    per_window = max(1, -(-config.seq_len // SAMPLED_LENGTH))
    length = min(SAMPLED_LENGTH, config.seq_len)
    every = round(1 / config.own_text) if config.own_text else 0
    sampled = [i for i in range(config.num_samples)
               if every and (i + 1) % every == 0] if can_sample and not sources else []
    texts = [_read_text(source, "--calib-data") for source in sources] or [pydoc_text("calibration")]
    description = ", ".join(source.name for source in sources) or "built-in pydoc topics"
    plain = _mixed_windows([tokenizer.encode(text, add_special_tokens=False).ids for text in texts],
                           config.num_samples - len(sampled), config.seq_len, special)
    rows = [i for i in range(config.num_samples) if i not in set(sampled)]
    # decode prompts from the plain windows before the last quarter (decode_chains keeps its own margin too): the
    # held-back samples are judged, never calibrated on
    early = [n for n, row in enumerate(rows) if row < config.num_samples - config.num_samples // 4] or [0]
    decode = decode_chains(inputs, list(graph.outputs), plain[early] if sampled else plain, config.decode_steps, dims)
    windows = np.zeros((config.num_samples, config.seq_len), np.int64)
    windows[rows] = plain
    prompts = [_prompt(inputs, tokenizer, word, special[0], dims)
               for word in itertools.islice(itertools.cycle(SEED_WORDS), len(sampled) * per_window)]
    calibration_prompts = len(prompts)
    rows = list(sampled)
    if sampled:
        description += (f" and the model's own text ({len(sampled)} of {config.num_samples} windows: "
                        f"{len(prompts)} sequences of {length} tokens sampled at temperature {TEMPERATURE:g})")
    other, other_description = 0, ""
    if config.eval_data is not None and check:
        other_description = config.eval_data.name
        if config.eval_data.suffix != ".npz":
            other_ids = tokenizer.encode(_read_text(config.eval_data, "--eval-data"), add_special_tokens=False).ids
            windows = np.concatenate([windows, token_windows(other_ids, check, config.seq_len, *special,
                                                                 what=f"--eval-data {config.eval_data.name}")])
            other = check
    elif can_sample and check:
        other, other_description = check, "the model's own text from other words"
        rows += range(config.num_samples, config.num_samples + check)
        prompts += [_prompt(inputs, tokenizer, word, special[0], dims)
                    for word in itertools.islice(itertools.cycle(CHECK_SEED_WORDS), check * per_window)]
        windows = np.concatenate([windows, np.zeros((check, config.seq_len), np.int64)])
    description += f", {config.num_samples} x {config.seq_len} tokens"
    if decode:
        description += f" + {sum(chain.steps for chain in decode)} decode steps"

    def feeds_of(window: np.ndarray) -> dict[str, np.ndarray]:
        return feeds_for_tokens(inputs, window, dims)

    sampling = Sampling(prompts, present, length, TEMPERATURE, rows, calibration_prompts) if rows else None
    feeds = CalibrationFeeds(len(windows), lambda: (feeds_of(w) for w in windows), description, decode, sampling,
                             other, other_description, windows, feeds_of)
    if config.eval_data is not None and config.eval_data.suffix == ".npz" and check:
        feeds = _with_other(feeds, _npz_feeds(inputs, config.eval_data, check), config.eval_data.name)
    return feeds


def check_data(config: CalibrationConfig) -> None:
    """--calib-data and --eval-data exist and are what they can be: one line each, before any work (a cache key reads
    them first)."""
    data_sources(config.data)
    _check_data(config.eval_data, "--eval-data")


def data_sources(data: Path | tuple[Path, ...] | None) -> list[Path]:
    """--calib-data's sources: a file, several, or a folder's files (sorted, hidden ones left out); checked here."""
    paths = list(data) if isinstance(data, tuple) else [] if data is None else [data]
    for path in paths:
        _check_data(path, "--calib-data", folder=True)
    found = [f for p in paths for f in (sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith("."))
                                        if p.is_dir() else [p])]
    if paths and not found:
        raise SqonnxError(f"--calib-data {paths[0]} is an empty folder; put text files in it")
    if len(found) > 1 and any(p.suffix == ".npz" for p in found):
        raise SqonnxError("--calib-data mixes text files only; give an .npz alone")
    return found


def _mixed_windows(sources: list[list[int]], count: int, seq_len: int,
                   special: tuple[list[int], list[int]]) -> np.ndarray:
    """`count` windows, an equal share from each source (the first ones one more where it does not divide), in
    turn: a short source is not drowned by a long one."""
    shares = [count // len(sources) + (i < count % len(sources)) for i in range(len(sources))]
    parts = [token_windows(ids, share, seq_len, *special) for ids, share in zip(sources, shares, strict=True) if share]
    order = np.argsort(np.concatenate([np.arange(share) * len(sources) + i for i, share in enumerate(shares)]),
                       kind="stable")
    return np.concatenate(parts)[order] if parts else np.zeros((0, seq_len), np.int64)


def _prompt(inputs: list[ir.Value], tokenizer, word: str, prefix: list[int],  # noqa: ANN001 (tokenizers.Tokenizer)
            dims: CacheDims | None) -> dict[str, np.ndarray]:
    """A sampled sequence's prompt: the tokenizer's opening tokens and the first token of `word` (one length for all:
    they run as one batch)."""
    first = tokenizer.encode(word, add_special_tokens=False).ids[:1]
    return feeds_for_tokens(inputs, np.asarray([*prefix, *first], np.int64), dims)


def _with_other(feeds: CalibrationFeeds, other: CalibrationFeeds, name: str) -> CalibrationFeeds:
    """`feeds`, then `other`'s samples as the quality check's second set."""
    make_first, make_other = feeds._make, other._make
    return replace(feeds, count=feeds.count + other.count, other=other.count, other_description=name,
                   _make=lambda: itertools.chain(make_first(), make_other()))  # type: ignore[operator]


def _check_data(data: Path | None, flag: str, folder: bool = False) -> None:
    if data is not None and not data.exists():
        raise SqonnxError(f"{'calibration' if flag == '--calib-data' else 'evaluation'} data not found: {data}")
    if data is not None and data.is_dir() and not folder:
        raise SqonnxError(f"{flag} {data} is a folder; give a text file or an .npz")


def _read_text(data: Path, flag: str) -> str:
    try:
        return data.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SqonnxError(f"{data} is neither UTF-8 text nor an .npz of input feeds") from None
    except OSError as exc:
        raise SqonnxError(f"cannot read {flag} {data}: {exc.strerror}") from None


def _npz_feeds(inputs: list[ir.Value], path: Path, num_samples: int) -> CalibrationFeeds:
    """An .npz holds one array per model input, samples along the first axis.

    Every array is read (and its CRC checked) here, before calibration starts, so a damaged file is one error
    line instead of a failure halfway through; only the first `num_samples` samples are kept.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception:
        raise SqonnxError(f"{path} is not a readable .npz file; save one array per model input with "
                          "numpy.savez") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # np.load also reads a bare .npy, whatever its suffix
        raise SqonnxError(f"{path} is a single .npy array, not an .npz; save one array per model input with "
                          "numpy.savez")
    with archive:
        names = {str(v.name) for v in inputs}
        if set(archive.files) != names:
            raise SqonnxError(f"{path.name} holds arrays {sorted(archive.files)} but the model's inputs are "
                              f"{sorted(names)}; save one array per input under its name")
        arrays = {name: _read_array(archive, name, path) for name in sorted(names)}
    count = None
    for value in inputs:
        array = arrays[str(value.name)]
        rank = len(value.shape) if value.shape is not None else max(array.ndim - 1, 0)
        if array.ndim != rank + 1:
            raise SqonnxError(f"array '{value.name}' in {path.name} has shape {array.shape}; expected "
                              f"[samples, ...] with {rank} dims after the sample axis")
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, int) and array.shape[axis + 1] != dim:
                raise SqonnxError(f"array '{value.name}' in {path.name} has shape {array.shape[1:]} per "
                                  f"sample but the model needs {list(value.shape)}")
        if 0 in array.shape[1:] and not str(value.name).startswith(CACHE_PREFIXES):  # an empty cache is a prefill
            raise SqonnxError(f"array '{value.name}' in {path.name} has shape {array.shape}: a sample with no "
                              "elements; give each sample at least one token")
        expected = _NUMPY_OF.get(value.dtype) if value.dtype is not None else None
        if expected is not None and array.dtype != expected:
            raise SqonnxError(f"array '{value.name}' in {path.name} is {array.dtype}; the model needs "
                              f"{np.dtype(expected).name}")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            sample = int(np.argwhere(~np.isfinite(array.reshape(array.shape[0], -1)))[0][0])
            raise SqonnxError(f"array '{value.name}' in {path.name} has NaN or infinite values (sample {sample}); "
                              "remove those samples")
        if count is not None and array.shape[0] != count:
            raise SqonnxError(f"arrays in {path.name} disagree on the number of samples")
        count = array.shape[0]
    total = min(int(count or 0), num_samples)
    if total == 0:
        raise SqonnxError(f"{path.name} holds no samples")
    arrays = {name: array[:total] for name, array in arrays.items()}

    def make() -> Iterator[dict[str, np.ndarray]]:
        return ({name: array[i] for name, array in arrays.items()} for i in range(total))

    return CalibrationFeeds(total, make, f"{path.name}, {total} samples")


def _read_array(archive: np.lib.npyio.NpzFile, name: str, path: Path) -> np.ndarray:
    """One array of an .npz; a damaged member (bad CRC, cut short, not .npy, pickled objects) is one error line."""
    try:
        array = archive[name]
    except Exception as exc:  # zipfile.BadZipFile, zlib.error, EOFError, ValueError (pickled objects), ...
        reason = " ".join(str(exc).split())[:100] or type(exc).__name__
        raise SqonnxError(f"array '{name}' in {path.name} cannot be read ({reason}); the file is damaged or "
                          "holds Python objects: save it again with numpy.savez and numeric arrays") from None
    if not isinstance(array, np.ndarray):  # a member without the .npy header comes back as raw bytes
        raise SqonnxError(f"'{name}' in {path.name} is not a numpy array; save it again with numpy.savez")
    return array
