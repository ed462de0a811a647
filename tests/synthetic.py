"""Tiny transformer-shaped ONNX graphs with planted outlier channels, built by the tests themselves.

One block has every producer kind the smoothing passes must handle:
RMSNorm (Pow..Div -> Mul(weight)) -> q/k/v, a stand-in attention (q*k + v) -> o_proj (nothing can
absorb: its producer is an Add of two activations), residual, LayerNormalization -> gate/up, and
up (+ bias) * SiLU(gate) -> down_proj (absorbed by up_proj's output columns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 32
FFN = 48
OUTLIERS = (3, 17)  # channels of the input that carry ~100x larger values


def build_block(path: Path, *, bias: bool = True, shared_weight: bool = False, seed: int = 0,
                opset: int = 18) -> Path:
    rng = np.random.default_rng(seed)
    c, f = HIDDEN, FFN

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    norm_weight = (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    norm_weight[list(OUTLIERS)] *= 8.0
    gamma = (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    gamma[5] = 30.0  # an outlier made by the LayerNorm itself
    inits = {
        "rms.weight": norm_weight, "eps": np.array(1e-6, np.float32), "two": np.array(2.0, np.float32),
        "wq": w(c, c), "wk": w(c, c), "wv": w(c, c), "wo": w(c, c),
        "ln.gamma": gamma, "ln.beta": w(c, scale=0.5),
        "wg": w(c, f), "wu": w(c, f), "wd": w(f, c), "up.bias": w(f, scale=0.5),
    }
    # As in real LLMs, the weight rows that read outlier channels are small, so every channel matters
    # to the output and rounding the small channels to zero (plain per-tensor INT8) hurts.
    for name in ("wq", "wk", "wv"):
        inits[name][list(OUTLIERS)] /= 200.0
    for name in ("wg", "wu"):
        inits[name][5] /= 30.0
    inits["wo"] *= 30.0  # the attention path contributes as much to the output as the MLP
    if shared_weight:
        inits.pop("wk")  # k_proj reuses q_proj's weight: tied weights must not be rescaled for one reader
    k_weight = "wq" if shared_weight else "wk"
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["rms.sq"], name="/rms/Pow"),
        helper.make_node("ReduceMean", ["rms.sq"], ["rms.mean"], name="/rms/ReduceMean", axes=[-1], keepdims=1)
        if opset < 18 else
        helper.make_node("ReduceMean", ["rms.sq", "axes_last"], ["rms.mean"], name="/rms/ReduceMean", keepdims=1),
        helper.make_node("Add", ["rms.mean", "eps"], ["rms.var"], name="/rms/Add"),
        helper.make_node("Sqrt", ["rms.var"], ["rms.std"], name="/rms/Sqrt"),
        helper.make_node("Div", ["x", "rms.std"], ["rms.normed"], name="/rms/Div"),
        helper.make_node("Mul", ["rms.weight", "rms.normed"], ["h"], name="/rms/Mul_1"),
        helper.make_node("Shape", ["h"], ["h.shape"], name="/attn/Shape"),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["h", k_weight], ["k"], name="/attn/k_proj/MatMul"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="/attn/v_proj/MatMul"),
        helper.make_node("Mul", ["q", "k"], ["qk"], name="/attn/Mul"),
        helper.make_node("Add", ["qk", "v"], ["ctx"], name="/attn/Add"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="/attn/o_proj/MatMul"),
        helper.make_node("Add", ["x", "o"], ["r"], name="/residual/Add"),
        helper.make_node("LayerNormalization", ["r", "ln.gamma", "ln.beta"], ["g"], name="/ln/LayerNorm",
                         axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["g", "wg"], ["gate"], name="/mlp/gate_proj/MatMul"),
        helper.make_node("MatMul", ["g", "wu"], ["up0"], name="/mlp/up_proj/MatMul"),
        helper.make_node("Sigmoid", ["gate"], ["gate.sig"], name="/mlp/Sigmoid"),
        helper.make_node("Mul", ["gate", "gate.sig"], ["gate.act"], name="/mlp/act/Mul"),
        helper.make_node("Mul", ["gate.act", "up"], ["m"], name="/mlp/Mul"),
        helper.make_node("MatMul", ["m", "wd"], ["down"], name="/mlp/down_proj/MatMul"),
        helper.make_node("Add", ["r", "down"], ["y"], name="/residual/Add_1"),
    ]
    if bias:
        nodes.insert(nodes.index(next(n for n in nodes if n.name == "/mlp/Sigmoid")),
                     helper.make_node("Add", ["up0", "up.bias"], ["up"], name="/mlp/up_proj/Add"))
    else:
        inits.pop("up.bias")
        for n in nodes:
            n.input[:] = ["up0" if i == "up" else i for i in n.input]
    if opset >= 18:
        inits["axes_last"] = np.array([-1], np.int64)
    graph = helper.make_graph(
        nodes, "tiny_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", c])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def activations(samples: int, seq: int = 16, seed: int = 1) -> np.ndarray:
    """[samples, 1, seq, HIDDEN] inputs whose OUTLIERS channels are ~100x the rest."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 1, seq, HIDDEN)).astype(np.float32)
    x[..., list(OUTLIERS)] *= 100.0
    return x


def save_feeds(path: Path, x: np.ndarray) -> Path:
    np.savez(path, x=x)
    return path


def run(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["y"], {"x": sample})[0] for sample in x])
