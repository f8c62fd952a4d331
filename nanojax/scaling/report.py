"""The sweep's report: SWEEP/report.md with the fitted constants, their bootstrap intervals, the
held-out error and a table of runs, beside four matplotlib PNGs (loss curves, IsoFLOP profiles, the
compute-optimal frontier, predicted against observed loss)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanojax.metrics import write_atomic
from nanojax.scaling.fit import usable_runs

PLOTS = ("loss_curves.png", "isoflop.png", "frontier.png", "predicted_vs_observed.png")


def _plt():
    # The backend is the caller's: scripts/scaling.py picks Agg (files only), a notebook keeps its
    # inline one so that the same functions draw there.
    import matplotlib.pyplot as plt

    return plt


def _budget_colors(budgets: Sequence[float]) -> dict[float, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    ub = sorted(set(budgets))
    return {b: cmap(i / max(1, len(ub) - 1) * 0.9) for i, b in enumerate(ub)}


def plot_loss_curves(runs: Sequence[dict[str, Any]], ax_row: Any = None) -> Any:
    """Train loss against tokens, one panel per budget, one line per run (darker: larger N)."""
    plt = _plt()
    budgets = sorted({r["budget"] for r in runs})
    if ax_row is None:
        fig, ax_row = plt.subplots(1, len(budgets), figsize=(3.6 * len(budgets), 3.2), squeeze=False,
                                   sharey=True)
        ax_row = ax_row[0]
    ns = sorted({r["n_params"] for r in runs})
    for ax, b in zip(ax_row, budgets, strict=True):
        for r in (r for r in runs if r["budget"] == b and r.get("curve")):
            t, loss = np.array(r["curve"]).T
            shade = plt.cm.plasma(0.85 * (1 - ns.index(r["n_params"]) / max(1, len(ns) - 1)))
            ax.plot(t, loss, color=shade, lw=1, ls="--" if r.get("diverged") else "-",
                    label=f"N={r['n_params'] / 1e3:.0f}k" + (f" s{r['seed']}" if r["seed"] else ""))
        ax.set_xscale("log")
        ax.set_title(f"C = {b:.0e} FLOPs")
        ax.set_xlabel("tokens")
        if ax.get_lines():
            ax.legend(fontsize=6)
    ax_row[0].set_ylabel("train loss (nats/token)")
    ax_row[0].figure.tight_layout()
    return ax_row[0].figure


def plot_isoflop(runs: Sequence[dict[str, Any]], fits: dict[str, Any], ax: Any = None) -> Any:
    """Final loss against N per budget, with each budget's parabola and its vertex (approach 2)."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    colors = _budget_colors([r["budget"] for r in runs])
    for r in runs:
        ax.scatter(r["n_params"], r["loss"] if r["loss"] is not None else np.nan, color=colors[r["budget"]],
                   marker="x" if r.get("diverged") else "o", s=18)
    for v in fits["isoflop"].vertices:
        ns = [r["n_params"] for r in runs if r["budget"] == v["budget"]]
        x = np.linspace(np.log(min(ns)) - 0.3, np.log(max(ns)) + 0.3, 100)
        ax.plot(np.exp(x), np.polyval(v["coeffs"], x), color=colors[v["budget"]], lw=1,
                label=f"C={v['budget']:.0e}: N_opt={v['n_opt'] / 1e3:.0f}k")
        ax.scatter([v["n_opt"]], [v["loss_opt"]], color=colors[v["budget"]], marker="*", s=90, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("N (non-embedding parameters)")
    ax.set_ylabel("final val loss (nats/token)")
    ax.set_title("IsoFLOP profiles (approach 2)")
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def plot_frontier(fits: dict[str, Any], axes: Any = None) -> Any:
    """N_opt(C) and D_opt(C): approach 2's vertices and power laws, approach 3's closed form."""
    plt = _plt()
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    iso, para = fits["isoflop"], fits["parametric"]
    vb = np.array([v["budget"] for v in iso.vertices])
    c = np.logspace(np.log10(vb.min()) - 0.5, np.log10(vb.max()) + 1.0, 50)
    n2, d2 = iso.optimal(c)
    n3, d3 = para.optimal(c)
    lo, hi = fits["intervals"]["n_exp"]
    for ax, pts, y2, y3, what, exp, exp3 in (
            (axes[0], [v["n_opt"] for v in iso.vertices], n2, n3, "N_opt", iso.n_exp,
             para.beta / (para.alpha + para.beta)),
            (axes[1], [v["d_opt"] for v in iso.vertices], d2, d3, "D_opt", iso.d_exp,
             para.alpha / (para.alpha + para.beta))):
        ax.scatter(vb, pts, color="k", zorder=3, label="IsoFLOP vertices")
        ax.plot(c, y2, "C0", label=f"approach 2: ∝ C^{exp:.2f}")
        ax.plot(c, y3, "C1--", label=f"approach 3: ∝ C^{exp3:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C = 6ND (FLOPs)")
        ax.set_ylabel(what + (" (parameters)" if what == "N_opt" else " (tokens)"))
        ax.legend(fontsize=7)
    axes[0].set_title(f"compute-optimal N (approach 2 exponent {fits['interval_level']:.0%} CI "
                      f"[{lo:.2f}, {hi:.2f}])", fontsize=9)
    axes[1].set_title("compute-optimal D", fontsize=9)
    axes[0].figure.tight_layout()
    return axes[0].figure


def plot_predicted(runs: Sequence[dict[str, Any]], fits: dict[str, Any], ax: Any = None) -> Any:
    """Approach 3's predicted loss against the observed; the held-out budget's runs are predicted by
    the fit made without them."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit_sweep has named the diverged runs already
        use = usable_runs(runs)
    obs = np.array([r["loss"] for r in use])
    pred = fits["parametric"].predict([r["n_params"] for r in use], [r["tokens"] for r in use])
    ax.scatter(obs, pred, s=16, label="fitted runs (fit on all)")
    ho = fits["held_out"]
    if "rows" in ho:
        o = [row["observed"] for row in ho["rows"]]
        ax.scatter(o, [row["predicted"] for row in ho["rows"]], marker="s", facecolors="none",
                   edgecolors="C3", s=40, label=f"held out (C={ho['budget']:.0e}), rmse {ho['rmse']:.3f}")
    lims = [min(obs.min(), pred.min()) - 0.02, max(obs.max(), pred.max()) + 0.02]
    ax.plot(lims, lims, "k:", lw=1)
    ax.set_xlabel("observed final loss")
    ax.set_ylabel("predicted L(N, D)")
    ax.set_title("approach 3: predicted vs observed", fontsize=9)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def _ci(fits: dict[str, Any], key: str, fmt: str) -> str:
    lo, hi = fits["intervals"][key]
    return "n/a" if math.isnan(lo) else f"[{lo:{fmt}}, {hi:{fmt}}]"


def write_report(sweep_dir: str | Path, runs: Sequence[dict[str, Any]], fits: dict[str, Any], *,
                 title: str = "Scaling sweep", notes: Sequence[str] = ()) -> Path:
    """Writes SWEEP/report.md and the PNGs beside it; returns the report's path."""
    plt = _plt()
    out = Path(sweep_dir)
    figs = (plot_loss_curves(runs), plot_isoflop(runs, fits), plot_frontier(fits), plot_predicted(runs, fits))
    for fig, name in zip(figs, PLOTS, strict=True):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    p, iso, lvl = fits["parametric"], fits["isoflop"], fits["interval_level"]
    n_boot = int(np.isfinite(fits["bootstrap"]["alpha"]).sum())
    s = p.alpha + p.beta
    lines = [f"# {title}", "", *notes, "", "## Fitted constants", "",
             "Approach 3, L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss, L-BFGS; Hoffmann et al. "
             f"2022 app. D), on {fits['n_runs']} runs; {lvl:.0%} intervals from {n_boot} bootstrap "
             "resamples of the runs:", "",
             "| constant | fit | interval |", "|---|---|---|"]
    for label, key, fmt in (("alpha (N exponent)", "alpha", ".3f"), ("beta (D exponent)", "beta", ".3f"),
                            ("E (irreducible loss)", "E", ".3f"), ("A", "A", ".4g"), ("B", "B", ".4g")):
        lines.append(f"| {label} | {getattr(p, key):{fmt}} | {_ci(fits, key, fmt)} |")
    lines += ["", f"Approach 2 (IsoFLOP parabolas in ln N, {len(iso.vertices)} budgets): "
              f"N_opt ∝ C^{iso.n_exp:.3f} {_ci(fits, 'n_exp', '.3f')}, "
              f"D_opt ∝ C^{iso.d_exp:.3f} {_ci(fits, 'd_exp', '.3f')}. "
              f"Approach 3's frontier: N_opt ∝ C^{p.beta / s:.3f}, D_opt ∝ C^{p.alpha / s:.3f}.", "",
              "| budget C | N_opt (approach 2) | D_opt (2) | loss at vertex | N_opt (approach 3) "
              "| D_opt (3) |",
              "|---|---|---|---|---|---|"]
    for v in iso.vertices:
        n3, d3 = p.optimal(v["budget"])
        where = "" if v["inside"] else " (outside the sizes run)"
        lines.append(f"| {v['budget']:.1e} | {v['n_opt']:,.0f}{where} | {v['d_opt']:,.0f} | "
                     f"{v['loss_opt']:.3f} | {float(n3):,.0f} | {float(d3):,.0f} |")
    ho = fits["held_out"]
    lines += ["", "## Held-out error", ""]
    if "skipped" in ho:
        lines.append(f"Not measured: {ho['skipped']}.")
    else:
        lines.append(f"Approach 3 refitted on the {ho['n_fit']} runs below the largest budget predicts "
                     f"the {ho['n_held']} runs at C = {ho['budget']:.1e}: RMSE {ho['rmse']:.4f} nats, "
                     f"mean |relative error| {ho['mean_rel']:.2%}.")
    if fits["excluded"]:
        lines += ["", f"Left out of the fits (diverged): {', '.join(fits['excluded'])}."]
    lines += ["", "## Plots", ""] + [f"![{n[:-4]}]({n})" for n in PLOTS]
    lines += ["", "## Runs", "",
              "N: non-embedding parameters (Kaplan et al. 2020); D: training tokens; C = 6ND. Loss: the "
              "whole val split after the last step. Step time, device wait and host time: the median of "
              "each over the logged steps after the first (which compiles), so the parts need not add "
              "up to the whole; MFU against this host's measured matmul peak (high on a busy machine).",
              "",
              "| run | N | D | C | seed | loss | ms/step (device + host) | tok/s | MFU | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["budget"], r["n_params"], r["seed"])):
        pr = r.get("profile") or {}
        t = (f"{pr['step_time_s'] * 1e3:.1f} ({pr['device_wait_s'] * 1e3:.1f} + {pr['host_s'] * 1e3:.1f})"
             if pr else "")
        loss = "unfinished" if r["loss"] is None else f"{r['loss']:.4f}"
        loss = "DIVERGED" if r.get("diverged") else loss
        mfu = f"{pr['mfu']:.1%}" if pr.get("mfu") is not None and math.isfinite(pr["mfu"]) else "n/a"
        lines.append(f"| {r['name']} | {r['n_params']:,} | {r['tokens']:,} | {r['flops']:.2e} | "
                     f"{r['seed']} | {loss} | {t} | {pr.get('tokens_per_sec', 0):,.0f} | {mfu} | "
                     f"{r.get('wall_s', 0):.0f} |")
    path = out / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path

