from pathlib import Path

import onnx_ir as ir

from sqonnx.passes.absorbers import LinearAbsorber, MulAbsorber, NormAbsorber
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from tests.synthetic import build_block


def _groups(path: Path) -> dict[str, object]:
    model = ir.load(path)
    return {"+".join(layer.name.split("/")[2] for layer in g.layers): g for g in find_smoothing_groups(model.graph)}


def test_groups_and_absorbers(block: Path) -> None:
    groups = _groups(block)
    assert set(groups) == {"q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"}
    assert isinstance(groups["q_proj+k_proj+v_proj"].absorber, MulAbsorber)  # Shape reader is harmless
    norm = groups["gate_proj+up_proj"].absorber
    assert isinstance(norm, NormAbsorber) and norm.bias_index == 2
    down = groups["down_proj"].absorber
    assert isinstance(down, LinearAbsorber)
    assert down.layer_name == "/mlp/up_proj/MatMul"
    assert [n.name for n, _ in down.path.channel_adds] == ["/mlp/up_proj/Add"]
    assert groups["o_proj"].absorber is None and "Add" in groups["o_proj"].reason


def test_no_absorber_when_activation_has_another_reader(tmp_path: Path) -> None:
    path = build_block(tmp_path / "m.onnx")
    model = ir.load(path)
    # Make the residual read the LayerNorm output too: folding into gamma would change it.
    residual = next(n for n in model.graph if n.name == "/residual/Add_1")
    layer_norm = next(n for n in model.graph if n.name == "/ln/LayerNorm")
    residual.replace_input_with(0, layer_norm.outputs[0])
    group = next(g for g in find_smoothing_groups(model.graph) if g.layers[0].name == "/mlp/gate_proj/MatMul")
    assert group.absorber is None and "/residual/Add_1" in group.reason
