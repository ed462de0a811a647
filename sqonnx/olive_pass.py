"""`pip install sqonnx[olive]`: SmoothQuant by sqonnx as a pass of an Olive workflow (olive-ai 0.13).

Olive finds a pass through its package config, and takes no import path in a workflow's `"type"`; a package config
it is given replaces its own. So `package_config()` returns Olive's own with this pass added, for

    olive.workflows.run("workflow.json", package_config=sqonnx.olive_pass.package_config())

or, from the shell, `python -m sqonnx.olive_pass > sqonnx-olive.json` and
`olive run --config workflow.json --package-config sqonnx-olive.json`. In the workflow:

    "passes": {"smoothquant": {"type": "SqonnxQuantization", "data_config": "calib", "target": "tensorrt"}}

The pass's options are `QuantizeConfig`'s, by its field names and CLI values (alpha, level, target, weights,
per_channel, reduce_range, exclude, keep_float_budget, calib_method, rotate, smooth, num_samples, seq_len).
`data_config` names one of the workflow's data configs: its calibration dataloader is read once as sqonnx reads an
onnxruntime CalibrationDataReader (`sqonnx.quantize`'s `calibration=`), so the output is byte for byte what
`sqonnx quantize --calib-data` writes from the same samples. Without one, sqonnx calibrates on its own text (the
model's tokenizer beside it). The output is sqonnx's (its data file named after its content, beside it).

Olive reports only a few exception types from a pass and logs the rest as a warning ("no output model"); a user's
mistake (a SqonnxError) is raised as a ValueError with sqonnx's one-line message.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Union

from olive.common.config_utils import validate_config
from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from sqonnx.api import quantize
from sqonnx.config import (
    AUTO,
    CalibMethod,
    CalibrationConfig,
    Level,
    QuantizeConfig,
    Weights,
)
from sqonnx.errors import SqonnxError
from sqonnx.targets import Target

PASS_NAME = "SqonnxQuantization"
# Each option: its type, default, what it means; enums by their CLI values.
_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "alpha": (float | str, 0.5, "migration strength α, or 'auto' (searched per layer group)"),
    "level": (str, "auto", "O1, O2, O3 or auto (static, per-token where one range cannot hold a group)"),
    "target": (str, Target.PORTABLE.value, "where the model runs: portable, native, x86-avx2, x86-vnni, arm64, "
                                            "gpu, tensorrt, cuda"),
    "weights": (str, Weights.INT8.value, "int8, int4 (W4A8 MatMulNBits) or int8-blocks"),
    "per_channel": (bool, True, "a weight scale per output channel (False: per tensor)"),
    "reduce_range": (bool | None, None, "7-bit weights; None: what the target needs"),
    "exclude": (list, [], "node-name globs kept float"),
    "keep_float_budget": (float | None, None, "leave the most sensitive layers float until the loss fits"),
    "calib_method": (str, CalibMethod.MINMAX.value, "minmax, percentile or mse"),
    "rotate": (bool | None, None, "rotate the residual stream (None: where exact)"),
    "smooth": (bool, True, "SmoothQuant's smoothing (False: plain W8A8)"),
    "num_samples": (int, CalibrationConfig().num_samples, "calibration samples read"),
    "seq_len": (int, CalibrationConfig().seq_len, "tokens per sample of sqonnx's own text calibration"),
}


class SqonnxQuantization(Pass):
    """SmoothQuant W8A8 (or W4A8) of an ONNX model by sqonnx."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            # (Olive asserts a typing.Union holding DataConfig here)
            "data_config": PassConfigParam(type_=Union[DataConfig, dict, None], default_value=None,  # noqa: UP007
                                           description="calibration data (a data config of the workflow); None: "
                                                       "sqonnx's own text calibration"),
            **{name: PassConfigParam(type_=type_, default_value=default, description=description)
               for name, (type_, default, description) in _OPTIONS.items()},
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        calibration = None
        if config.data_config is not None:
            data = validate_config(config.data_config, DataConfig)
            calibration = data.to_data_container().create_calibration_dataloader(
                model_path=model.model_path, io_config=model.io_config)
        try:
            quantize(model.model_path, output, quantize_config(config), calibration=calibration)
        except SqonnxError as exc:
            raise ValueError(f"sqonnx: {exc}") from None
        return ONNXModelHandler(model_path=str(output.parent), onnx_file_name=output.name)


def quantize_config(options: Any) -> QuantizeConfig:
    """The pass's options (attributes named as in _OPTIONS) as a QuantizeConfig; a bad value is a SqonnxError."""
    level = str(options.level)
    try:
        alpha = options.alpha if options.alpha == AUTO else float(options.alpha)
    except (TypeError, ValueError):
        raise SqonnxError(f"alpha {options.alpha!r} is not a number from 0 to 1 or 'auto'") from None
    return QuantizeConfig(
        alpha=alpha, level=Level.O3 if level == AUTO else _enum(Level, level, "level"),
        per_token_where_needed=level == AUTO, target=_enum(Target, options.target, "target"),
        weights=_enum(Weights, options.weights, "weights"), per_channel=bool(options.per_channel),
        reduce_range=options.reduce_range, exclude=tuple(options.exclude or ()),
        keep_float_budget=options.keep_float_budget, calib_method=_enum(CalibMethod, options.calib_method,
                                                                        "calib_method"),
        rotate=options.rotate, smooth=bool(options.smooth),
        calibration=CalibrationConfig(num_samples=int(options.num_samples), seq_len=int(options.seq_len)))


def _enum(kind: type[enum.Enum], value: object, option: str) -> Any:
    try:
        return kind(str(value))
    except ValueError:
        raise SqonnxError(f"{option} {value!r} is not one of {', '.join(str(m.value) for m in kind)}") from None


def package_config() -> dict[str, Any]:
    """Olive's own package config with this pass added (Olive replaces its own with the one it is given)."""
    found = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    found["passes"][PASS_NAME] = {"module_path": f"sqonnx.olive_pass.{SqonnxQuantization.__name__}",
                                  "supported_providers": ["*"], "supported_accelerators": ["*"],
                                  "supported_precisions": ["*"], "dataset": "dataset_optional"}
    return found


if __name__ == "__main__":
    print(json.dumps(package_config(), indent=2))
