"""A third-party family whose model classes its own package registers with transformers:
the plugin names that package (``model_code``) and the ``defuser`` command imports it first."""

import sys
import textwrap

import pytest

from defuser.cli import main
from defuser.plugin import Family, TypeSupport, isolated_plugins

_MODEL_CODE = textwrap.dedent(
    """
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM


    class AcmeMoeConfig(Qwen3MoeConfig):
        model_type = "acme_moe"


    class AcmeMoeForCausalLM(Qwen3MoeForCausalLM):
        config_class = AcmeMoeConfig


    AutoConfig.register("acme_moe", AcmeMoeConfig)
    AutoModelForCausalLM.register(AcmeMoeConfig, AcmeMoeForCausalLM)
    """
)


@pytest.fixture
def acme_package(tmp_path, monkeypatch):
    """``acme_models`` on the path, not imported yet; transformers' registries put back after."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    (tmp_path / "acme_models.py").write_text(_MODEL_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "acme_models" not in sys.modules
    yield "acme_models"
    sys.modules.pop("acme_models", None)
    CONFIG_MAPPING._extra_content.pop("acme_moe", None)
    for config_class in [c for c in MODEL_FOR_CAUSAL_LM_MAPPING._extra_content if c.__name__ == "AcmeMoeConfig"]:
        MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(config_class)


def test_the_demo_runs_on_a_family_registered_by_its_own_package(acme_package, capsys):
    plugin = Family("acme", [TypeSupport("acme_moe")], model_code=[acme_package])
    with isolated_plugins(plugin):
        assert main(["demo", "--model-type", "acme_moe"]) == 0
    out = capsys.readouterr().out
    assert "AcmeMoeForCausalLM" in out and "model.layers.0.mlp.experts.0..7: gate_proj" in out
    assert float(out.rsplit("before/after:", 1)[1]) <= 1e-5


def test_without_model_code_the_type_is_unknown(acme_package, capsys):
    with isolated_plugins(Family("acme", [TypeSupport("acme_moe")])):
        assert main(["demo", "--model-type", "acme_moe"]) == 2
    assert "acme_moe" in capsys.readouterr().err
    assert "acme_models" not in sys.modules


def test_model_code_that_fails_to_import_is_one_line_naming_the_plugin(capsys):
    with isolated_plugins(Family("acme", [TypeSupport("acme_moe")], model_code=["no_such_acme_package"])):
        assert main(["demo", "--model-type", "qwen3_moe"]) == 1
    err = capsys.readouterr().err
    assert "plugin 'acme'" in err and "defuser_register_models" in err and "no_such_acme_package" in err


def test_model_code_must_name_modules():
    from defuser.plugin import DeclarationError

    with pytest.raises(DeclarationError, match="model_code holds 'acme-models'"):
        Family("acme", [TypeSupport("acme_moe")], model_code=["acme-models"])


def test_the_testkit_registers_model_code_before_deriving_cases(acme_package):
    from defuser_testkit.conformance import cases_for

    cases, unavailable = cases_for(Family("acme", [TypeSupport("acme_moe")], model_code=[acme_package]))
    assert list(cases) == ["acme_moe"] and unavailable == {}
    assert acme_package in sys.modules


_PACKAGE_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn
    from transformers.models.qwen3_moe import modeling_qwen3_moe as q

    from .config import Acme2Config


    class Acme2Experts(nn.Module):  # undecorated: input-major, the up half first
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
            self.w_in = nn.Parameter(torch.empty(e, h, 2 * i))
            self.w_out = nn.Parameter(torch.empty(e, i, h))
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for expert in range(self.num_experts):
                token, pos = torch.where(top_k_index == expert)
                up, gate = (hidden_states[token] @ self.w_in[expert]).chunk(2, dim=-1)
                y = (self.act_fn(gate) * up) @ self.w_out[expert]
                out.index_add_(0, token, y * top_k_weights[token, pos, None])
            return out


    class Acme2ForCausalLM(q.Qwen3MoeForCausalLM):
        config_class = Acme2Config

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp.experts = Acme2Experts(config)
            self.post_init()

        def _init_weights(self, module):
            super()._init_weights(module)
            if isinstance(module, Acme2Experts):
                nn.init.normal_(module.w_in, std=0.02)
                nn.init.normal_(module.w_out, std=0.02)
    """
)


@pytest.fixture
def acme2_package(tmp_path, monkeypatch):
    """``acme2_pkg``: config and model in modules not named as transformers names them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    package = tmp_path / "acme2_pkg"
    package.mkdir()
    (package / "config.py").write_text(
        "from transformers import Qwen3MoeConfig\n\n\nclass Acme2Config(Qwen3MoeConfig):\n"
        '    model_type = "acme2_moe"\n'
    )
    (package / "model.py").write_text(_PACKAGE_MODEL)
    (package / "__init__.py").write_text(
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "from .config import Acme2Config\nfrom .model import Acme2ForCausalLM\n"
        'AutoConfig.register("acme2_moe", Acme2Config)\n'
        "AutoModelForCausalLM.register(Acme2Config, Acme2ForCausalLM)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "acme2_pkg"
    for name in [n for n in sys.modules if n == "acme2_pkg" or n.startswith("acme2_pkg.")]:
        sys.modules.pop(name)
    CONFIG_MAPPING._extra_content.pop("acme2_moe", None)
    for config_class in [c for c in MODEL_FOR_CAUSAL_LM_MAPPING._extra_content if c.__name__ == "Acme2Config"]:
        MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(config_class)


def test_preload_patches_a_registered_family_whatever_its_modules_are_named(acme2_package):
    from transformers import AutoModelForCausalLM

    from defuser import replace_fused_blocks, restore_fused_blocks
    from defuser.plugin import tiny_config

    declaration = {"gate_up_name": "w_in", "down_name": "w_out", "is_transposed": True, "gate_first": False}
    plugin = Family(
        "acme2", [TypeSupport("acme2_moe")], experts_classes={"Acme2Experts": declaration}, model_code=[acme2_package]
    )
    with isolated_plugins(plugin):
        plugin.defuser_register_models()
        try:
            assert replace_fused_blocks("acme2_moe") is True
            model = AutoModelForCausalLM.from_config(tiny_config("acme2_moe"))
            assert type(model.model.layers[0].mlp.experts).__name__ == "DefusedAcme2Experts"
        finally:
            restore_fused_blocks()
