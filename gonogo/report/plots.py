"""Plot helpers: matplotlib figures to PNG bytes for the self-contained report."""

from __future__ import annotations

import io
from typing import Any


def new_figure(width: float = 7.0, height: float = 3.6) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width, height), dpi=100)
    return figure, axes


def to_png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
