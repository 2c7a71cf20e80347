"""Matplotlib (Agg) figures as small (palette) PNG bytes: quality vs cache size curves and the per-head best-heuristic
map."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, TwoSlopeNorm  # noqa: E402
from PIL import Image  # noqa: E402  (Pillow: matplotlib's own PNG writer)

from kvpolicy.evaluation.result import SCORES  # noqa: E402
from kvpolicy.report.aggregate import METRICS, CurvePoint, Group, HeadMap, LearningCurve, Point  # noqa: E402

# fixed colours so a scorer looks the same in every figure; the learned policy stands out in black
COLORS = {
    "KVP": "#000000",
    "KVP (bundled)": "#08519c",
    "Oracle": "#7f7f7f",
    "Random": "#bcbd22",
    "StreamingLLM": "#1f77b4",
    "KNorm": "#ff7f0e",
    "KeyDiff": "#2ca02c",
    "LagKV": "#8c564b",
    "TOVA": "#d62728",
    "SnapKV": "#9467bd",  # SnapKV (window 64) too, as results before its window was in the label call it
    "SnapKV (window 16)": "#5e3c99",
    "H2O": "#e377c2",
    "ExpectedAttention": "#17becf",
}
EXTRA = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]


def color_of(label: str) -> str:
    """Colour of a scorer label: its base name's fixed colour (a learned 'KVP (...)' variant is black)."""
    if label in COLORS:
        return COLORS[label]
    base = label.split(" ")[0]
    if base in COLORS:
        return COLORS[base]
    return EXTRA[sum(map(ord, label)) % len(EXTRA)]


DPI = 110
PALETTE = 256  # colours of a written figure: a plot's few colours and their antialiasing shades


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return palette_png(buf.getvalue())


def palette_png(png: bytes) -> bytes:
    """A PNG re-encoded on white with a palette of PALETTE colours (fast octree, no dithering: the same image gives
    the same bytes) and zlib's best compression. Matplotlib writes 32-bit RGBA; a plot's palette form is about a
    quarter of that and differs from it only in the shades of antialiased edges and gradients (a colour bar)."""
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    opaque = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    palette = opaque.quantize(colors=PALETTE, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    palette.save(buf, format="png", optimize=True)
    return buf.getvalue()


def _title(fig, title: str, caption: str, width: int) -> None:
    wrapped = "\n".join(textwrap.wrap(caption, width=width))
    fig.suptitle(f"{title}\n{wrapped}", fontsize=9, y=1.0, va="bottom")


MARKERS = "osD^vP*Xhp<>"
DODGE = 0.025  # log2 of the sideways shift between neighbouring scorers' points, so their error bars stay apart


def _error_bars(values: list[float], points: list[Point] | list[CurvePoint]) -> np.ndarray | None:
    """(2, n) asymmetric error bars (below, above) reaching each point's interval from its value, 0 where a point
    has none; None when no point has one. A percentile interval can leave out its own point (a skewed statistic on
    few samples): the bar on that side is then 0, as matplotlib refuses negative ones."""
    if all(p.ci is None for p in points):
        return None
    bars = [[y - p.ci[0], p.ci[1] - y] if p.ci is not None else [0.0, 0.0] for y, p in zip(values, points)]
    return np.maximum(np.array(bars).T, 0.0)


def curves_figure(group: Group) -> bytes:
    """One panel per task (and the average), one line per scorer with error bars reaching its 95% bootstrap
    interval; full cache as a dashed grey line in a grey band (its interval). Scorers get distinct markers, slight
    transparency and a small sideways shift (a few % of the cache size) so that lines and error bars lying on top
    of each other stay visible."""
    n = len(group.panels)
    cols = min(n, 4)
    rows = -(-n // cols)
    width = max(6.0, 3.6 * cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.0 * rows if cols > 1 else 3.6), squeeze=False)
    scorers = sorted({line.scorer for panel in group.panels for line in panel.lines})
    for ax, panel in zip(axes.flat, group.panels):
        xs = sorted({p.x for line in panel.lines for p in line.points})
        for line in panel.lines:
            emphasis = line.scorer.startswith("KVP")
            values = [p.y for p in line.points]
            shift = 2.0 ** (DODGE * (scorers.index(line.scorer) - (len(scorers) - 1) / 2))
            ax.errorbar(
                [p.x * shift for p in line.points],
                values,
                yerr=_error_bars(values, line.points),
                capsize=2,
                elinewidth=0.9,
                marker=MARKERS[scorers.index(line.scorer) % len(MARKERS)],
                markersize=6 if emphasis else 4.5,
                linewidth=2.4 if emphasis else 1.3,
                alpha=1.0 if emphasis else 0.8,
                color=color_of(line.scorer),
                label=line.scorer,
                zorder=3 if emphasis else 2,
            )
        if panel.reference is not None:
            ax.axhline(panel.reference.y, color="#555555", linestyle="--", linewidth=1, label="full cache")
            if panel.reference.ci is not None:
                ax.axhspan(*panel.reference.ci, color="#555555", alpha=0.12, linewidth=0)
        if xs and max(xs) / max(min(xs), 1e-9) >= 4:
            ax.set_xscale("log", base=2)
        if xs:
            ax.set_xticks(xs, [f"{x:.0f}" for x in xs])
            ax.minorticks_off()
        ys = [p.y for line in panel.lines for p in line.points]
        if group.metric in SCORES:
            ax.set_ylim(-4, 104)
        elif ys and min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("KV cache size (entries per head)", fontsize=8)
        ax.set_ylabel(group.y_label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.tight_layout()
    fig.legend([handles[lab] for lab in labels], labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    _title(fig, group.title(), group.caption(), width=int(15 * width))
    return _png(fig)


def head_map_figure(head_map: HeadMap, learned: str | None) -> bytes:
    """Left: which heuristic has the lowest whole-ranking cost on each (layer, KV head). Right (when a learned
    policy was evaluated): its cost divided by that best heuristic's cost (< 1: the learned policy wins)."""
    best, names = head_map.best_heuristic()
    n_layers, n_heads = best.shape
    panels = 2 if learned else 1
    width = panels * (2.5 + 0.9 * n_heads)
    fig, axes = plt.subplots(1, panels, figsize=(width, 1.0 + 0.22 * n_layers), squeeze=False)
    ax = axes[0, 0]
    cmap = ListedColormap([color_of(n) for n in names])
    ax.imshow(best, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto", interpolation="nearest")
    for (layer, head), idx in np.ndenumerate(best):
        ax.text(head, layer, names[idx][:6], ha="center", va="center", fontsize=6, color="white")
    ax.set_title("best heuristic per head", fontsize=9)
    _head_axes(ax, n_layers, n_heads)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color_of(n)) for n in names]
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    if learned:
        stacked = np.stack([head_map.cost[h] for h in names])
        ratio = head_map.cost[learned] / stacked.min(axis=0)
        ax = axes[0, 1]
        lo, hi = min(ratio.min(), 0.99), max(ratio.max(), 1.01)
        im = ax.imshow(ratio, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=lo, vmax=hi), aspect="auto",
                       interpolation="nearest")
        for (layer, head), value in np.ndenumerate(ratio):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{learned} cost ÷ best heuristic's (< 1: {learned} wins)", fontsize=9)
        _head_axes(ax, n_layers, n_heads)
        fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    _title(fig, "Which heuristic wins on which head (whole-ranking normalized cost)", head_map.caption(),
           width=int(15 * width))
    return _png(fig)


def _head_axes(ax, n_layers: int, n_heads: int) -> None:
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_xlabel("KV head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)


def learning_curve_figure(curve: LearningCurve) -> bytes:
    """Left: held-out cost against training prompts; right: against training steps; the baselines as dashed
    horizontal lines (error bars: 95% bootstrap interval over samples)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, points, xlabel in ((axes[0, 0], curve.by_prompts, "training prompts"),
                               (axes[0, 1], curve.by_steps, "training steps")):
        if points:
            costs = [p.cost for p in points]
            ax.errorbar([p.x for p in points], costs, yerr=_error_bars(costs, points), color=COLORS["KVP"],
                        marker="o", capsize=3, label="KVP")
            ax.set_xscale("log", base=2)
            ax.set_xticks([p.x for p in points], [str(p.x) for p in points])
        for label, cost in curve.references.items():
            ax.axhline(cost, color=color_of(label), linestyle="--", linewidth=1, label=label)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(METRICS["cost"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    _title(fig, "Learning curve: held-out ranking cost vs training prompts and steps", curve.caption(), width=150)
    return _png(fig)
