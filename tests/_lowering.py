"""Reading lowered StableHLO: the control flow a compiled step will run, for tests that must see none on GPU."""

from __future__ import annotations

import re
from typing import Any

import jax


def lowered_text(fn: Any, *args: Any, platform: str) -> str:
    """``fn(*args)`` jitted and lowered for ``platform`` (no device of that kind is needed)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def runtime_control_flow(text: str) -> list[str]:
    """The loops and the conditionals whose branch is chosen at run time, in a lowered module.

    ``jax.lax.platform_dependent`` lowers to conditionals on constant indices, which XLA folds away at compile
    time; those are not counted. A ``lax.cond`` on data lowers to a ``stablehlo.case`` on a computed index.
    """
    found = [f"while {m}" for m in re.findall(r"(%[\w#:]+) = stablehlo\.while", text)]
    found += [f"if {m}" for m in re.findall(r"(%[\w#:]+) = \"?stablehlo\.if", text)]
    constant = set(re.findall(r"(%[\w]+) = stablehlo\.constant", text))
    for out, selector in re.findall(r'(%[\w]+)(?::\d+)? = "stablehlo\.case"\((%[\w#]+)\)', text):
        if selector.split("#")[0] in constant:
            constant.add(out)  # a case on a constant index is a constant too
        else:
            found.append(f"case {out} on {selector}")
    return found
