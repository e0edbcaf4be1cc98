"""Meituan LongCat-Flash: the model types this plugin claims, and what differs from the generic engine."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="longcat",
    description="Meituan LongCat-Flash",
    model_types=[
        TypeSupport(
            "longcat_flash",
            preload=True,
            reload="replace_fused_blocks",
            notes="undecorated; identity (zero) experts kept",
        ),
    ],
    # Routing indices past the routed experts are identity ("zero") experts.
    experts_classes={"LongcatFlashExperts": {"identity_experts": lambda module: module.zero_expert_num}},
)
