#!/usr/bin/env python
"""sqonnx at the sizes people ship: Llama-shaped models at TinyLlama-1.1B's and Llama-2-7B's shape, FP32 and FP16.

For each model, one at a time (build, measure, delete: a 7B FP32 model and its output take ~34 GB of disk):
- build it with ci/scale_models.py (written tensor by tensor into external data; random trained-like weights,
  rotary tables, the attention-mask input and its expansion, position ids, optionally a key/value cache);
- the baseline: onnxruntime's FP32 forward passes over the calibration samples, block by block (the whole model
  does not fit in memory), one session per block (its creation counted), the blocks sqonnx cuts, the same
  threads: the time below which no calibration can go;
- `sqonnx quantize` with the defaults in a child process: peak resident memory (the kernel's count, wait4),
  peak scratch disk beyond the output (the output folder and TMPDIR polled every half second, less the final
  output), wall time;
- that onnxruntime runs the output (one sample, logits finite) and how far they are from the FP model's.

A `--smollm2` row does the same for the optimum export of SmolLM2 with the defaults (text calibration, 128 x 512
tokens), against the whole model's forward passes in one session.

    python ci/scale.py                                        # TinyLlama FP32/FP16/with past, Llama-2-7B FP32/FP16
    python ci/scale.py --models tinyllama --dtypes float32    # one row
The table goes to ci/results/scale.md, the numbers to ci/results/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ci"))

import scale_models  # noqa: E402

RESULTS = REPO / "ci" / "results"


def disk_usage(*folders: Path) -> int:
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def run_measured(args: list[str], watch: list[Path], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a child process: wall time, peak RSS (wait4) and peak disk use of `watch` (polled)."""
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], disk_usage(*watch))
            time.sleep(0.5)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.perf_counter()
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        print("    " + line, end="", flush=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(args)}\n{''.join(output[-20:])}")
    return {"seconds": wall, "peak_rss": usage.ru_maxrss * 1024, "peak_disk": peak[0], "output": "".join(output)}


def drop_caches() -> bool:
    """Empty the page cache (root on Linux), so that each measured run reads the model from disk: a 27 GB model
    does not fit in it, a 13.5 GB one would stay there from the run before and flatter the next."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def baseline(model: Path, feeds: Path, result: Path) -> None:
    """In a child process: onnxruntime's float32 forward passes over the samples, block by block."""
    from sqonnx.calibrators.carry import Carry
    from sqonnx.calibrators.data import _npz_feeds
    from sqonnx.config import DEFAULT_BLOCK_BYTES
    from sqonnx.io.load import load_model
    from sqonnx.passes.prepare import prepare
    from sqonnx.run.progress import free_memory
    from sqonnx.runtime.session import PREPACK_TOKENS, open_session
    from sqonnx.streaming.blocks import partition
    from sqonnx.streaming.runner import BlockRunner, Samples, extract_block, release_block

    start = time.perf_counter()
    ir_model = prepare(load_model(model))
    inputs = [v for v in ir_model.graph.inputs if not v.is_initializer()]
    calibration = _npz_feeds(inputs, feeds, 1 << 30)
    samples = Samples(calibration, 0, [])
    part = partition(ir_model.graph, DEFAULT_BLOCK_BYTES)
    runner = BlockRunner(part, samples)
    prepack = samples.tokens(samples.count) >= PREPACK_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        carry = Carry(Path(tmp), 512 << 20)
        logits: np.ndarray | None = None
        holder: dict[str, object] = {}

        def run_one(sequence, run, feeds_, fetch):  # noqa: ANN001, ANN202
            nonlocal logits
            session = holder["session"]
            if sequence.index == 0 and "logits" in holder["outputs"]:  # type: ignore[operator]
                fetch = [*fetch, "logits"]
            out = dict(zip(fetch, session.run(fetch, feeds_, "baseline"), strict=True))  # type: ignore[attr-defined]
            if "logits" in out:
                logits = out["logits"]
            return out

        for block in part.blocks:
            holder["session"] = open_session(extract_block(ir_model, block), float32=True, prepack=prepack)
            holder["outputs"] = block.outputs
            runner.forward(block, run_one, carry)
            runner.finish_block(block, carry)
            holder.clear()  # the session and the arrays it maps go before the block's weights are unmapped
            release_block(ir_model, block)
            free_memory()
    seconds = time.perf_counter() - start
    np.save(result.with_suffix(".npy"), logits)
    result.write_text(json.dumps({"seconds": seconds, "blocks": len(part.blocks)}))


def check_output(model: Path, feeds: Path, reference: Path, result: Path) -> None:
    """In a child process: onnxruntime loads the quantized model and runs the first sample."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")  # a 7B session fits in memory once
    start = time.perf_counter()
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    with np.load(feeds) as archive:
        feed = {name: archive[name][0] for name in archive.files}
    logits = session.run(["logits"], feed)[0].astype(np.float64)
    expected = np.load(reference).astype(np.float64)
    result.write_text(json.dumps({
        "finite": bool(np.all(np.isfinite(logits))), "seconds": time.perf_counter() - start,
        "relative_error": float(np.linalg.norm(logits - expected) / np.linalg.norm(expected)),
        "same_top1": float(np.mean(logits.argmax(-1) == expected.argmax(-1)))}))


def measure(name: str, shape: scale_models.LlamaShape, dtype: str, with_past: bool, samples: int, seq_len: int,
            workdir: Path, signals: bool = False) -> dict[str, object]:
    print(f"== {name} {dtype}{' with past' if with_past else ''}: {samples} x {seq_len} tokens", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    source, out, tmp = workdir / "model", workdir / "out", workdir / "tmp"
    for folder in (source, out, tmp):
        folder.mkdir(parents=True)
    start = time.perf_counter()
    model = scale_models.build_llama(source / "model.onnx", shape, dtype=dtype, with_past=with_past)  # type: ignore[arg-type]
    built = time.perf_counter() - start
    feeds = source / "feeds.npz"
    np.savez(feeds, **scale_models.feeds(shape, samples, seq_len, 0, with_past=with_past, dtype=dtype))  # type: ignore[arg-type]
    model_bytes = disk_usage(source) - feeds.stat().st_size
    python = sys.executable
    env = {**os.environ, "TMPDIR": str(tmp)}
    print("  baseline: onnxruntime FP32 forward, block by block", flush=True)
    cold = drop_caches()
    base = run_measured([python, __file__, "--baseline", str(model), str(feeds), str(workdir / "baseline.json")],
                        [tmp], env)
    forward = json.loads((workdir / "baseline.json").read_text())
    print("  sqonnx quantize (defaults)", flush=True)
    cold = drop_caches() and cold
    quantized = run_measured([python, "-m", "sqonnx", "quantize", str(model), "-o", str(out / "model.onnx"),
                              "--calib-data", str(feeds)], [out, tmp], env)
    output_bytes = disk_usage(out)
    print("  onnxruntime runs the output", flush=True)
    run_measured([python, __file__, "--check", str(out / "model.onnx"), str(feeds),
                  str(workdir / "baseline.npy"), str(workdir / "check.json")], [], env)
    check = json.loads((workdir / "check.json").read_text())
    print("  sqonnx compare FP and output (4 samples, block by block)", flush=True)
    compared = run_measured([python, "-m", "sqonnx", "compare", str(model), str(out / "model.onnx"), "--data",
                             str(feeds), "--samples", "4", "--rounds", "1", "--json"], [tmp], env)
    text = str(compared["output"])
    comparison = json.loads(text[text.index("{"):text.rindex("}") + 1])
    decode: dict[str, object] = {}
    if signals:
        print("  Ctrl-C at three moments of a run", flush=True)
        decode["sigint_seconds"] = signal_latency(model, feeds, out)
    if with_past:
        print("  decode chains' tokens, block by block (4 chains x 8 steps)", flush=True)
        drop_caches()
        run_measured([python, __file__, "--decode-cost", str(model), str(feeds), str(workdir / "decode.json")], [],
                     env)
        decode = {f"decode_{k}": v for k, v in json.loads((workdir / "decode.json").read_text()).items()}
    row = {
        "model": name, "dtype": dtype, "with_past": with_past, "samples": samples, "seq_len": seq_len,
        "cold_page_cache": cold,
        "parameters": shape.parameters if hasattr(shape, "parameters") else None,
        "model_gb": model_bytes / 1e9, "build_seconds": built,
        "forward_seconds": forward["seconds"], "forward_blocks": forward["blocks"],
        "forward_peak_rss_gb": base["peak_rss"] / 1e9,
        "quantize_seconds": quantized["seconds"], "ratio": quantized["seconds"] / forward["seconds"],
        "peak_rss_gb": quantized["peak_rss"] / 1e9,
        "peak_scratch_gb": max(0, quantized["peak_disk"] - output_bytes) / 1e9,
        "output_gb": output_bytes / 1e9, **{f"output_{k}": v for k, v in check.items()}, **decode,
        "compare_peak_rss_gb": compared["peak_rss"] / 1e9, "compare_seconds": compared["seconds"],
        "compare_kl": comparison["kl"], "compare_top1": comparison["top1"],
        "summary": [line.strip() for line in str(quantized["output"]).splitlines() if line.startswith("  ")],
    }
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: v for k, v in row.items() if k != "summary"}, indent=1), flush=True)
    return row


def smollm2_row(workdir: Path) -> dict[str, object]:
    """SmolLM2 (optimum export) with the defaults against its forward passes in one onnxruntime session."""
    from models import smollm2

    model = smollm2.build()
    shutil.rmtree(workdir, ignore_errors=True)
    out, tmp = workdir / "out", workdir / "tmp"
    out.mkdir(parents=True)
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    print("== SmolLM2-135M (optimum export), defaults", flush=True)
    base = run_measured([sys.executable, __file__, "--forward", str(model), str(workdir / "forward.json")], [], env)
    forward = json.loads((workdir / "forward.json").read_text())
    quantized = run_measured([sys.executable, "-m", "sqonnx", "quantize", str(model), "-o",
                              str(out / "model.onnx")], [out, tmp], env)
    output_bytes = disk_usage(out)
    row = {"model": "SmolLM2-135M", "dtype": "float32", "with_past": False, "samples": 128, "seq_len": 512,
           "model_gb": model.stat().st_size / 1e9, "forward_seconds": forward["seconds"],
           "forward_peak_rss_gb": base["peak_rss"] / 1e9, "quantize_seconds": quantized["seconds"],
           "ratio": quantized["seconds"] / forward["seconds"], "peak_rss_gb": quantized["peak_rss"] / 1e9,
           "peak_scratch_gb": max(0, quantized["peak_disk"] - output_bytes) / 1e9, "output_gb": output_bytes / 1e9,
           "summary": [line.strip() for line in str(quantized["output"]).splitlines() if line.startswith("  ")]}
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: v for k, v in row.items() if k != "summary"}, indent=1), flush=True)
    return row


def forward_whole(model: Path, result: Path) -> None:
    """In a child process: the FP model's forward passes over sqonnx's default calibration samples, in one
    session (what a model that fits in memory costs to run once over its calibration data)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from sqonnx.calibrators import calibration_feeds
    from sqonnx.config import CalibrationConfig

    start = time.perf_counter()
    feeds = calibration_feeds(ir.load(model).graph, model.parent, CalibrationConfig())
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(["logits"], feed)
    result.write_text(json.dumps({"seconds": time.perf_counter() - start}))


def decode_cost(model: Path, feeds: Path, result: Path, chains: int = 4, steps: int = 8) -> None:
    """In a child process: what generating decode chains' tokens costs on a with-past model too large to keep
    every block's session open: `steps` passes over the blocks, all chains together (sqonnx.streaming)."""
    from sqonnx.calibrators.data import DecodeChain, cache_outputs
    from sqonnx.config import DEFAULT_BLOCK_BYTES
    from sqonnx.io.load import load_model
    from sqonnx.passes.prepare import prepare
    from sqonnx.streaming.blocks import partition
    from sqonnx.streaming.generate import generate_tokens

    ir_model = prepare(load_model(model))
    inputs = [v for v in ir_model.graph.inputs if not v.is_initializer()]
    present = cache_outputs(inputs)
    with np.load(feeds) as archive:
        prompts = [{name: archive[name][i] for name in archive.files} for i in range(chains)]
    part = partition(ir_model.graph, DEFAULT_BLOCK_BYTES)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        generate_tokens(ir_model, part, [DecodeChain(p, steps, present) for p in prompts], Path(tmp), False)
    seconds = time.perf_counter() - start
    result.write_text(json.dumps({"seconds": seconds, "passes": steps, "chains": chains,
                                  "seconds_per_pass": seconds / (steps)}))


def signal_latency(model: Path, feeds: Path, out: Path, delays: tuple[float, ...] = (15.0, 35.0, 55.0)) -> list[float]:
    """Ctrl-C (SIGINT) sent to `sqonnx quantize` after each delay (mid-calibration, mid-build, ...): seconds until
    the process exits, and that it leaves nothing in the output folder."""
    import signal

    latencies = []
    for delay in delays:
        shutil.rmtree(out, ignore_errors=True)
        # a job started in the background of a shell ignores SIGINT, and so would its children: restore it, as a
        # terminal's Ctrl-C finds it
        process = subprocess.Popen([sys.executable, "-m", "sqonnx", "quantize", str(model), "-o",
                                    str(out / "model.onnx"), "--calib-data", str(feeds)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        sent = time.perf_counter()
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"sqonnx did not exit on SIGINT sent after {delay:.0f} s: still running after "
                                 f"120 s, killed; stderr: {process.communicate()[1]!r}") from None
        latencies.append(time.perf_counter() - sent)
        left = list(out.iterdir()) if out.exists() else []
        assert process.returncode == 130 and not left, (process.returncode, stderr, left)
        print(f"    SIGINT after {delay:.0f} s: exited in {latencies[-1]:.2f} s, nothing left", flush=True)
    return latencies


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| model | size | calibration | peak RSS | scratch disk beyond the output | sqonnx wall | FP32 forward "
             "(block by block) | ratio | output | onnxruntime runs it: logits vs FP (rel. L2, same top-1) | "
             "`sqonnx compare` (4 samples): peak RSS, wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        past = " with past" if r.get("with_past") else ""
        check = (f"{r['output_relative_error']:.3f}, {r['output_same_top1']:.0%}" if "output_relative_error" in r
                 else "(demo: `make demo`)")
        compared = (f"{r['compare_peak_rss_gb']:.2f} GB, {r['compare_seconds']:.0f} s" if "compare_peak_rss_gb" in r
                    else "not measured")
        lines.append(f"| {r['model']} {r['dtype']}{past} | {r['model_gb']:.2f} GB | {r['samples']} x {r['seq_len']} | "
                     f"{r['peak_rss_gb']:.2f} GB | {r['peak_scratch_gb']:.2f} GB | {r['quantize_seconds']:.0f} s | "
                     f"{r['forward_seconds']:.0f} s | {r['ratio']:.2f}x | {r['output_gb']:.2f} GB | {check} | "
                     f"{compared} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tinyllama,llama2-7b")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--with-past", action="store_true", help="also the with-past form (TinyLlama shape)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2 with the defaults")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sqonnx-scale")
    parser.add_argument("--signals", action="store_true", help="also time Ctrl-C answers (TinyLlama FP32)")
    parser.add_argument("--only-with-past", action="store_true", help="of the TinyLlama rows, only the with-past one")
    parser.add_argument("--update", action="store_true",
                        help="replace the rows measured now in ci/results/scale.json and keep the others")
    parser.add_argument("--baseline", nargs=3, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--check", nargs=4, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--forward", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--decode-cost", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(*args.baseline)
        return
    if args.check:
        check_output(*args.check)
        return
    if args.forward:
        forward_whole(*args.forward)
        return
    if args.decode_cost:
        decode_cost(*args.decode_cost)
        return
    rows = []
    for name in args.models.split(","):
        shape = scale_models.SHAPES[name]
        for dtype in args.dtypes.split(",") if not args.only_with_past else []:
            rows.append(measure(name, shape, dtype, False, args.samples, args.seq_len, args.workdir,
                                signals=args.signals and name == "tinyllama" and dtype == "float32"))
        if args.with_past and name == "tinyllama":
            rows.append(measure(name, shape, "float32", True, args.samples, args.seq_len, args.workdir))
    if args.smollm2:
        rows.append(smollm2_row(args.workdir))
    RESULTS.mkdir(exist_ok=True)
    if args.update and (RESULTS / "scale.json").exists():
        def key(row: dict[str, object]) -> tuple[object, ...]:
            return row["model"], row["dtype"], row["with_past"]

        new = {key(r): r for r in rows}
        old = json.loads((RESULTS / "scale.json").read_text())
        rows = [new.pop(key(r), r) for r in old] + list(new.values())
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "scale.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
