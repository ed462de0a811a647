"""Calibration in tests goes through the product's own path: the model cut by `streaming.blocks.partition` (one
block: the test models are small), its samples run by `streaming.runner.calibrate_block`, the statistics every
smoothing group asks for (`passes.smoothing_groups.statistics_needed`), as `quantize` and `inspect` collect them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.calibrators.carry import Carry
from sqonnx.calibrators.data import CalibrationFeeds, DecodeChain
from sqonnx.graph.layers import find_linear_layers
from sqonnx.passes.smoothing_groups import find_smoothing_groups, statistics_needed
from sqonnx.streaming.blocks import partition
from sqonnx.streaming.generate import generate_tokens
from sqonnx.streaming.runner import (
    CARRY_MEMORY_BYTES,
    BlockRunner,
    Samples,
    calibrate_block,
    extract_block,
)

WHOLE = 1 << 62  # a block budget no test model reaches: the model is one block


def statistics(model: ir.Model, feeds: Iterable[dict[str, np.ndarray]], chains: Iterable[DecodeChain] = (), *,
               activations: dict[str, int] | None = None, keep_rows: int = 0) -> ActivationStats:
    """Statistics of `model` over `feeds` then `chains` (decode chains: a prompt, then single tokens on the cache).
    `activations`: value name -> channel count to collect; default: what the model's smoothing groups need."""
    samples = list(feeds)
    part = partition(model.graph, WHOLE)
    assert len(part.blocks) == 1, "a test model is calibrated as one block"
    block = part.blocks[0]
    fp = extract_block(model, block)
    probes = []
    if activations is None:
        every = {layer.name for layer in find_linear_layers(fp.graph)}
        request = statistics_needed(find_smoothing_groups(fp.graph), every)
        activations, probes = request.channel_max, request.probes
    source = CalibrationFeeds(len(samples), lambda: iter(samples), f"{len(samples)} test samples")
    runner = BlockRunner(part, Samples(source, 0, list(chains)))
    with tempfile.TemporaryDirectory(prefix="sqonnx-test-") as scratch:
        carry, references = (Carry(Path(scratch) / name, CARRY_MEMORY_BYTES) for name in ("carry", "references"))
        return calibrate_block(runner, block, fp, activations, probes, keep_rows, carry, set(), references,
                               lambda: None)


def teacher_forced(model: ir.Model, chains: list[DecodeChain], workdir: Path) -> list[DecodeChain]:
    """The decode chains with the FP model's own greedy tokens, generated as the front end does before calibrating."""
    return generate_tokens(model, partition(model.graph, WHOLE), chains, workdir, keep_sessions=True)
