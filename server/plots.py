"""Every picture the service draws, in one module: the API serves them (``/v1/results/figure4.png``,
``/v1/jobs/{id}/plots/...``) and the CLI writes what the API serves.

Each function takes plain data as the API returns it (dicts and lists) and returns a
:class:`matplotlib.figure.Figure`; :func:`render` turns a figure into PNG or SVG bytes.

* :func:`figure4`: test accuracy (%) against the labelled ratio, a line per method variant (and per
  evaluation), mean with a band of one standard deviation over seeds (Figure 4 of the InCo paper).
* :func:`training_curves`: a panel per metric (loss, BID, DWV, DWV weight, kNN accuracy, ...), a line
  per stage (``pretrain``, ``finetune 1:16``, ...).
* :func:`confusion`: the confusion matrix of one result row, counts in the cells, per-class recall
  beside the rows, accuracy in the title.
* :func:`embedding_map`: a 2-D map (t-SNE) of a backbone's embedding of test images, a colour per class.
* :func:`trials`: each trial's validation accuracy, and each searched parameter against it.

Figures are built on :class:`~matplotlib.figure.Figure` with the Agg canvas, never ``pyplot``: there is
no global registry of figures, so API threads draw at once without sharing state. Accuracies are
drawn in percent (the stored fractions x 100).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from inco_core.config import METHODS
from inco_core.errors import ConfigError, DataError
from server.errors import NotFound

# the ids in an SVG are hashes salted with this (a random salt otherwise): the same figure, the same bytes
matplotlib.rcParams["svg.hashsalt"] = "inco"

FORMATS = {"png": "image/png", "svg": "image/svg+xml"}
"""The formats :func:`render` writes, with their media types."""
DPI = 100
WIDTH = 9.0
"""Inches: 900 pixels at :data:`DPI`."""
METRIC_LABELS = {
    "loss": "loss",
    "bid": "BID loss (instance discrimination)",
    "dwv": "DWV loss (views of an image)",
    "dwv_weight": "DWV weight w(t)",
    "knn": "kNN accuracy (labelled training images)",
    "z_std": "std of the normalised embedding",
    "score": "validation accuracy",
    "lr": "learning rate",
    "img_per_s": "images / s",
}
"""Panel titles of the metric keys the training loops report (inco_core.train, inco_core.evaluate);
the panels come in this order, keys not named here after them, by name."""
STATUS_COLOURS = {"completed": "tab:green", "stopped": "tab:orange", "running": "tab:blue", "failed": "tab:red"}
EVAL_STYLES = {"finetune": "-", "linear": "--"}


def ratio_n(ratio: str) -> int:
    """16 for ``"1:16"``; ratios that do not parse sort first."""
    try:
        return int(ratio.split(":")[1])
    except (IndexError, ValueError):
        return 1 << 30


def colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct RGBA colours: tab10 for up to 10, tab20 for up to 20, then repeated."""
    name = "tab10" if n <= 10 else "tab20"
    cmap = matplotlib.colormaps[name]
    size = 10 if name == "tab10" else 20
    return [tuple(cmap(i % size)) for i in range(n)]  # type: ignore[misc]


def _figure(height: float = 6.0, width: float = WIDTH) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render(fig: Figure, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes; the same figure gives the same bytes (no dates or versions
    written, fixed SVG ids). Raises :class:`ConfigError` for another format."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be png or svg (got {fmt!r})")
    buf = io.BytesIO()
    metadata: dict[str, str | None] = (
        {"Software": None} if fmt == "png" else {"Date": None, "Creator": None, "Format": None, "Type": None}
    )
    fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()


# -- Figure 4: accuracy against the labelled ratio ---------------------------------------------------
_CELL_FIELDS = ("dataset", "preset", "setup", "eval")


def _method_rank(row: Mapping[str, Any]) -> int:
    return METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS)


def figure4(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Test accuracy (%) against the labelled ratio, from leaderboard rows (``GET /v1/results``: dataset,
    preset, setup, method, variant, ratio, eval, mean, std, count, seeds).

    The x axis holds the ratios present, fewest labels first (1:32, 1:16, ..., 1:2), at even steps.
    A line per method variant, evaluation, data set, preset and setup: its y values are the means x 100
    and the band around it mean +- std (sample std over seeds; 0 for one seed). What all rows share is
    named in the title, what differs in the legend."""
    if not rows:
        raise NotFound("no results to draw: submit a job (inco submit), or loosen the filters")
    ratios = sorted({r["ratio"] for r in rows}, key=ratio_n, reverse=True)
    x_of = {ratio: i for i, ratio in enumerate(ratios)}
    varying = [f for f in _CELL_FIELDS if len({r.get(f, "") for r in rows}) > 1]
    lines: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (_method_rank(r), r["variant"], *(str(r.get(f, "")) for f in _CELL_FIELDS))):
        lines.setdefault((r["variant"], *(r.get(f, "") for f in varying)), []).append(r)
    variants = list(dict.fromkeys(key[0] for key in lines))
    palette = dict(zip(variants, colours(len(variants)), strict=True))
    fig = _figure()
    ax = fig.add_subplot()
    for key, cells in lines.items():
        cells = sorted(cells, key=lambda c: x_of[c["ratio"]])
        xs = np.array([x_of[c["ratio"]] for c in cells], dtype=float)
        mean = np.array([100 * c["mean"] for c in cells])
        std = np.array([100 * c["std"] for c in cells])
        counts = sorted({int(c["count"]) for c in cells})
        seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        extra = [str(v) or "preset defaults" for f, v in zip(varying, key[1:], strict=True)]
        label = " · ".join([key[0], *extra]) + f" (n={seeds})"
        ev = cells[0]["eval"]
        colour = palette[key[0]]
        ax.plot(xs, mean, marker="o", color=colour, linestyle=EVAL_STYLES.get(ev, ":"), label=label)
        band_x = xs if len(xs) > 1 else np.array([xs[0] - 0.12, xs[0] + 0.12])
        band_lo = mean - std if len(xs) > 1 else np.repeat(mean - std, 2)
        band_hi = mean + std if len(xs) > 1 else np.repeat(mean + std, 2)
        ax.fill_between(band_x, band_lo, band_hi, color=colour, alpha=0.18, linewidth=0, label=f"_band {label}")
    ax.set_xticks(range(len(ratios)), labels=ratios)
    ax.set_xlim(-0.4, len(ratios) - 0.6)
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 101.0))
    ax.set_xlabel("labelled ratio (labelled : all training images)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    shared = [f"{f}: {rows[0].get(f, '') or 'preset defaults'}" for f in _CELL_FIELDS if f not in varying]
    ax.set_title("Test accuracy against the labelled ratio (Figure 4)\n" + " · ".join(shared), fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="mean ± 1 std over n seeds", fontsize=9)
    return fig


# -- training curves --------------------------------------------------------------------------------
def _metric_order(keys: set[str]) -> list[str]:
    known = [k for k in METRIC_LABELS if k in keys]
    return known + sorted(keys - set(known))


def _grid(n: int) -> tuple[int, int]:
    cols = 1 if n == 1 else 2 if n <= 4 else 3
    return math.ceil(n / cols), cols


def training_curves(metrics: Sequence[Mapping[str, Any]], *, title: str = "Training curves") -> Figure:
    """A panel per metric key, a line per stage, from metric rows (``GET /v1/jobs/{id}/metrics``: stage,
    epoch, epochs, values). A stage's line in a panel is its epochs and its values of that key, in epoch
    order (stages that never report the key have no line there)."""
    if not metrics:
        raise NotFound("no metrics to draw: plots appear once a job's first epoch ends")
    stages = list(dict.fromkeys(m["stage"] for m in metrics))
    keys = _metric_order({k for m in metrics for k in m["values"]})
    if not keys:
        raise NotFound("the metrics carry no values to draw")
    rows, cols = _grid(len(keys))
    palette = dict(zip(stages, colours(len(stages)), strict=True))
    legend_rows = math.ceil(len(stages) / 4)
    fig = _figure(height=max(4.0, 2.7 * rows + 0.9 + 0.22 * legend_rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        for stage in stages:
            points = sorted(
                (m["epoch"], m["values"][key]) for m in metrics if m["stage"] == stage and key in m["values"]
            )
            if not points:
                continue
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, values, color=palette[stage], marker="o" if len(points) <= 30 else None, ms=3, label=stage)
        ax.set_title(METRIC_LABELS.get(key, key), fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: tick 1, not 0.95..1.05
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=palette[s], marker="o", ms=3, label=s) for s in stages]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(stages)), fontsize=9, title="stage")
    fig.suptitle(title, fontsize=11)
    return fig


# -- confusion matrix ----------------------------------------------------------------------------------
def confusion(row: Mapping[str, Any]) -> Figure:
    """The confusion matrix of one result row (``GET /v1/jobs/{id}/results``: classes, confusion_matrix
    [true][pred], per_class_recall, accuracy, ...): a heat map of the counts with each count written in
    its cell, each true class's recall beside its row and the accuracy in the title."""
    classes = list(row["classes"])
    matrix = np.asarray(row["confusion_matrix"], dtype=int)
    k = len(classes)
    if k == 0 or matrix.shape != (k, k):
        raise DataError(
            f"the result's confusion matrix is {'x'.join(map(str, matrix.shape))} but it names {k} classes: "
            "the row is damaged; run the job again"
        )
    recall = row.get("per_class_recall") or {}
    fig = _figure(height=max(5.5, 0.55 * k + 2.5))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    dark = matrix.max() / 2 if matrix.max() else 1
    for i in range(k):
        for j in range(k):
            colour = "white" if matrix[i, j] > dark else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=colour, fontsize=10)
    ax.set_xticks(range(k), labels=classes, rotation=30, ha="right")
    ax.set_yticks(range(k), labels=[f"{c}  (recall {_percent(recall.get(c))})" for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    what = " · ".join(str(row[f]) for f in ("variant", "ratio", "eval") if row.get(f))
    seed = f" · seed {row['seed']}" if row.get("seed") is not None else ""
    total = int(matrix.sum())
    ax.set_title(f"{what}{seed}\ntest accuracy {_percent(row.get('accuracy'))} on {total} test images", fontsize=11)
    fig.colorbar(image, ax=ax, label="test images", shrink=0.8)
    return fig


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -- embedding map ---------------------------------------------------------------------------------------
def embedding_map(data: Mapping[str, Any]) -> Figure:
    """A point per image at its 2-D position, coloured by its class (colour i of :func:`colours` for
    class i), from ``points`` ([[x, y], ...]), ``labels`` (class index per point), ``classes`` (names)
    and ``title``."""
    points = np.asarray(data["points"], dtype=float).reshape(-1, 2)
    labels = np.asarray(data["labels"], dtype=int)
    classes = list(data["classes"])
    if not len(points):
        raise NotFound("no images to draw")
    if len(labels) != len(points):
        raise DataError(f"{len(points)} points but {len(labels)} labels: the map is damaged; ask for it again")
    palette = colours(len(classes))
    fig = _figure()
    ax = fig.add_subplot()
    for c, name in enumerate(classes):
        mine = labels == c
        ax.scatter(
            points[mine, 0],
            points[mine, 1],
            s=14,
            color=palette[c],
            alpha=0.85,
            edgecolors="none",
            label=f"{name} ({int(mine.sum())})",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(str(data.get("title", "Embedding of the test images")), fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class (images)", markerscale=1.8, fontsize=9)
    return fig


# -- tune trials --------------------------------------------------------------------------------------
def _short(param: str) -> str:
    return param.rsplit(".", 1)[-1]


def _positions(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numbers as they are; anything else as categories at 0, 1, ... (with their labels)."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    names = sorted({str(v) for v in values})
    return [float(names.index(str(v))) for v in values], names


def trials(rows: Sequence[Mapping[str, Any]], *, title: str = "Tune trials") -> Figure:
    """The trials of a tune job (``GET /v1/jobs/{id}/trials``: number, params, status, score, ...).

    First panel: each scored trial's validation accuracy (%) against its number, coloured by status;
    trials without a score (failed, or not scored yet) are marked with an x at the bottom. Then a panel
    per searched parameter: each scored trial at (its value, its accuracy), in trial-number order;
    a learning rate spanning 10x or more is drawn on a log axis."""
    if not rows:
        raise NotFound("no trials to draw: they appear once the search starts")
    ordered = sorted(rows, key=lambda t: t["number"])
    scored = [t for t in ordered if t.get("score") is not None]
    unscored = [t for t in ordered if t.get("score") is None]
    params = sorted({p for t in ordered for p in t["params"]})
    rows_, cols = _grid(1 + len(params))
    fig = _figure(height=max(4.5, 3.2 * rows_ + 0.8))
    axes = fig.subplots(rows_, cols, squeeze=False).ravel()
    face = [to_rgba(STATUS_COLOURS.get(t["status"], "tab:gray")) for t in scored]
    scores = [100 * t["score"] for t in scored]
    ax = axes[0]
    if scored:
        ax.scatter([t["number"] for t in scored], scores, c=face, s=36, zorder=3)
        best = max(scored, key=lambda t: (t["status"] == "completed", t["score"]))
        ax.annotate(
            "best", (best["number"], 100 * best["score"]), textcoords="offset points", xytext=(6, 6), fontsize=9
        )
    if unscored:
        ax.scatter(
            [t["number"] for t in unscored],
            [0.04] * len(unscored),
            transform=ax.get_xaxis_transform(),
            marker="x",
            color="tab:red",
            s=40,
            zorder=3,
        )
    numbers = [t["number"] for t in ordered]
    ax.set_xlim(min(numbers) - 0.6, max(numbers) + 0.6)  # the x marks do not widen the axis themselves
    ax.set_title("validation accuracy per trial", fontsize=10)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, param in zip(axes[1:], params, strict=False):
        have = [i for i, t in enumerate(scored) if param in t["params"]]
        xs, names = _positions([scored[i]["params"][param] for i in have])
        ax.scatter(xs, [scores[i] for i in have], c=[face[i] for i in have], s=36, zorder=3)
        if names is not None:
            ax.set_xticks(range(len(names)), labels=names)
        elif all(isinstance(scored[i]["params"][param], int) for i in have):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif _short(param) == "lr" and xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        if not have:
            ax.text(0.5, 0.5, "no scored trial yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{_short(param)} ({param})", fontsize=10)
        ax.set_xlabel(_short(param))
        ax.set_ylabel("validation accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[1 + len(params) :]:
        ax.set_visible(False)
    present = sorted(
        {t["status"] for t in scored}, key=lambda s: (list(STATUS_COLOURS).index(s) if s in STATUS_COLOURS else 9, s)
    )
    handles = [
        Line2D([], [], linestyle="", marker="o", color=STATUS_COLOURS.get(s, "tab:gray"), label=s) for s in present
    ]
    if unscored:
        handles.append(
            Line2D([], [], linestyle="", marker="x", color="tab:red", label="no score (failed or not scored)")
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, len(handles)), fontsize=9, title="trial")
    fig.suptitle(title, fontsize=11)
    return fig
