"""Result tables as markdown: the zoo's, the demo's, the export's and the experiments'."""

from __future__ import annotations


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts (one key per column, the first column names the row) as a markdown table;
    numbers right-aligned, floats to 3 decimals, missing values empty."""
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    numeric = [
        all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in cols
    ]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "".join("---:|" if n and i else "---|" for i, n in enumerate(numeric)),
    ]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
