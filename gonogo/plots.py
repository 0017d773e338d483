"""The one plotting module: matplotlib figures for the self-contained report, as PNG bytes.

Every stage's report draws with :func:`new_figure` and hands the figure to :func:`to_png`. The
figures are plain ``matplotlib.figure.Figure`` objects, not pyplot's: no global figure list to
leak from or to share between threads, and no display needed. The Agg backend is set here once,
for anything that still reaches pyplot.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)


def new_figure(width: float = 7.0, height: float = 3.6, dpi: float = 100) -> tuple[Figure, Any]:
    """A figure of ``width`` x ``height`` inches with one axes."""
    figure = Figure(figsize=(width, height), dpi=dpi)
    return figure, figure.add_subplot()


def to_png(figure: Figure, dpi: Optional[float] = None) -> bytes:
    """The figure laid out tightly, as PNG bytes (at the figure's own dpi unless ``dpi`` is given)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi if dpi is not None else "figure")
    return buffer.getvalue()
