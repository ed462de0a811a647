"""Quality and speed measurements used by the demo, the README table and the real-model tests."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from sqonnx.calibrators.data import (
    DecodeChain,
    cache_dims,
    cache_outputs,
    feeds_for_tokens,
    load_tokenizer,
    pydoc_text,
    special_tokens,
)
from sqonnx.math.metrics import next_token_nll


def session(model_path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _inputs(model_path: Path) -> list[ir.Value]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return list(ir.serde.deserialize_graph(proto.graph).inputs)


# The second evaluation domain (issue 27): English legal prose, text unlike the pydoc topics sqonnx calibrates on by
# default and that no calibration here reads (ci/data/README.md says what it is).
SECOND_DOMAIN = Path(__file__).resolve().parent.parent / "ci" / "data" / "legal_prose.txt"
DOMAINS = ("pydoc", "legal prose")


def domain_text(domain: str) -> str:
    """The held-out pydoc text, or the second domain's."""
    return pydoc_text("evaluation") if domain == "pydoc" else SECOND_DOMAIN.read_text(encoding="utf-8")


def eval_windows(model_dir: Path, seq_len: int, max_windows: int, domain: str = "pydoc") -> np.ndarray:
    """Non-overlapping token windows of the held-out pydoc text (or `domain`'s), with the tokenizer's special
    tokens."""
    tokenizer = load_tokenizer(model_dir)
    prefix, suffix = special_tokens(tokenizer)
    ids = np.asarray(tokenizer.encode(domain_text(domain), add_special_tokens=False).ids)
    body = seq_len - len(prefix) - len(suffix)
    count = min(max_windows, len(ids) // body)
    return np.stack([np.concatenate([prefix, ids[i * body:(i + 1) * body], suffix]).astype(np.int64)
                     for i in range(count)])


def perplexity(model_path: Path, windows: np.ndarray) -> float:
    """exp(mean next-token negative log-likelihood) over the windows."""
    sess = session(model_path)
    inputs = _inputs(model_path)
    dims = cache_dims(model_path.parent)  # an onnxruntime-genai graph leaves the cache's sizes symbolic
    total, count = 0.0, 0
    for window in windows:
        logits = sess.run(["logits"], feeds_for_tokens(inputs, window, dims))[0][0].astype(np.float64)
        total += next_token_nll(logits[:-1], window[1:])
        count += len(window) - 1
    return float(np.exp(total / count))


def staged_perplexity(model_path: Path, windows: np.ndarray, prompt: int) -> float:
    """exp(mean next-token negative log-likelihood) of the tokens after the first `prompt` of each window, as
    generation computes them (`staged_logits`). Needs a with-past export."""
    sess = session(model_path)
    total, count = 0.0, 0
    for window in windows:
        logits = staged_logits(model_path, window[:-1], prompt, sess)[prompt - 1:]
        total += next_token_nll(logits.astype(np.float64), window[prompt:])
        count += len(window) - prompt
    return float(np.exp(total / count))


def staged_logits(model_path: Path, tokens: np.ndarray, prompt: int,
                  sess: ort.InferenceSession | None = None) -> np.ndarray:
    """Logits [len(tokens), vocabulary] as generation computes them: the first `prompt` tokens in one run (the prompt),
    every later one alone through the key/value cache, fed the sequence's own token (teacher forcing). A
    `--decode-weights` model's prompt stage writes the cache its decode stage reads here."""
    sess = sess or session(model_path)
    inputs = _inputs(model_path)
    present = cache_outputs(inputs)
    if not present:
        raise ValueError(f"{model_path} has no past_key_values inputs; export it with past (with_past=True)")
    names = [o.name for o in sess.get_outputs()]
    chain = DecodeChain(feeds_for_tokens(inputs, tokens[:prompt], cache_dims(model_path.parent)),
                        len(tokens) - prompt, present).with_tokens(tokens[prompt:])
    outputs = dict(zip(names, sess.run(None, chain.prompt), strict=True))
    logits = [outputs["logits"][0]]
    for step in range(chain.steps):
        feeds = chain.step_feeds(step)
        feeds.update({name: outputs[returned] for name, returned in present.items()})
        outputs = dict(zip(names, sess.run(None, feeds), strict=True))
        logits.append(outputs["logits"][0])
    return np.concatenate(logits)


def sentence_embeddings(model_path: Path, windows: list[np.ndarray]) -> np.ndarray:
    """Mean-pooled, L2-normalized sentence embeddings (as sentence-transformers computes them)."""
    sess = session(model_path)
    inputs = _inputs(model_path)
    out = []
    for tokens in windows:
        hidden = sess.run(["last_hidden_state"], feeds_for_tokens(inputs, tokens))[0][0]
        vector = hidden.mean(axis=0)
        out.append(vector / np.linalg.norm(vector))
    return np.stack(out)


def sentences(model_dir: Path, count: int, max_tokens: int = 128, domain: str = "pydoc") -> list[np.ndarray]:
    """Held-out pydoc paragraphs (or `domain`'s) tokenized with [CLS] ... [SEP], as the sentence encoder expects."""
    tokenizer = load_tokenizer(model_dir)
    paragraphs = [p.strip() for p in domain_text(domain).split("\n\n") if len(p.strip()) > 40]
    step = max(1, len(paragraphs) // count)
    result = []
    for paragraph in paragraphs[::step][:count]:
        ids = tokenizer.encode(paragraph, add_special_tokens=True).ids
        if len(ids) > max_tokens:
            ids = ids[: max_tokens - 1] + ids[-1:]  # keep the closing [SEP]
        result.append(np.asarray(ids, dtype=np.int64))
    return result


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1)))


def latency(model_path: Path, seq_len: int, repeats: int = 5) -> float:
    """Median seconds for one batch-1 forward of `seq_len` tokens."""
    sess = session(model_path)
    feeds = feeds_for_tokens(_inputs(model_path), np.arange(seq_len, dtype=np.int64) % 1000 + 100)
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decode_seconds(model_path: Path, prompt: np.ndarray, new_tokens: int) -> float:
    """Seconds to generate `new_tokens` greedily, one token per run with the key/value cache (batch 1),
    after a prefill of `prompt` (not timed). Needs a with-past export (past_key_values.* inputs)."""
    return greedy_tokens(model_path, prompt, new_tokens)[1]


def greedy_tokens(model_path: Path, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float]:
    """The `new_tokens` tokens a greedy decode through the key/value cache writes after `prompt` (batch 1),
    and the seconds the decode steps took (the prefill not counted). Needs a with-past export (optimum's or
    onnxruntime-genai's); the steps are fed as calibration's decode chains feed them."""
    sess = session(model_path)
    inputs = _inputs(model_path)
    present = cache_outputs(inputs)
    if not present:
        raise ValueError(f"{model_path} has no past_key_values inputs; export it with past (with_past=True)")
    chain = DecodeChain(feeds_for_tokens(inputs, prompt, cache_dims(model_path.parent)), new_tokens, present)
    output_names = [o.name for o in sess.get_outputs()]
    feeds = chain.prompt
    elapsed = 0.0
    tokens: list[int] = []
    for step in range(new_tokens):
        start = time.perf_counter()
        outputs = dict(zip(output_names, sess.run(None, feeds), strict=True))
        if step:  # step 0 is the prefill
            elapsed += time.perf_counter() - start
        tokens.append(int(outputs["logits"][0, -1].argmax()))
        feeds = chain.next_feeds(feeds, outputs, step)
    start = time.perf_counter()
    sess.run(None, feeds)  # the last decode step, timed like the others
    return tokens, elapsed + time.perf_counter() - start


def next_token_choices(model_path: Path, tokens: np.ndarray) -> np.ndarray:
    """The greedy next token after every prefix of `tokens`, from one forward pass (batch 1)."""
    sess = session(model_path)
    feeds = feeds_for_tokens(_inputs(model_path), tokens, cache_dims(model_path.parent))
    return sess.run(["logits"], feeds)[0][0].argmax(axis=-1)


def greedy_agreement(reference: list[int], other: list[int]) -> tuple[float, int]:
    """Share of identical tokens position by position, and the index of the first different one (len when
    none): after a divergence the two texts continue from different contexts, so the share counts only
    what still happens to line up."""
    padded = list(other) + [-1] * (len(reference) - len(other))  # a generation stopped early (end of text)
    same = [a == b for a, b in zip(reference, padded, strict=False)]
    return float(np.mean(same)), next((i for i, s in enumerate(same) if not s), len(same))


def kernel_time_by_op(model_path: Path, seq_len: int, runs: int = 3) -> dict[str, float]:
    """Share of onnxruntime's kernel time per op type for a prefill of `seq_len` tokens (its profiler)."""
    feeds = feeds_for_tokens(_inputs(model_path), np.arange(seq_len, dtype=np.int64) % 1000 + 100,
                             cache_dims(model_path.parent))
    return {op: share for op, (share, _) in _profile(model_path, feeds, runs).items()}


def decode_kernel_time_by_op(model_path: Path, past: int, runs: int = 20) -> dict[str, tuple[float, float]]:
    """Share of kernel time and milliseconds per step, per op type, for one decode token on a cache of `past`
    tokens (cache values are zeros, which cost the same as real ones)."""
    feeds = feeds_for_tokens(_inputs(model_path), np.array([100], np.int64), cache_dims(model_path.parent))
    for name, array in feeds.items():
        if name.startswith("past_key_values"):
            feeds[name] = np.zeros((*array.shape[:2], past, array.shape[3]), array.dtype)
    feeds["attention_mask"] = np.ones((1, past + 1), np.int64)
    if "position_ids" in feeds:
        feeds["position_ids"] = np.array([[past]], np.int64)
    return _profile(model_path, feeds, runs)


def _profile(model_path: Path, feeds: dict[str, np.ndarray], runs: int) -> dict[str, tuple[float, float]]:
    """onnxruntime's profiler over `runs` runs after a warm-up run (allocations, weight prepacking): per op
    type, the share of kernel time and milliseconds per run, largest first."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sqonnx-profile-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm = first["ts"] + first["dur"]
    totals: dict[str, float] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and "op_name" in args \
                and event["ts"] >= warm:
            totals[args["op_name"]] = totals.get(args["op_name"], 0.0) + float(event["dur"])
    grand = sum(totals.values()) or 1.0
    return {op: (t / grand, t / runs / 1000) for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}
