"""Reading jaxprs: every equation of a traced program, the sub-jaxprs of its loops, branches and calls included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def eqns(jaxpr: Any, inside_cond: bool = False) -> Iterator[tuple[Any, bool]]:
    """Every equation of a jaxpr with whether it sits inside a ``cond`` branch, sub-jaxprs included (a sub-jaxpr
    that several equations call is read once per call)."""
    for eqn in jaxpr.eqns:
        yield eqn, inside_cond
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner, inside_cond or eqn.primitive.name == "cond")
