"""Filter rule semantics: include/exclude, negative wins, clear errors."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from defuser.filtering import compile_filter

PATHS = [
    "model.layers.0.mlp.experts",
    "model.layers.1.mlp.experts",
    "model.layers.10.mlp",
    "thinker.layers.0.mlp.experts",
]


def test_no_rules_allows_everything():
    assert all(compile_filter(None).allows(p) for p in PATHS)


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [
        (["layers\\.0\\."], [PATHS[0], PATHS[3]]),
        (["+:layers\\.1"], [PATHS[1], PATHS[2]]),
        (["+:.*", "-:layers\\.1\\d*\\."], [PATHS[0], PATHS[3]]),
        (["-:thinker"], []),
        (["+:experts$", "-:^thinker"], [PATHS[0], PATHS[1]]),
    ],
)
def test_rules(rules, allowed):
    rule_set = compile_filter(rules)
    assert [p for p in PATHS if rule_set.allows(p)] == allowed


@pytest.mark.parametrize("bad", ["+:(", "-:[a-", "a{2,1}", "+:"])
def test_invalid_rule_names_the_rule(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        compile_filter(["+:fine", bad])


@pytest.mark.parametrize("bad", ["layers", 3, {"+:x"}])
def test_filter_must_be_a_list_of_strings(bad):
    with pytest.raises(TypeError):
        compile_filter(bad)
    with pytest.raises(TypeError):
        compile_filter([bad]) if not isinstance(bad, str) else compile_filter(bad)


def _reference(rules, path):
    import re

    positives = [r[2:] if r.startswith("+:") else r for r in rules if not r.startswith("-:")]
    negatives = [r[2:] for r in rules if r.startswith("-:")]
    if any(re.search(n, path) for n in negatives):
        return False
    return any(re.search(p, path) for p in positives)


_SEGMENTS = st.sampled_from(["layers", "0", "1", "12", "mlp", "experts", "thinker", "model"])
_RULES = st.lists(
    st.tuples(
        st.sampled_from(["", "+:", "-:"]),
        st.sampled_from(["layers\\.1", "experts$", "^model", "mlp", "thinker", "\\.0\\."]),
    ),
    min_size=1,
    max_size=4,
)


@given(path=st.lists(_SEGMENTS, min_size=1, max_size=6).map(".".join), rules=_RULES)
def test_matches_reference_predicate(path, rules):
    rule_strings = [prefix + pattern for prefix, pattern in rules]
    assert compile_filter(rule_strings).allows(path) == _reference(rule_strings, path)
