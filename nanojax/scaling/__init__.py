"""Scaling-law experiments: a sweep grid of ordinary training runs (grid.py, sweep.py), the Chinchilla
fits (fit.py: IsoFLOP parabolas and the parametric L(N, D) with bootstrap intervals) and the report
with its plots (report.py). scripts/scaling.py runs all of it; notebooks/03_scaling.py redoes the
fits of a finished sweep."""

from nanojax.scaling.fit import (
    IsoFlop,
    Parametric,
    TooFewPointsError,
    fit_isoflop,
    fit_parametric,
    fit_sweep,
)
from nanojax.scaling.grid import RunSpec, base_sweep_config, make_grid, run_config
from nanojax.scaling.report import write_report
from nanojax.scaling.sweep import CorpusMismatchError, load_results, prepare_corpus, run_sweep

__all__ = ["CorpusMismatchError", "IsoFlop", "Parametric", "RunSpec", "TooFewPointsError",
           "base_sweep_config", "fit_isoflop", "fit_parametric", "fit_sweep", "load_results", "make_grid",
           "prepare_corpus", "run_config", "run_sweep", "write_report"]
