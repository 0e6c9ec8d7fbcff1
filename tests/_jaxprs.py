"""Reading jaxprs: every equation of a traced program, the sub-jaxprs of its loops, branches and calls included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, sub-jaxprs included (a sub-jaxpr that several equations call is read once per
    call)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner)
