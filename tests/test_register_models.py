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

