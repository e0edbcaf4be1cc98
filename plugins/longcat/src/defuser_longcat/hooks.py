"""Meituan LongCat-Flash: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="longcat",
    description="Meituan LongCat-Flash",
    model_types=[
        TypeSupport(
            "longcat_flash",
            notes=(
                "undecorated before 5.25.0, its identity (zero) experts kept; decorated from 5.25.0 "
                "(identity experts in the MoE block), read from its flags"
            ),
        ),
    ],
    # Before 5.25.0: undecorated, and routing indices past the routed experts are identity
    # ("zero") experts.  5.25.0 decorates the class and moves the identity experts out to
    # LongcatFlashMoE, so the flags describe it there (and this declaration no longer applies).
    experts_classes={"LongcatFlashExperts": {"identity_experts": lambda module: module.zero_expert_num}},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
