"""Build one block (or a whole small model) whose calibration statistics are known: smooth, plan, quantize.

The block is a model of its own (`streaming.runner.extract_block`). Three steps: the smoothing pass folds 1/s
(`smooth_block`), the planning step decides each group's level and range and each layer's format
(`run.planning`), and one pass manager inserts what the plan says (`write_block`). Where every layer is static,
the outlier channels smoothing leaves are split between the first two (`passes.split_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from sqonnx.calibrators import ActivationStats
from sqonnx.config import QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.formats import FORMATS, primary
from sqonnx.graph.layers import LinearLayer, find_linear_layers
from sqonnx.graph.tensors import HALF_TYPES, SHARED, opset_version
from sqonnx.judgements.layer_report import LayerReport
from sqonnx.judgements.quality import RotationJudge
from sqonnx.math.search import AlphaSearch
from sqonnx.math.smoothing import as_float32
from sqonnx.passes.float_islands import FloatIslandsPass
from sqonnx.passes.smooth import GroupResult, SmoothPass, SmoothPassResult, SmoothSettings
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from sqonnx.passes.split_channels import SplitChannelsPass, SplitResult
from sqonnx.passes.transposed import RestoreTransposedCopiesPass
from sqonnx.run.planning import BlockPlan, plan_block
from sqonnx.targets import rules_of

__all__ = ["Built", "build", "quantization_scheme", "smooth_block"]



@dataclass
class Built:
    """A smoothed and quantized block in memory, before it is saved."""

    model: ir.Model
    layer_reports: list[LayerReport]
    quantized: list[LinearLayer]  # the layers written in an integer format
    # see run.planning.BlockPlan
    sensitivity: dict[str, float]
    rotation_errors: dict[str, tuple[float, float]]


def build(model: ir.Model, config: QuantizeConfig, stats: ActivationStats, quantized: set[str],
          sensitivities: bool = False, rotation: RotationJudge | None = None,
          smoothing: QuantizeConfig | None = None) -> Built:
    """Smooth and quantize `model` (a fresh copy of a block) with its calibration statistics. `rotation`: judge
    the residual-stream rotation on the groups that read it. `smoothing`: the config whose choices the smoothing
    follows (a decode stage's: the prompt stage's, so both stages fold the same factors); None: `config`."""
    if not config.smooth_only:
        _weights_in_float32(model.graph, quantized)
    scheme = quantization_scheme(config, stats)
    originals = {layer.name: (layer.weight, layer.in_axis) for group in find_smoothing_groups(model.graph)
                 for layer in group.layers
                 if sensitivities or (rotation is not None and str(group.activation.name) in rotation.readers)}
    groups = smooth_block(model, config, stats, quantized, scheme) if smoothing is None else \
        smooth_block(model, smoothing, stats, quantized)
    if config.splits_channels:
        split = SplitChannelsPass(groups, stats, quantized, rotation.readers if rotation is not None else frozenset(),
                                  rules_of(config.target).half_qdq)(model)
        assert isinstance(split, SplitResult) and split.stats is not None
        groups, stats = split.groups, split.stats
    plan = plan_block(groups, config, stats, quantized, originals, scheme, rotation, sensitivities)
    write_block(model, plan, config)
    return Built(model, plan.layer_reports, [planned.layer for planned in plan.layers], plan.sensitivity,
                 plan.rotation_errors)


def quantization_scheme(config: QuantizeConfig, stats: ActivationStats) -> AlphaSearch:
    """How the layers will be quantized, as the error models judge it (α search, levels, explicit Muls)."""
    return AlphaSearch(stats.rows, config.alpha_grid, config.level, config.weight_qmax, config.per_channel,
                       config.calib_method, primary(config).search_block(config))


def smooth_block(model: ir.Model, config: QuantizeConfig, stats: ActivationStats, quantized: set[str],
                 scheme: AlphaSearch | None = None) -> list[GroupResult]:
    """Fold every group's smoothing into `model` as `quantize` does (`inspect` reports the very same choices).
    `scheme`: `quantization_scheme(config, stats)`, when the caller has it already."""
    if not config.smooth:
        return [GroupResult(g, None, "", "not smoothed: --no-smooth") for g in find_smoothing_groups(model.graph)]
    scheme = scheme or quantization_scheme(config, stats)
    # --smooth-only: the quantizer that takes over is not ours to judge; every exact fold is made.
    settings = SmoothSettings(0.0 if config.alpha_auto else float(config.alpha), config.unabsorbed,
                              scheme if config.alpha_auto else None, None if config.smooth_only else scheme)
    result = SmoothPass(stats, quantized, settings)(model)
    assert isinstance(result, SmoothPassResult)
    return result.groups


def write_block(model: ir.Model, plan: BlockPlan, config: QuantizeConfig) -> None:
    """Insert what the plan says, one pass manager over the block: float islands for half-precision layers whose type
    the target's integer path does not take (the 8-bit layers' first, then the 4-bit ones', as their names have
    always come), each format's insert pass in registry order, then the clean-up. The insert passes quantize a
    layer in its activation's type: float32 in an island, the model's half type where the target takes it."""
    opset = opset_version(model.graph)
    by_format = {id(fmt): [planned.item for planned in plan.layers if planned.format is fmt] for fmt in FORMATS}
    native = rules_of(config.target).half_qdq
    islands = [planned.layer for bits in (8, 4) for planned in plan.layers if planned.format.bits == bits
               and not (planned.format.bits == 8 and planned.layer.activation.dtype in native)]
    manager = ir.passes.PassManager([
        FloatIslandsPass(islands),
        *(fmt.insert(by_format[id(fmt)], config, opset) for fmt in FORMATS),
        RestoreTransposedCopiesPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    ])
    try:
        manager(model)
    except ir.passes.PassError as exc:  # the manager wraps what a pass raises: a user's error stays one line
        if isinstance(exc.__cause__, SqonnxError):
            raise exc.__cause__ from None
        raise


def _weights_in_float32(graph: ir.Graph, quantized: set[str]) -> None:
    """The float16 / bfloat16 weights of the layers about to be quantized, in float32: smoothing folds and
    quantization then compute in float32 without converting from and back to half at every step (a 7B FP16 model
    spent half its build time converting), and the quantizer replaces them anyway. A weight that another node
    reads too (a layer kept float, another block) stays as it is."""
    readers = {id(layer.node) for layer in find_linear_layers(graph) if layer.name in quantized}
    for layer in find_linear_layers(graph):
        value = layer.weight_value
        tensor = value.const_value
        if layer.name not in quantized or tensor is None or tensor.dtype not in HALF_TYPES or value.meta.get(SHARED):
            continue
        if value.is_graph_output() or any(use.idx != 1 or id(use.node) not in readers for use in value.uses()):
            continue
        value.const_value = ir.tensor(as_float32(tensor.numpy()), name=value.name)
        value.type = ir.TensorType(ir.DataType.FLOAT)

