"""The layouts' one description of their fused tensors (``tensors()``): names, roles,
orientation and the per-expert keys each splits into, which defusion, the load-time split,
the pre-load converters, the offline split and fusing back all read."""

import pytest

from defuser.engine.candidates import DenseLayout, ExpertsLayout, FusedTensor, ParallelLayout
from defuser.engine.fuse import fused_names

DBRX_FIELDS = dict(
    separate_gate_up=True,
    flattened=True,
    gate_name="mlp.w1",
    up_name="mlp.v1",
    down_name="mlp.w2",
    down_transposed=True,
)


def _summary(tensors: tuple[FusedTensor, ...]) -> list[tuple[str, str, tuple[str, ...], bool, bool]]:
    return [(t.name, t.role, t.projections, t.is_bias, t.transposed) for t in tensors]


def test_decorated_gated_layout_with_bias():
    layout = ExpertsLayout(num_experts=4, has_bias=True, is_transposed=True)
    assert _summary(layout.tensors()) == [
        ("gate_up_proj", "gate_up", ("gate_proj", "up_proj"), False, True),
        ("down_proj", "down", ("down_proj",), False, True),
        ("gate_up_proj_bias", "gate_up_bias", ("gate_proj", "up_proj"), True, False),
        ("down_proj_bias", "down_bias", ("down_proj",), True, False),
    ]
    gate_up = layout.tensor("gate_up_proj")
    assert gate_up is not None and gate_up.is_gate_up
    assert gate_up.keys("model.layers.0.mlp.experts", 3) == (
        "model.layers.0.mlp.experts.3.gate_proj.weight",
        "model.layers.0.mlp.experts.3.up_proj.weight",
    )
    assert layout.tensor("down_proj_bias").load_target == "0.down_proj.bias"
    assert layout.tensor("up_proj") is None


def test_ungated_layout_reads_up_and_down():
    layout = ExpertsLayout(num_experts=2, has_gate=False, has_bias=True)
    assert [(t.name, t.role) for t in layout.tensors()] == [
        ("up_proj", "up"),
        ("down_proj", "down"),
        ("up_proj_bias", "up_bias"),
        ("down_proj_bias", "down_bias"),
    ]
    assert [t.load_target for t in layout.tensors()] == [
        "0.up_proj.weight",
        "0.down_proj.weight",
        "0.up_proj.bias",
        "0.down_proj.bias",
    ]


def test_declared_separate_dotted_layout_orients_down_on_its_own():
    layout = ExpertsLayout(num_experts=3, **DBRX_FIELDS)
    assert _summary(layout.tensors()) == [
        ("mlp.w1", "gate", ("gate_proj",), False, False),
        ("mlp.v1", "up", ("up_proj",), False, False),
        ("mlp.w2", "down", ("down_proj",), False, True),
    ]
    assert fused_names(layout) == ["mlp.w1", "mlp.v1", "mlp.w2"]
    assert layout.tensor("mlp.v1").keys("blocks.1.ffn.experts", 2) == ("blocks.1.ffn.experts.2.up_proj.weight",)


def test_dense_layout_has_no_expert_index():
    tensors = DenseLayout(fused_name="fc1").tensors()
    expected = [("fc1.weight", "dense", False), ("fc1.bias", "dense", True)]
    assert [(t.name, t.role, t.is_bias) for t in tensors] == expected
    assert tensors[1].keys("mlp") == ("mlp.gate_proj.bias", "mlp.up_proj.bias")
    assert tensors[0].keys("") == ("gate_proj.weight", "up_proj.weight")
    assert tensors[0].load_target == "gate_proj.weight"


@pytest.mark.parametrize("transposed", [False, True])
def test_parallel_layout_is_one_linear_per_expert(transposed: bool):
    (tensor,) = ParallelLayout(weight_name="w", transposed=transposed).tensors()
    assert (tensor.name, tensor.role, tensor.transposed) == ("w", "parallel", transposed)
    assert tensor.keys("moe.input_linear", 5) == ("moe.input_linear.5.linear.weight",)


@pytest.mark.subprocess
def test_defusion_modules_do_not_import_fusing_back():
    """Defusion (experts, dense, parallel) takes skeletons from defuser.engine.skeleton; fusing
    back imports defusion's modules, never the other way round."""
    import subprocess
    import sys

    code = (
        "import sys, defuser.engine.experts, defuser.engine.dense, defuser.engine.parallel; "
        "print('defuser.engine.fuse' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
