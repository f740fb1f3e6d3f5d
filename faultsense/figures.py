"""Figures shared by training (logged to W&B) and the app (Insights). matplotlib is
imported inside the functions, so importing this module stays light."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure


def confusion_figure(
    matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str
) -> Figure:
    """Confusion matrix [n, n] (rows: true label, columns: predicted), counts in the cells.

    A bare `Figure`, not a pyplot one: nothing to close, safe in threads and headless.
    """
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=float)
    labels = list(labels)
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            color = "white" if counts[i, j] > counts.max() / 2 else "black"
            ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return fig


def rgba_image(fig: Figure) -> np.ndarray:
    """The figure rendered by Agg as uint8 RGBA [H, W, 4], for image loggers (W&B's own
    matplotlib path needs pyplot's global state; an array does not)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()
