"""Keep one tenant's custom PromQL inside its own namespace.

In a cluster-wide install anyone who may create a TTSDeployment writes PromQL that the operator runs
with its own Prometheus access, and the value comes back in the object's status. With scoping on
(`--scope-custom-queries`, the chart's default) a custom query runs only if every series selector in
it is pinned to the object's own namespace with `namespace="<ns>"` (write `namespace="$namespace"`)
- the rule prom-label-proxy enforces, checked on the parsed query rather than rewritten, so the user
sees the query that runs. Pure: the scaler calls `unscoped_selectors` before it queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import promql_parser

NAMESPACE_LABEL = "namespace"
# Attributes through which promql_parser's nodes hold their sub-expressions.
_CHILDREN = ("lhs", "rhs", "expr", "param", "vector_selector")


class UnparseableQuery(ValueError):
    """The query is not PromQL Prometheus would accept (the parser's message says where)."""


def unscoped_selectors(promql: str, namespace: str) -> list[str]:
    """The selectors of `promql` that are not pinned to `namespace` (empty: the query is scoped).

    A selector counts as pinned only with an equality matcher `namespace="<namespace>"` and no `or`
    alternatives; `=~`, `!=` and a missing matcher all may read other namespaces.
    """
    try:
        tree = promql_parser.parse(promql)
    except (ValueError, TypeError) as exc:
        raise UnparseableQuery(str(exc)) from exc
    return [_text(sel) for sel in _selectors(tree) if not _pinned(sel, namespace)]


def _selectors(node: Any) -> Iterator[Any]:
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    for attr in _CHILDREN:
        child = getattr(node, attr, None)
        if child is not None:
            yield from _selectors(child)
    for arg in getattr(node, "args", None) or ():
        yield from _selectors(arg)


def _pinned(selector: Any, namespace: str) -> bool:
    matchers = selector.matchers
    if matchers.or_matchers:
        return False
    return any(
        m.name == NAMESPACE_LABEL and m.op == promql_parser.MatchOp.Equal and m.value == namespace
        for m in matchers.matchers
    )


def _text(selector: Any) -> str:
    return str(selector.prettify())


def scope_problem(promql: str, namespace: str) -> str | None:
    """Why a custom query may not run under scoping, as prose for the trigger's condition; None if it may."""
    try:
        loose = unscoped_selectors(promql, namespace)
    except UnparseableQuery as exc:
        return f"is not valid PromQL ({exc})"
    if not loose:
        return None
    shown = ", ".join(loose[:3]) + (f" (+{len(loose) - 3} more)" if len(loose) > 3 else "")
    return (
        f"reads series outside namespace {namespace}: {shown}; this operator runs custom queries only with "
        f'every selector pinned to the object\'s namespace - add namespace="$namespace" to each'
    )
