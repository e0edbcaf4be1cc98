"""The generic defusion engine: detection, layout splitting, defused modules, pre-load plans.

Internal: plugins import the layouts and ``Candidate`` from :mod:`defuser.plugin`."""

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout

__all__ = ["Candidate", "DenseLayout", "ExpertsLayout", "ParallelLayout"]
