"""PNG figures of the scaling study (matplotlib, Agg backend): readable without the code.

* `scaling_plot`: average score per size against encoder parameters on a log axis, each
  size labelled, with the fitted power law and its exponent and R^2 in the legend.
* `gain_plot`: per-language gain from the smallest to the largest size, against (a) the
  resource class and (b) the typological distance from English; one colour per task,
  every point labelled with its language, missing languages listed under the panels.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

JOSHI_NAMES = {0: "0\nleft-behinds", 1: "1\nscraping-bys", 2: "2\nhopefuls", 3: "3\nrising stars",
               4: "4\nunderdogs", 5: "5\nwinners"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def scaling_plot(sizes: Sequence[dict], fit: dict, path: os.PathLike, title: Optional[str] = None) -> None:
    """Average score vs encoder parameters (log x) with the fitted power law.

    Args:
      sizes: [{"name", "params", "avg"}] (`study.analyse()["sizes"]`).
      fit: `study.fit_power_law` output.
    """
    plt = _pyplot()
    n = np.array([s["params"] for s in sizes], np.float64)
    y = np.array([s["avg"] for s in sizes], np.float64)
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    ax.plot(n, y, "o", color="tab:blue", markersize=8, label="measured (mean over tasks)", zorder=3)
    for s in sizes:
        ax.annotate(f"{s['name']}\n{_human(s['params'])}", (s["params"], s["avg"]), textcoords="offset points",
                    xytext=(6, -4), fontsize=8, va="top")
    grid = np.geomspace(n.min() / 1.3, n.max() * 1.3, 200)
    r2 = "n/a (2 sizes)" if fit.get("r2") is None else f"{fit['r2']:.3f}"
    ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], "-", color="tab:orange",
            label=f"fit: score = {fit['coefficient']:.3g} x N^{fit['exponent']:.3f}  (R² = {r2})")
    ax.set_xscale("log")
    ax.margins(y=0.15)
    ax.set_xlabel("encoder parameters N (log scale)")
    ax.set_ylabel("average score (percent / Spearman x 100)")
    ax.set_title("Score vs model size" + (f"\n{title}" if title else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gain_plot(analysis: dict, path: os.PathLike, title: Optional[str] = None) -> None:
    """Two panels: gain vs resource class, gain vs typological distance from English.

    Args:
      analysis: `study.analyse()` output (uses "gains", "gain_from", "gain_to",
        "feature_sets", "spearman", "missing").
    """
    plt = _pyplot()
    g = analysis["gains"]
    tasks = sorted({x["task"] for x in g})
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
    offsets = {t: (i - (len(tasks) - 1) / 2) * 0.12 for i, t in enumerate(tasks)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), dpi=120, sharey=True)
    panels = (("resource_class", "resource class (Joshi et al. 2020)", "gain_vs_resource_class"),
              ("distance", f"typological distance from English\n(cosine, lang2vec {analysis['feature_sets']})",
               "gain_vs_distance"))
    for ax, (key, label, corr) in zip(axes, panels):
        for task in tasks:
            pts = [x for x in g if x["task"] == task and x[key] is not None]
            if not pts:
                continue
            xs = np.array([x[key] for x in pts], np.float64)
            if key == "resource_class":  # spread each class's points so their labels stay apart
                for c in set(xs.tolist()):
                    idx = np.flatnonzero(xs == c)
                    xs[idx] += offsets[task] + (np.arange(len(idx)) - (len(idx) - 1) / 2) * 0.35 / max(len(idx), 1)
            ys = np.array([x["gain"] for x in pts])
            rho = analysis["spearman"].get(task, {}).get(corr)
            ax.scatter(xs, ys, color=colours[task], s=30, zorder=3,
                       label=f"{task} (Spearman {'n/a' if rho is None else f'{rho:+.2f}'})")
            for x, y, p in zip(xs, ys, pts):
                ax.annotate(p["lang"], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        if key == "resource_class":
            ax.set_xticks(range(6))
            ax.set_xticklabels([JOSHI_NAMES[i] for i in range(6)], fontsize=7)
            ax.set_xlim(-0.6, 5.6)
    axes[0].set_ylabel(f"gain from {analysis['gain_from']} to {analysis['gain_to']} (points)")
    miss = analysis["missing"]
    note = ("not plotted (missing, not imputed): resource class: " + (", ".join(miss["resource_class"]) or "none")
            + "; typology: " + (", ".join(miss["typology"]) or "none"))
    fig.suptitle("Per-language gain from the smallest to the largest model" + (f"\n{title}" if title else ""),
                 fontsize=10)
    fig.text(0.01, 0.01, note, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
