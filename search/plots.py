"""matplotlib without a display (reports are written by servers and CI too), one way to save."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib without a display (reports are written by servers and CI too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
