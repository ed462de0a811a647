"""A target is one row of rules: what the runtime a model is quantized for takes. Each target's row is in its own
module (`cpu`, `tensorrt`, `cuda`); `targets.rules_of` reads the registry in `targets/__init__.py`. A new target is
one module, one registry line and one test.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir


class Target(str, enum.Enum):
    """Where the quantized model will run."""

    PORTABLE = "portable"  # any CPU or GPU: 7-bit weights
    NATIVE = "native"  # the CPU running sqonnx (detected)
    X86_AVX2 = "x86-avx2"  # x86 without VNNI (AVX2, or AVX-512 without VNNI): 7-bit weights
    X86_VNNI = "x86-vnni"  # AVX512-VNNI or AVX-VNNI: full 8-bit weights
    ARM64 = "arm64"  # int32 dot-product instructions: full 8-bit weights
    GPU = "gpu"  # CUDA / TensorRT integer GEMMs accumulate in int32: full 8-bit weights
    TENSORRT = "tensorrt"  # TensorRT's INT8 engines (targets.tensorrt)
    CUDA = "cuda"  # onnxruntime's CUDA provider (targets.cuda)


CPU_RUNTIME = "onnxruntime's CPU kernels"


@dataclass(frozen=True)
class TargetRules:
    """What one target's runtime takes. The defaults are onnxruntime's CPU kernels'."""

    target: Target
    # Integer products accumulate in int32 (VNNI, ARM dot products, GPUs): 8-bit weights cannot saturate. Else
    # weights are 7-bit (targets.cpu: x86 without VNNI sums pairs into a saturating int16).
    full_range: bool = False
    # No per-token or dynamic activation form: every group static, the layers where that costs more than a budget
    # left float (config.QuantizeConfig.float_budget).
    static_only: bool = False
    # Explicit integer ops (QuantizeLinear -> MatMulInteger -> Cast -> Mul) where the runtime has no fused Q/DQ
    # kernel; `signed`: int8 activations with zero point 0 (int8 x int8).
    integer_ops: bool = False
    signed: bool = False
    # Static Q/DQ only: no explicit integer ops, no MatMulNBits (no importer for them).
    qdq_only: bool = False
    # Half types the runtime's Q/DQ kernels take as input and scale type (ONNX opset 19 and later): a model in one of
    # them is quantized in its own type, without the float32 islands onnxruntime's CPU kernels need
    # (passes.float_islands), and its opset raised to 19 where it is older (passes.opset).
    half_qdq: tuple[ir.DataType, ...] = ()
    max_opset: int = 0  # the highest ai.onnx opset the runtime reads (0: any)
    opset_reason: str = ""  # why, for the error message
    runtime: str = CPU_RUNTIME  # how messages name it
    # The model runs on onnxruntime's CPU kernels, whose fusions `runtime.kernels` verifies (an unfused layer is
    # then worth a warning; a GPU runtime fuses Q/DQ its own way).
    cpu_kernels: bool = True
    # The first node of a written block that breaks the runtime's rules (None: none), and how many nodes the check
    # looked at; both None: nothing to check statically.
    violation: Callable[[ir.Graph, int], str | None] | None = None
    checked_nodes: Callable[[ir.Graph], int] | None = None
    # The report's line on what the target's rules did (number of checked nodes or quantized layers, the layers kept
    # float); None: no line.
    describe: Callable[[int, int, str], str] | None = None
