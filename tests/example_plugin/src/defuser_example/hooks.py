"""The plugin object published under the ``defuser`` entry-point group.

Imported by defuser's plugin manager on first use, so it imports no model code: the toy
model's experts are recognised by class name.  ``ToyMoeExperts`` carries no
``@use_experts_implementation`` flags, so defuser's generic engine cannot read its layout;
the declaration below states it in :class:`defuser.plugin.ExpertsLayout` terms.
"""

from __future__ import annotations

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="example",
    model_types=[TypeSupport("toy_moe", notes="input-major experts, up half first (example plugin)")],
    experts_classes={
        "ToyMoeExperts": {
            "gate_up_name": "w_in",  # [E, H, 2I]: input-major, so transposed against nn.Linear
            "down_name": "w_out",  # [E, I, H]
            "is_transposed": True,
            "gate_first": False,  # the up half comes first
        },
    },
    transformers=">=5.3.0",
    core=">=0.1,<1",
    description="example third-party plugin (tests/example_plugin)",
)
