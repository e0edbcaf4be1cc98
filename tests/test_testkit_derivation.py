"""What the testkit derives from a declaration: which cases exist and which patch before load
on the installed transformers."""

import transformers
from packaging.version import Version

from defuser.plugin import Family, TypeSupport
from defuser_testkit.conformance import cases_for, preload_for


def _next_release() -> str:
    installed = Version(transformers.__version__)
    return f"{installed.major}.{installed.minor + 1}.0"


def test_preload_leaves_out_types_declared_from_a_later_release():
    later = _next_release()
    family = Family(
        "derive",
        [
            TypeSupport("qwen3_moe"),
            TypeSupport("mixtral", min_transformers=later),
            TypeSupport("qwen2_moe", preload_min_transformers=later),
            TypeSupport("olmoe", preload=False),
        ],
    )
    # A hand-built case for a type the declaration claims only from a later release is not
    # expected to patch before load here (qwen3_omni_moe_talker_text's case on 5.3.0: that
    # transformers has no such model type, so replace_fused_blocks has nothing to patch).
    assert preload_for(family, ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"]) == {"qwen3_moe"}
    cases, unavailable = cases_for(family)
    assert set(cases) == {"qwen3_moe", "qwen2_moe", "olmoe"}
    assert later in unavailable["mixtral"]
