"""CPU targets, and which weight range is safe on the hardware a model will run on.

onnxruntime's x86 integer kernels multiply uint8 activations by int8 weights. Without VNNI (plain AVX2,
and AVX-512 without VNNI) they use `vpmaddubsw`, which adds two adjacent u8*s8 products into a
*saturating* int16: 255*127 + 255*127 = 64770 does not fit in 32767, so large activations meeting large
weights are silently clipped (a SmolLM2 model from onnxruntime's own `quantize_dynamic` without
reduce_range had perplexity 8.1 million here, 70.8 with it). With weights in [-63, 63] the worst pair is
255*63*2 = 32130, which fits. VNNI (`vpdpbusd`), ARM (`sdot`/`udot`/`smmla`) and GPUs accumulate in
int32 directly and can use the full [-127, 127].

A model is usually quantized on one machine and run on others, so the default target is `portable`
(reduced range, safe everywhere); `native` reads the running CPU's flags.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from sqonnx.targets.rules import Target, TargetRules

INT16_MAX = 32767
UINT8_MAX = 255


ROWS = (
    TargetRules(Target.PORTABLE),
    TargetRules(Target.X86_AVX2),
    TargetRules(Target.X86_VNNI, full_range=True),
    TargetRules(Target.ARM64, full_range=True),
    TargetRules(Target.GPU, full_range=True, runtime="onnxruntime's GPU kernels", cpu_kernels=False),
)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The running CPU's feature flags (Linux); empty when they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_native(machine: str | None = None, flags: set[str] | None = None) -> Target:
    """The target that describes the running CPU."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return Target.ARM64
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return Target.PORTABLE  # unknown architecture: stay safe
    flags = cpu_flags() if flags is None else flags
    return Target.X86_VNNI if flags & {"avx512_vnni", "avx_vnni"} else Target.X86_AVX2


def worst_int16_pair(weight_codes: np.ndarray, in_axis: int) -> int:
    """Largest |u8 * w[2k] + u8 * w[2k+1]| an activation of 255 can produce, over adjacent input-channel
    pairs: the intermediate `vpmaddubsw` saturates. Must stay <= 32767 for non-VNNI x86 targets."""
    codes = np.abs(np.moveaxis(weight_codes, in_axis, 0).astype(np.int16))  # |int8| + |int8| fits int16
    if codes.shape[0] % 2:
        codes = np.concatenate([codes, np.zeros_like(codes[:1])])
    pairs = codes[0::2] + codes[1::2]
    return int(pairs.max(initial=0)) * UINT8_MAX


def worst_int16_pair_in_graph(graph: object) -> int:
    """`worst_int16_pair` over every int8 weight of a quantized graph (QDQ or integer form)."""
    import onnx_ir as ir

    assert isinstance(graph, ir.Graph)
    worst = 0
    for node in graph:
        if node.op_type == "MatMulInteger":
            weight, in_axis = node.inputs[1], 0
        elif node.op_type == "DequantizeLinear" and node.outputs[0].consumers():
            reader = next(iter(node.outputs[0].consumers()))
            if reader.op_type not in ("MatMul", "Gemm") or reader.inputs[1] is not node.outputs[0]:
                continue
            weight, in_axis = node.inputs[0], int(reader.op_type == "Gemm" and reader.attributes.get_int("transB", 0))
        else:
            continue
        if weight is None or weight.const_value is None or weight.const_value.dtype != ir.DataType.INT8:
            continue
        codes = weight.const_value.numpy()
        if codes.ndim == 2:
            worst = max(worst, worst_int16_pair(codes, in_axis))
    return worst
