"""Memory traffic of a compiled step, read off its optimized HLO: a load-independent companion to the timings.

A bandwidth-bound optimizer step costs what it moves. Every top-level instruction of a computation (a fusion, a
reduction, a copy) reads its operands and writes its result once, so the sum of those sizes, divided by the
parameter bytes, counts the passes over the parameters. Plain Adam is 10 (its mu, nu and parameter updates each
read and write); a norm clip needs one more (the norm must be read before anything is scaled); more than that means
some array is written out and read back, i.e. an unfused pass.

The branches of a ``conditional`` are counted apart, each conditional by its costliest branch: that is the rare
path of an overflow rescue, but the common one of a guard that runs the whole update inside a branch.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_BYTES |= {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_BRANCHES = re.compile(
    r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+))"
)
# Instructions that move no array data of their own: aliases, views, control.
_FREE = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "after-all", "partition-id", "replica-id"}


class Traffic(NamedTuple):
    """Bytes moved by the entry computation outside conditionals, and by the costliest branch of each conditional."""

    entry: int
    branches: int


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _BYTES.get(dtype, 4)
    return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """Every computation's body lines by name, and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = header.group(1)
                bodies[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            bodies[current].append(line)
    return bodies, entry


def _traffic(name: str, bodies: dict[str, list[str]]) -> Traffic:
    sizes: dict[str, int] = {}
    entry = branches = 0
    for line in bodies.get(name, []):
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        result, shape, opcode, rest = match.groups()
        sizes[result] = _shape_bytes(shape)
        if opcode in _FREE:
            continue
        if opcode == "conditional":
            found = _BRANCHES.search(rest)
            names = (
                []
                if found is None
                else re.findall(r"[\w.\-]+", found.group(1) or "") + [n for n in found.groups()[1:] if n]
            )
            branches += max((sum(_traffic(n, bodies)) for n in names), default=0)
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
        entry += sizes[result] + sum(sizes.get(operand, 0) for operand in operands)
    return Traffic(entry, branches)


def traffic(hlo: str) -> Traffic:
    """The bytes a compiled module's entry computation moves (see the module docstring)."""
    bodies, entry = _computations(hlo)
    return _traffic(entry, bodies) if entry else Traffic(0, 0)
