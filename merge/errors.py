"""The one exception type a user sees: one line per problem, naming the culprit and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class EvomergeError(Exception):
    """Wrong input or an unusable environment: the CLI prints the message alone and exits 2."""


def schema_problems(err: ValidationError, source: str) -> str:
    """Every problem pydantic found, one line each: the file, the field path, what is wrong."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(dict.fromkeys(lines))
