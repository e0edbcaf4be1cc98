"""Module paths that ModelCloud's Defuser exposes and tools written against it import.

Only :mod:`defuser.modeling.replace_modules` (``materialize_model``, imported by GPTQModel) is
provided; defuser's own API lives in :mod:`defuser`.
"""

__all__: list[str] = []
