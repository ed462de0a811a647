"""`sqonnx.compat.quantize_static`: onnxruntime's `quantize_static` with its SmoothQuant option, working again.

onnxruntime's `extra_options={"SmoothQuant": True}` imports neural-compressor's ONNX smoother, which
neural-compressor 3.8 removed; scripts written against it fail at import. This function takes onnxruntime's
signature and option names, so such a script runs by changing one import:

    from onnxruntime.quantization import quantize_static          # before
    from sqonnx.compat import quantize_static                     # after

and maps each option onto `QuantizeConfig`. `quantize_static` means static activations, so every layer gets one
(`--static`). An option that has no sqonnx meaning (`SmoothQuantFolding=False`, 16-bit or float8 types, entropy
calibration, onnxruntime's per-node overrides, ...) is refused by name, all of them in one error, rather than
silently ignored. Where sqonnx differs from onnxruntime on purpose:
- activations are symmetric int8 whatever `activation_type` (QInt8 or QUInt8) says, also where onnxruntime's
  default would make them asymmetric (an explicit `ActivationSymmetric=False` is refused); its kernels run either;
- `reduce_range=False` (onnxruntime's default) leaves the weight range to sqonnx's target (7-bit for `portable`:
  8-bit weights saturate onnxruntime's u8s8 kernels on x86 without VNNI; pass `target=` for a machine with VNNI);
- `Percentile` is sqonnx's 99.99th percentile (onnxruntime's `CalibPercentile` default is 99.999; a
  `CalibPercentile` other than 99.99 is refused);
- `use_external_data_format` is not needed: the output keeps its weights in a data file where the input does (a
  model over 2 GB always);
- the samples read from the reader stop at `num_samples` (128 by default), as `--num-samples` does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from sqonnx.api import quantize
from sqonnx.config import CalibMethod, CalibrationConfig, Format, Level, Provider, QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.graph.layers import find_linear_layers
from sqonnx.io.load import load_model
from sqonnx.report import QuantizeReport
from sqonnx.targets import Target

# extra_options with a sqonnx meaning: the value each must have (sqonnx's only behaviour), or None (mapped below)
_EXTRA_ACCEPTED: dict[str, object] = {
    "SmoothQuant": None, "SmoothQuantAlpha": None, "SmoothQuantFolding": True, "ActivationSymmetric": True,
    "WeightSymmetric": True, "MatMulConstBOnly": True, "EnableSubgraph": False, "UseQDQContribOps": False,
    "CalibPercentile": 99.99,
}
_WHY = {
    "SmoothQuantFolding": "sqonnx folds 1/s into the producer wherever that is exact, and adds a Mul only where "
                          "nothing absorbs it",
    "ActivationSymmetric": "sqonnx's activations are symmetric int8",
    "WeightSymmetric": "sqonnx's weights are symmetric int8",
    "MatMulConstBOnly": "sqonnx quantizes MatMul/Gemm with a constant weight only",
    "EnableSubgraph": "sqonnx does not quantize inside If/Loop subgraphs",
    "UseQDQContribOps": "sqonnx writes standard-domain Q/DQ",
    "CalibPercentile": "sqonnx's percentile calibration keeps the 99.99th",
}
_OP_TYPES = {"MatMul", "Gemm"}


def quantize_static(model_input: str | Path | Any, model_output: str | Path, calibration_data_reader: Any = None,
                    quant_format: Any = None, op_types_to_quantize: list[str] | None = None, per_channel: bool = False,
                    reduce_range: bool = False, activation_type: Any = None, weight_type: Any = None,
                    nodes_to_quantize: list[str] | None = None, nodes_to_exclude: list[str] | None = None,
                    use_external_data_format: bool = False, calibrate_method: Any = None,
                    calibration_providers: list[str] | None = None, extra_options: dict[str, Any] | None = None,
                    calibration_cache_path: str | Path | None = None, *, target: Target = Target.PORTABLE,
                    num_samples: int = CalibrationConfig().num_samples) -> QuantizeReport:
    """onnxruntime's `quantize_static(model_input, model_output, calibration_data_reader, ...)` with SmoothQuant by
    sqonnx. `use_external_data_format`: the output keeps its weights in a data file beside it where the input does
    (a model over 2 GB always). `op_types_to_quantize` without Gemm (or MatMul) leaves those layers float.
    `target` and `num_samples` are sqonnx's own, keyword only."""
    refused = []
    extra = dict(extra_options or {})
    for key, value in extra.items():
        if key not in _EXTRA_ACCEPTED:
            refused.append(f"extra_options['{key}']")
        elif _EXTRA_ACCEPTED[key] is not None and value != _EXTRA_ACCEPTED[key]:
            refused.append(f"extra_options['{key}']={value!r} ({_WHY[key]})")
    if calibration_data_reader is None:
        refused.append("calibration_data_reader=None (sqonnx calibrates: give the reader of your samples)")
    if op_types_to_quantize and set(op_types_to_quantize) - _OP_TYPES:
        refused.append(f"op_types_to_quantize {sorted(set(op_types_to_quantize) - _OP_TYPES)} (SmoothQuant quantizes "
                       "MatMul and Gemm)")
    if nodes_to_quantize:
        refused.append("nodes_to_quantize (quantize only these: sqonnx quantizes every MatMul/Gemm with a constant "
                       "weight; name the others in nodes_to_exclude)")
    if activation_type is not None and _name(activation_type) not in ("QInt8", "QUInt8"):
        refused.append(f"activation_type {_name(activation_type)} (sqonnx's activations are 8-bit)")
    if weight_type is not None and _name(weight_type) != "QInt8":
        refused.append(f"weight_type {_name(weight_type)} (sqonnx's weights are int8"
                       + ("; for 4-bit weights use sqonnx's --weights int4" if "4" in _name(weight_type) else "") + ")")
    method = _name(calibrate_method) if calibrate_method is not None else "MinMax"
    if method not in ("MinMax", "Percentile"):
        refused.append(f"calibrate_method {method} (sqonnx's static ranges: MinMax, Percentile, or its own mse)")
    if calibration_cache_path is not None:
        refused.append("calibration_cache_path (sqonnx keeps calibration per block in QuantizeConfig.cache_dir)")
    if refused:
        raise SqonnxError("sqonnx.compat.quantize_static cannot map " + "; ".join(refused))
    fmt = Format.QOPERATOR if quant_format is not None and _name(quant_format) == "QOperator" else Format.QDQ
    exclude = [*(nodes_to_exclude or ()), *_other_op_types(model_input, set(op_types_to_quantize or _OP_TYPES))]
    providers = [p if isinstance(p, str) else p[0] for p in calibration_providers or []]
    config = QuantizeConfig(
        alpha=extra.get("SmoothQuantAlpha", 0.5), smooth=bool(extra.get("SmoothQuant", False)), level=Level.O3,
        per_token_where_needed=False, format=fmt, per_channel=bool(per_channel),
        reduce_range=True if reduce_range else None, target=target, exclude=tuple(exclude),
        calib_method=CalibMethod.PERCENTILE if method == "Percentile" else CalibMethod.MINMAX,
        calibration_provider=Provider.CUDA if "CUDAExecutionProvider" in providers else
        Provider.CPU if providers else Provider.AUTO,
        calibration=replace(CalibrationConfig(), num_samples=num_samples))
    return quantize(model_input, model_output, config, calibration=calibration_data_reader)


def _other_op_types(model: str | Path | Any, wanted: set[str]) -> list[str]:
    """The linear layers of an op type `op_types_to_quantize` leaves out (["MatMul"]: the Gemms), to exclude."""
    if wanted >= _OP_TYPES:
        return []
    graph = (ir.from_proto(model) if isinstance(model, onnx.ModelProto) else load_model(Path(model))).graph
    return [layer.name for layer in find_linear_layers(graph) if layer.node.op_type not in wanted]


def _name(value: Any) -> str:
    """An onnxruntime enum member's name (QuantType.QInt8 -> 'QInt8'), or the string given."""
    return str(getattr(value, "name", value))
