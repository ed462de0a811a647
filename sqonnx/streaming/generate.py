"""The FP model writing tokens itself, block by block: the decode chains' greedy tokens, and the text it samples for
calibration and for the quality check's second set (sqonnx.calibrators.data.Sampling).

Rows of equal prompt length run as one batch: a prefill of the prompts, then one single-token run per token, each
fed the key/value cache the run before returned. With `keep_sessions` (a model that fits in memory) each block's
session is opened once; otherwise every step reads the weights again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators.carry import Carry
from sqonnx.calibrators.data import LOGITS, DecodeChain, Sampling, step_feeds
from sqonnx.runtime.session import Session, open_session
from sqonnx.streaming.blocks import Partition
from sqonnx.streaming.runner import CARRY_MEMORY_BYTES, BlockRunner, Samples, extract_block, release_block

# Rows generated in one batch: a decode step's matrices are [rows, hidden], which onnxruntime runs far faster per
# row than one at a time, while the cache stays small (SmolLM2: 5.9 MB a row at 128 tokens).
BATCH_ROWS = 32

Choose = Callable[[np.ndarray, int], np.ndarray]  # (last logits [rows, vocab], step) -> next tokens [rows]


def generate(model: ir.Model, part: Partition, prompt: dict[str, np.ndarray], present: dict[str, str], steps: int,
             choose: Choose, workdir: Path, keep_sessions: bool, sessions: dict[int, Session] | None = None,
             hint: str = "--decode-steps 0 calibrates prefill only") -> np.ndarray:
    """[rows, steps] tokens written after `prompt` (model inputs of rows of one length, an empty cache): the prefill
    picks the first, each of `steps` - 1 single-token runs the next. `present`: cache input -> the output returning it
    one token longer. `sessions`: open block sessions to reuse (filled where `keep_sessions`). `hint`: how to do
    without, for an error's line."""
    rows = prompt["input_ids"].shape[0]
    if steps == 0:
        return np.zeros((rows, 0), np.int64)
    runner = BlockRunner(part, Samples.empty())
    carry = Carry(workdir / "generate", CARRY_MEMORY_BYTES)
    caches = Carry(workdir / "generate-cache", CARRY_MEMORY_BYTES)
    sessions = {} if sessions is None else sessions
    tokens = np.zeros((rows, steps), np.int64)
    key = (0, 0)
    for step in range(steps):
        model_feeds = prompt if step == 0 else step_feeds(prompt, tokens[:, step - 1], step - 1)
        for block in part.blocks:
            session = sessions.get(block.index) or open_session(
                extract_block(model, block), float32=True, prepack=False, what=f"block {block.index} ({block.label})")
            if keep_sessions:
                sessions[block.index] = session
            feeds = {name: model_feeds[name] for name in block.inputs if name in model_feeds
                     and not (step and name in present)}
            for name in block.inputs:
                if name in present and step:
                    feeds[name] = caches.get(key, present[name])
                elif name not in feeds and carry.has(key, name):
                    feeds[name] = carry.get(key, name)
            out_names = runner.carried_out(block)
            presents = [p for p in present.values() if p in block.outputs]
            wanted = [*out_names, *presents, *([LOGITS] if LOGITS in block.outputs else [])]
            where = f"generating token {step} ({hint})"
            fetched = dict(zip(wanted, session.run(wanted, feeds, where), strict=True))
            for name in out_names:
                carry.put(key, name, fetched[name])
            for name in presents:
                caches.put(key, name, fetched[name])
            if LOGITS in fetched:
                tokens[:, step] = choose(fetched[LOGITS][:, -1], step)
            if not keep_sessions:
                del session
                release_block(model, block)
            runner.finish_block(block, carry)
    carry.clear()
    caches.clear()
    return tokens


def generate_tokens(model: ir.Model, part: Partition, chains: list[DecodeChain], workdir: Path,
                    keep_sessions: bool) -> list[DecodeChain]:
    """The decode chains teacher-forced with the FP model's own greedy tokens (their prompts share one length: the
    first half of a window), in batches of BATCH_ROWS chains."""
    if not chains:
        return chains
    found: list[np.ndarray] = []
    sessions: dict[int, Session] = {}
    for start in range(0, len(chains), BATCH_ROWS):
        batch = chains[start:start + BATCH_ROWS]
        prompt = {name: np.concatenate([chain.prompt[name] for chain in batch]) for name in batch[0].prompt}
        steps = max(chain.steps for chain in batch)
        tokens = generate(model, part, prompt, batch[0].present, steps, _greedy, workdir, keep_sessions, sessions)
        found += [tokens[i, :chain.steps] for i, chain in enumerate(batch)]
    return [chain.with_tokens(tokens) for chain, tokens in zip(chains, found, strict=True)]


def sample_text(model: ir.Model, part: Partition, sampling: Sampling, workdir: Path,
                keep_sessions: bool) -> np.ndarray:
    """[sequences, length] tokens: each of `sampling`'s prompts continued at its temperature by the FP model
    (prompt tokens included), each group from its own seed, in batches of BATCH_ROWS."""
    sessions: dict[int, Session] = {}
    written = []
    for group, seed in sampling.groups:
        rng = np.random.default_rng(seed)
        for start in range(0, len(group), BATCH_ROWS):
            prompts = group[start:start + BATCH_ROWS]
            prompt = {name: np.concatenate([feeds[name] for feeds in prompts]) for name in prompts[0]}

            def choose(logits: np.ndarray, step: int, rng: np.random.Generator = rng) -> np.ndarray:
                return sample(logits, sampling.temperature, rng)

            steps = sampling.length - prompt["input_ids"].shape[1]
            tokens = generate(model, part, prompt, sampling.present, steps, choose, workdir, keep_sessions, sessions,
                              "--own-text 0 with --eval-data FILE or --check-samples 0: no text of the model's own")
            written.append(np.concatenate([prompt["input_ids"].astype(np.int64), tokens], axis=1))
    return np.concatenate(written)


def _greedy(logits: np.ndarray, step: int) -> np.ndarray:
    return logits.argmax(axis=-1)


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits / temperature), by the inverse of the cumulative distribution (float64:
    the same draw gives the same token wherever the logits agree)."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    cumulative = np.cumsum(np.exp(scaled), axis=-1)
    draws = rng.random(len(logits)) * cumulative[:, -1]
    return np.minimum((cumulative < draws[:, None]).sum(axis=-1), logits.shape[-1] - 1)
