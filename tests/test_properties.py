"""Property tests (hypothesis): filter semantics and gate/up splitting over random inputs.

* Filters: random module paths and random rule sets, whose regexes are generated from a
  small alphabet (words, digits, ``.``, ``\\.``, ``\\d``, classes, quantified single atoms,
  groups, alternation, anchors), are judged by :func:`defuser.filtering.compile_filter` exactly as
  by a reference predicate written from the documented rules with Python's ``re``.
* Layouts: for random :class:`ExpertsLayout` flags and sizes, splitting a fused gate-up
  tensor (and its bias) into gate and up and joining them back gives the fused tensor,
  each half holds the rows the layout assigns to it by meaning, and layouts the engine
  calls zero-copy give views of the fused storage.
"""

from __future__ import annotations

import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defuser.engine.candidates import ExpertsLayout
from defuser.engine.layout import join_gate_up, orient, split_gate_up
from defuser.filtering import compile_filter

FAST = settings(max_examples=150, deadline=None)

# --- filters ------------------------------------------------------------------------------

_WORDS = ["model", "layers", "mlp", "experts", "shared_experts", "thinker", "talker", "block_sparse_moe", "gate"]
_PATHS = st.lists(st.one_of(st.sampled_from(_WORDS), st.integers(0, 12).map(str)), min_size=1, max_size=7).map(".".join)


def _atoms() -> st.SearchStrategy[str]:
    literal = st.sampled_from([*_WORDS, "layer", "exp", "mo", "0", "1", "12", "_"])
    single = st.sampled_from([r"\.", ".", r"\d", "[0-9]", "[a-z]", r"\w"])
    # Quantifiers go on single atoms only: nested ones could backtrack for ages.
    quantified = st.tuples(single, st.sampled_from(["?", "*", "+", "{1,2}"])).map("".join)
    return st.one_of(literal, single, quantified)


def _regexes() -> st.SearchStrategy[str]:
    """Valid regexes, the same in PCRE and Python's ``re``, from a small safe alphabet."""

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        concatenated = st.lists(inner, min_size=2, max_size=3).map("".join)
        alternated = st.lists(inner, min_size=2, max_size=3).map(lambda parts: "(" + "|".join(parts) + ")")
        return st.one_of(concatenated, alternated)

    body = st.recursive(_atoms(), extend, max_leaves=6)
    anchors = st.tuples(st.sampled_from(["", "^", "(?:^|\\.)"]), body, st.sampled_from(["", "$", "(?:\\.|$)"]))
    return anchors.map("".join)


_RULES = st.lists(st.tuples(st.sampled_from(["", "+:", "-:"]), _regexes()).map("".join), min_size=0, max_size=5)


def reference_allows(rules: list[str] | None, path: str) -> bool:
    """The documented semantics: ``+:re`` and bare ``re`` include, ``-:re`` excludes, matched
    anywhere in the path; with a filter a path needs an include match and no exclude match
    (exclusion wins); no filter lets everything through."""
    if rules is None:
        return True
    includes = [rule[2:] if rule.startswith("+:") else rule for rule in rules if not rule.startswith("-:")]
    excludes = [rule[2:] for rule in rules if rule.startswith("-:")]
    if any(re.search(pattern, path) for pattern in excludes):
        return False
    return any(re.search(pattern, path) for pattern in includes)


@FAST
@given(rules=_RULES, paths=st.lists(_PATHS, min_size=1, max_size=8))
def test_filter_matches_the_reference_predicate(rules, paths):
    compiled = compile_filter(rules)
    for path in paths:
        assert compiled.allows(path) == reference_allows(rules, path), (rules, path)


@FAST
@given(rules=_RULES, path=_PATHS)
def test_exclusion_wins_and_no_filter_allows_everything(rules, path):
    assert compile_filter(None).allows(path)
    excluded = [*rules, f"-:^{re.escape(path)}$"]
    assert not compile_filter(excluded).allows(path)
    included = [*(rule for rule in rules if rule.startswith("-:")), f"+:{re.escape(path)}"]
    assert compile_filter(included).allows(path) == (not any(re.search(r[2:], path) for r in included[:-1]))


# --- gate/up split and join ------------------------------------------------------------------

_LAYOUTS = st.builds(
    ExpertsLayout,
    num_experts=st.integers(1, 4),
    is_concatenated=st.booleans(),
    gate_first=st.booleans(),
    is_transposed=st.booleans(),
    has_bias=st.booleans(),
)


def _rows_by_meaning(oriented: torch.Tensor, layout: ExpertsLayout, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up rows picked one by one from the documented layout rules (no slicing tricks)."""
    size = oriented.shape[dim] // 2
    gate_rows, up_rows = [], []
    for row in range(2 * size):
        if layout.is_concatenated:
            first_half = row < size
        else:
            first_half = row % 2 == 0
        is_gate = first_half == layout.gate_first
        (gate_rows if is_gate else up_rows).append(row)
    return oriented.index_select(dim, torch.tensor(gate_rows)), oriented.index_select(dim, torch.tensor(up_rows))


@FAST
@given(layout=_LAYOUTS, intermediate=st.integers(1, 5), hidden=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_split_then_join_is_identity(layout, intermediate, hidden, seed):
    generator = torch.Generator().manual_seed(seed)
    experts = layout.num_experts
    stored_shape = (experts, hidden, 2 * intermediate) if layout.is_transposed else (experts, 2 * intermediate, hidden)
    stored = torch.randn(stored_shape, generator=generator)
    oriented = orient(stored, layout.is_transposed)
    assert oriented.shape == (experts, 2 * intermediate, hidden)

    gate, up = split_gate_up(oriented, layout, dim=-2)
    assert gate.shape == up.shape == (experts, intermediate, hidden)
    expected_gate, expected_up = _rows_by_meaning(oriented, layout, dim=-2)
    assert torch.equal(gate, expected_gate) and torch.equal(up, expected_up)
    joined = join_gate_up(gate, up, layout, dim=-2)
    assert torch.equal(joined, oriented)
    assert torch.equal(orient(joined, layout.is_transposed), stored)
    if layout.zero_copy:
        storage = stored.untyped_storage().data_ptr()
        assert gate.untyped_storage().data_ptr() == storage == up.untyped_storage().data_ptr()
    # One expert's [I, H] slice is a dense matrix either way (what nn.Linear gets).
    assert gate[0].is_contiguous() and up[0].is_contiguous()

    if layout.has_bias:
        bias = torch.randn(experts, 2 * intermediate, generator=generator)
        gate_bias, up_bias = split_gate_up(bias, layout, dim=-1)
        expected_gate_bias, expected_up_bias = _rows_by_meaning(bias, layout, dim=-1)
        assert torch.equal(gate_bias, expected_gate_bias) and torch.equal(up_bias, expected_up_bias)
        assert torch.equal(join_gate_up(gate_bias, up_bias, layout, dim=-1), bias)
