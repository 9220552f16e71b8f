"""PNGs of the trials, with matplotlib (the ``plot`` extra: ``pip install 'vballoon[plot]'``).

Without matplotlib a plot is skipped and the caller says how to get it; nothing else
depends on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What to tell a user who has no matplotlib.
HOW_TO_GET = "install matplotlib (pip install 'vballoon[plot]') for the PNG"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_bytes_sent(rows: Sequence[dict[str, Any]], title: str, path: Path) -> Path | None:
    """Bytes sent over time, one line per variant (``row["sent_over_time"]``: (s, bytes)).

    :return: the PNG's path, or None without matplotlib.
    """
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for row in rows:
        points = row.get("sent_over_time") or []
        if not points:
            continue
        xs = [t for t, _ in points]
        ys = [b / (1 << 20) for _, b in points]
        ax.plot(xs, ys, label=f"{row['variant']} ({ys[-1]:.0f} MiB)", linewidth=1.6)
    ax.set_xlabel("seconds since the migration started")
    ax.set_ylabel("MiB sent (query-migrate ram.transferred)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
