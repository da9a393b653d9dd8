"""Custom PromQL scoped to its object's namespace (issue 12, item 8): the pure check, table-driven."""

from __future__ import annotations

import pytest

from voxscale.operator.queries import custom
from voxscale.operator.tenancy import scope_problem, unscoped_selectors


@pytest.mark.parametrize(
    ("query", "loose"),
    [
        ('sum(rate(x{namespace="$namespace",pod=~"$pods"}[1m]))', []),
        ('sum(x{namespace="$namespace"}) / sum(y{namespace="$namespace"}) > bool 2', []),
        ('max_over_time(x{namespace="$namespace"}[10m:1m]) or vector(0)', []),  # a literal reads no series
        ('label_replace(x{namespace="$namespace"}, "a", "$1", "b", "(.*)")', []),
        ("sum(rate(gateway_requests_total[1m]))", ["gateway_requests_total"]),
        ('x{namespace="other"}', ['x{namespace="other"}']),
        ('x{namespace=~"team-a|team-b"}', ['x{namespace=~"team-a|team-b"}']),
        ('x{namespace!="team-a"}', ['x{namespace!="team-a"}']),
        ('x{namespace="team-a"} + on() group_left y', ["y"]),
        ('count(count_over_time(z[5m:1m])) * x{namespace="team-a"}', ["z"]),
        ('{__name__=~"x.*"}', ['{__name__=~"x.*"}']),
    ],
)
def test_every_selector_must_be_pinned_to_the_objects_namespace(query: str, loose: list[str]) -> None:
    assert unscoped_selectors(custom(query, "team-a", "app"), "team-a") == loose


def test_the_refusal_names_the_loose_selectors_and_the_fix() -> None:
    why = scope_problem("sum(rate(a[1m])) + b + c + d", "team-a")
    assert why is not None
    assert "outside namespace team-a: a, b, c (+1 more)" in why and 'namespace="$namespace"' in why
    assert scope_problem("sum(", "team-a") == "is not valid PromQL (unclosed left parenthesis)"
    assert scope_problem('x{namespace="team-a"}', "team-a") is None


def test_a_namespace_value_that_needs_escaping_cannot_widen_the_scope() -> None:
    """Substitution escapes the value, so a namespace named like a regex still pins exactly."""
    q = custom('x{namespace="$namespace"}', 'a".*', "app")
    assert unscoped_selectors(q, 'a".*') == []
