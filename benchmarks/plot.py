"""The figure of benchmarks/speed.py: per size and dtype, each layer's forward bandwidth as a
fraction of the copy bandwidth, and its forward+backward time as a ratio to LowRankLinear.

matplotlib is optional and imported only when a plot is drawn: without it, ``plot_rows`` raises
``ModuleNotFoundError`` and the caller goes on without the figure.
"""

from pathlib import Path
from typing import Any

# The targets, drawn as dashed lines: forward at >= 80% of the copy bandwidth,
# forward+backward at <= 1.2x LowRankLinear.
FORWARD_COPY_TARGET = 0.8
FORWARD_BACKWARD_TARGET = 1.2


def plot_rows(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Save a two-panel bar chart of the rows (as written to the JSON) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    groups = list(dict.fromkeys(_group(row) for row in rows))
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    width = 0.8 / len(layers)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(groups)), 8), sharex=True)
    panels = (
        (top, "forward_copy_fraction", "forward, fraction of copy bandwidth", FORWARD_COPY_TARGET),
        (
            bottom,
            "forward_backward_vs_lowrank",
            "fwd+bwd time, x LowRankLinear",
            FORWARD_BACKWARD_TARGET,
        ),
    )
    for axes, key, label, target in panels:
        for index, layer in enumerate(layers):
            values = {_group(row): row[key] for row in rows if row["layer"] == layer}
            bars = [(g + index * width, values.get(group)) for g, group in enumerate(groups)]
            present = [(position, height) for position, height in bars if height]  # not skipped
            if present:
                axes.bar(*zip(*present), width, label=layer)
        axes.axhline(target, color="black", linestyle="--", linewidth=1)
        axes.set_ylabel(label)
    bottom.set_yscale("log")
    bottom.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    bottom.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    bottom.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    bottom.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    top.legend(fontsize=7, ncol=5)
    top.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _group(row: dict[str, Any]) -> str:
    """The x-axis label of a row's size and dtype."""
    return f"{row['size']}\n{row['dtype']}"
