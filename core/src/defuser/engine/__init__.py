"""The generic defusion engine: detection, layout splitting, defused modules, pre-load plans."""

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout

__all__ = ["Candidate", "DenseLayout", "ExpertsLayout"]
