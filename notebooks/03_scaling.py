# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Scaling laws from a sweep
#
# Loads the runs of a finished sweep (`scripts/scaling.py --workdir=DIR` writes `DIR/results.json`;
# the tiny preset's, run on Tiny Shakespeare, is committed in `docs/scaling/tiny/`), redoes the
# Chinchilla fits and draws the plots. Point `SWEEP` at your own sweep dir to study it.

# %%
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nanojax import scaling
from nanojax.scaling import report

FAST = os.environ.get("NANOJAX_NOTEBOOK_FAST") == "1"
SWEEP = Path(os.environ.get("NANOJAX_SWEEP_DIR", "../docs/scaling/tiny"))
runs = scaling.load_results(SWEEP)
print(len(runs), "runs from", SWEEP)
for r in sorted(runs, key=lambda r: (r["budget"], r["n_params"], r["seed"]))[:6]:
    print(f"  C={r['budget']:.0e} N={r['n_params']:>9,} D={r['tokens']:>10,} seed={r['seed']} "
          f"loss={r['loss']:.4f}")

# %% [markdown]
# ## The fits
# Approach 2: a parabola in ln N per budget, its vertex the compute-optimal size; power laws
# through the vertices. Approach 3: L(N, D) = E + A/N^alpha + B/D^beta by Huber loss on log-loss
# from Hoffmann et al.'s grid of starts. Intervals: bootstrap over runs. Held out: the largest
# budget, predicted by a fit made without it.

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fits = scaling.fit_sweep(runs, n_boot=10 if FAST else 100)
for w in caught:
    print("warning:", w.message)
p, lo_hi = fits["parametric"], fits["intervals"]
print(f"alpha = {p.alpha:.3f}  {fits['interval_level']:.0%} CI {np.round(lo_hi['alpha'], 3)}")
print(f"beta  = {p.beta:.3f}  CI {np.round(lo_hi['beta'], 3)}")
print(f"E = {p.E:.3f}, A = {p.A:.4g}, B = {p.B:.4g}")
iso = fits["isoflop"]
print(f"approach 2: N_opt ∝ C^{iso.n_exp:.3f}, D_opt ∝ C^{iso.d_exp:.3f}")
ho = fits["held_out"]
print("held out:", ho.get("skipped")
      or f"C={ho['budget']:.0e}, rmse {ho['rmse']:.4f}, mean rel error {ho['mean_rel']:.2%}")

# %% [markdown]
# ## Loss curves and IsoFLOP profiles

# %%
report.plot_loss_curves(runs)
plt.show()
report.plot_isoflop(runs, fits)
plt.show()

# %% [markdown]
# ## The compute-optimal frontier, and the law against the runs

# %%
report.plot_frontier(fits)
plt.show()
report.plot_predicted(runs, fits)
plt.show()

# %% [markdown]
# ## Extrapolating
# What the fitted law says about budgets beyond the sweep (with the caveat that these models are
# tiny and the corpus is 0.5M tokens: more than a few epochs and the law no longer describes it).

# %%
for c in (1e12, 1e13, 1e14):
    n_opt, d_opt = p.optimal(c)
    print(f"C={c:.0e}: N_opt={float(n_opt):,.0f}  D_opt={float(d_opt):,.0f}  "
          f"loss {float(p.predict(n_opt, d_opt)):.3f}")
