"""Fitting scaling laws to a sweep's final losses (Hoffmann et al. 2022, "Training Compute-Optimal
Large Language Models", section 3 and appendix D).

Approach 2, IsoFLOP profiles: for each compute budget C, the final loss against log N is fitted
with a parabola; its vertex is the compute-optimal size N_opt(C) (and D_opt = C / 6 N_opt). Power
laws N_opt = k C^a and D_opt = k' C^b are then straight lines through those vertices in log-log.

Approach 3, the parametric loss L(N, D) = E + A / N^alpha + B / D^beta, fitted as Hoffmann et al.
did: with a = log A, b = log B, e = log E, minimise over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3

(LSE the log-sum-exp, so the model is log L in a numerically safe form) with L-BFGS, started from
their grid of initialisations: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -.5, ..., 1}, a, b in
{0, 5, ..., 25}. All 4500 starts are scored at once and L-BFGS runs from the `top_inits` best (running
every start is what they did; the best few reach the same optimum here at a fraction of the time).
The compute-optimal frontier follows in closed form (their eq. 4):
N_opt(C) = G (C/6)^(beta/(alpha+beta)), D_opt(C) = G^-1 (C/6)^(alpha/(alpha+beta)),
G = (alpha A / (beta B))^(1/(alpha+beta)).

Intervals are percentile bootstraps over runs (resampled with replacement, every fit redone).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

MIN_PARAMETRIC_POINTS = 6  # five constants to fit: at least one point more than that
MIN_ISOFLOP_SIZES = 3  # a parabola through each budget's losses needs three sizes
MIN_ISOFLOP_BUDGETS = 2  # a power law through the vertices needs two budgets


class TooFewPointsError(ValueError):
    """Not enough usable runs for a fit; the message says how many are needed and how many there are."""


@dataclasses.dataclass(frozen=True)
class Parametric:
    """L(N, D) = E + A / N^alpha + B / D^beta; loss in nats per token, N params, D tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan  # the Huber objective at the optimum

    def predict(self, n: Any, d: Any) -> np.ndarray:
        n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimal(self, flops: Any) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising L under 6 N D = flops (Hoffmann et al. eq. 4)."""
        c = np.asarray(flops, np.float64) / 6.0
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return g * c ** (self.beta / s), c ** (self.alpha / s) / g

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative (r clipped to [-delta, delta])."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)), np.clip(r, -delta, delta)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, P)
    lse = special.logsumexp(terms, axis=0)
    h, dh = _huber(lse - log_l, delta)
    w = np.exp(terms - lse)  # softmax weights: d lse / d terms
    grad = np.array([np.sum(dh * w[0]), np.sum(dh * w[1]), np.sum(dh * w[2]),
                     -np.sum(dh * w[0] * log_n), -np.sum(dh * w[1] * log_d)])
    return float(np.sum(h)), grad


def init_grid() -> np.ndarray:
    """Hoffmann et al.'s initialisations, rows of (a, b, e, alpha, beta): (4500, 5)."""
    ab = np.arange(0.0, 25.1, 5.0)
    e = np.arange(-1.0, 1.01, 0.5)
    ex = np.arange(0.0, 2.01, 0.5)
    return np.array(list(itertools.product(ab, ab, e, ex, ex)))


def _grid_scores(grid: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    terms = np.stack([grid[:, :1] - grid[:, 3:4] * log_n, grid[:, 1:2] - grid[:, 4:5] * log_d,
                      np.broadcast_to(grid[:, 2:3], (len(grid), len(log_n)))])  # (3, G, P)
    return _huber(special.logsumexp(terms, axis=0) - log_l, delta)[0].sum(axis=1)


def fit_parametric(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *, delta: float = 1e-3,
                   top_inits: int = 16, extra_inits: Sequence[Sequence[float]] = ()) -> Parametric:
    """Approach 3: fits L(N, D) = E + A/N^alpha + B/D^beta to final losses (see the module doc).

    n, d, loss: (P,) non-embedding params, tokens and final loss (nats/token) of P runs.
    extra_inits: more (a, b, e, alpha, beta) starts, e.g. a previous optimum (the bootstrap's).
    """
    log_n, log_d, log_l = (np.log(np.asarray(v, np.float64)) for v in (n, d, loss))
    if len(log_l) < MIN_PARAMETRIC_POINTS:
        raise TooFewPointsError(
            f"the parametric fit L(N, D) = E + A/N^alpha + B/D^beta needs at least {MIN_PARAMETRIC_POINTS} "
            f"finished runs (5 constants), got {len(log_l)}; add sizes, budgets or seeds to the sweep")
    if not (np.all(np.isfinite(log_n)) and np.all(np.isfinite(log_d)) and np.all(np.isfinite(log_l))):
        raise ValueError("fit_parametric: every N, D and loss must be positive and finite")
    grid = init_grid()
    order = np.argsort(_grid_scores(grid, log_n, log_d, log_l, delta))
    starts = list(grid[order[:top_inits]]) + [np.asarray(x, np.float64) for x in extra_inits]
    best = None
    # One BLAS thread: L-BFGS-B's small dense updates ran ~50x slower (4 ms a call) with OpenBLAS's
    # threads spinning against each other on a busy 2-core machine.
    with threadpool_limits(1):
        best = _minimize(starts, log_n, log_d, log_l, delta)
    a, b, e, alpha, beta = best.x
    return Parametric(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta),
                      objective=float(best.fun))


def _minimize(starts, log_n, log_d, log_l, delta: float):
    best = None
    # The exponents are kept >= 0 (a negative one would make loss grow with size or data).
    bounds = [(None, None)] * 3 + [(0.0, None)] * 2
    for x0 in starts:
        r = optimize.minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True,
                              method="L-BFGS-B", bounds=bounds,
                              options={"maxiter": 1000, "ftol": 1e-14, "gtol": 1e-10})
        if best is None or r.fun < best.fun:
            best = r
    return best


def _theta(p: Parametric) -> list[float]:
    return [math.log(p.A), math.log(p.B), math.log(p.E), p.alpha, p.beta]


@dataclasses.dataclass(frozen=True)
class IsoFlop:
    """Approach 2. vertices: one dict per budget (budget, n_opt, d_opt, loss_opt, coeffs of the
    parabola in log N, inside: whether the vertex lies within the sizes run). n_exp / d_exp:
    N_opt ∝ C^n_exp, D_opt ∝ C^d_exp; n_coef / d_coef the prefactors."""

    vertices: list[dict[str, Any]]
    n_exp: float
    n_coef: float
    d_exp: float
    d_coef: float

    def optimal(self, flops: Any) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(flops, np.float64)
        return self.n_coef * c**self.n_exp, self.d_coef * c**self.d_exp


def isoflop_vertices(budget: Sequence[float], n: Sequence[float], loss: Sequence[float],
                     *, warn: bool = True) -> list[dict[str, Any]]:
    """Per budget with >= 3 sizes: the parabola loss = c2 x^2 + c1 x + c0, x = ln N, and its vertex.
    A budget whose parabola opens downwards has no minimum and is left out (with a warning)."""
    budget, n, loss = (np.asarray(v, np.float64) for v in (budget, n, loss))
    out = []
    for c in np.unique(budget):
        sel = budget == c
        x, y = np.log(n[sel]), loss[sel]
        if len(np.unique(x)) < MIN_ISOFLOP_SIZES:
            continue
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            if warn:
                warnings.warn(f"IsoFLOP budget C={c:.3g}: the losses over {len(np.unique(x))} sizes do not "
                              "curve upwards, so there is no minimum; left out of the frontier. Add sizes "
                              "on both sides of the best one.", stacklevel=2)
            continue
        x_opt = -c1 / (2 * c2)
        inside = bool(x.min() <= x_opt <= x.max())
        if warn and not inside:
            warnings.warn(f"IsoFLOP budget C={c:.3g}: the parabola's minimum N={math.exp(x_opt):.3g} lies "
                          f"outside the sizes run ({math.exp(x.min()):.3g}..{math.exp(x.max()):.3g}); it "
                          "is an extrapolation. Add sizes beyond it.", stacklevel=2)
        n_opt = math.exp(x_opt)
        out.append({"budget": float(c), "n_opt": n_opt, "d_opt": float(c) / (6 * n_opt),
                    "loss_opt": float(c0 - c1 * c1 / (4 * c2)), "coeffs": [float(c2), float(c1), float(c0)],
                    "inside": inside})
    return out


def fit_isoflop(budget: Sequence[float], n: Sequence[float], loss: Sequence[float], *,
                warn: bool = True) -> IsoFlop:
    """Approach 2: IsoFLOP parabolas, their vertices, and the power laws through the vertices."""
    vertices = isoflop_vertices(budget, n, loss, warn=warn)
    if len(vertices) < MIN_ISOFLOP_BUDGETS:
        raise TooFewPointsError(
            f"the IsoFLOP fit needs at least {MIN_ISOFLOP_BUDGETS} budgets each with {MIN_ISOFLOP_SIZES} or "
            f"more model sizes and losses that curve upwards, got {len(vertices)} such budgets; add "
            "sizes or budgets to the sweep")
    log_c = np.log([v["budget"] for v in vertices])
    n_exp, n_log_coef = np.polyfit(log_c, np.log([v["n_opt"] for v in vertices]), 1)
    d_exp, d_log_coef = np.polyfit(log_c, np.log([v["d_opt"] for v in vertices]), 1)
    return IsoFlop(vertices, float(n_exp), math.exp(n_log_coef), float(d_exp), math.exp(d_log_coef))


def usable_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs a fit may use: finished and not diverged. Each diverged run is named in a warning."""
    kept = []
    for r in runs:
        if r.get("diverged"):
            warnings.warn(f"run {r['name']} diverged ({r.get('reason', 'no reason recorded')}); it is left "
                          "out of the fits", stacklevel=2)
        elif r.get("loss") is not None and math.isfinite(r["loss"]):
            kept.append(r)
    return kept


def _columns(runs: Sequence[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    return tuple(np.array([r[k] for r in runs], np.float64) for k in ("budget", "n_params", "tokens", "loss"))


def held_out_error(runs: Sequence[dict[str, Any]], delta: float = 1e-3,
                   top_inits: int = 16) -> dict[str, Any]:
    """Fits approach 3 without the largest budget's runs and predicts them: extrapolation in compute,
    the way the law is used. Returns rmse and mean |relative| error of the loss, and per-run rows;
    {'skipped': reason} when too few runs remain to fit."""
    budget, n, d, loss = _columns(runs)
    held = budget == budget.max()
    if (~held).sum() < MIN_PARAMETRIC_POINTS:
        return {"skipped": f"{(~held).sum()} runs below the largest budget; the fit needs "
                           f"{MIN_PARAMETRIC_POINTS}"}
    p = fit_parametric(n[~held], d[~held], loss[~held], delta=delta, top_inits=top_inits)
    pred = p.predict(n[held], d[held])
    err = pred - loss[held]
    return {"budget": float(budget.max()), "n_fit": int((~held).sum()), "n_held": int(held.sum()),
            "rmse": float(np.sqrt(np.mean(err**2))), "mean_rel": float(np.mean(np.abs(err) / loss[held])),
            "fit": p.to_dict(),
            "rows": [{"name": r["name"], "observed": float(o), "predicted": float(q)}
                     for r, o, q in zip([r for r, h in zip(runs, held, strict=True) if h], loss[held], pred,
                                        strict=True)]}


def bootstrap(runs: Sequence[dict[str, Any]], best: Parametric, *, n_boot: int = 200, delta: float = 1e-3,
              inits: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Refits both approaches on `n_boot` resamples of the runs (with replacement). Returns arrays
    (n_boot,) per constant: alpha, beta, E, A, B, and the IsoFLOP exponents n_exp, d_exp (NaN where a
    resample has too few distinct points for that fit)."""
    budget, n, d, loss = _columns(runs)
    rng = np.random.default_rng(seed)
    keys = ("alpha", "beta", "E", "A", "B", "n_exp", "d_exp")
    out = {k: np.full(n_boot, np.nan) for k in keys}
    for i in range(n_boot):
        idx = rng.integers(0, len(runs), len(runs))
        if len(np.unique(idx)) >= MIN_PARAMETRIC_POINTS:
            p = fit_parametric(n[idx], d[idx], loss[idx], delta=delta, top_inits=inits,
                               extra_inits=[_theta(best)])
            for k in keys[:5]:
                out[k][i] = getattr(p, k)
        try:
            iso = fit_isoflop(budget[idx], n[idx], loss[idx], warn=False)
            out["n_exp"][i], out["d_exp"][i] = iso.n_exp, iso.d_exp
        except TooFewPointsError:
            pass
    return out


def interval(samples: np.ndarray, level: float = 0.9) -> tuple[float, float]:
    """The two-sided percentile interval of the finite samples, (lo, hi); NaNs if none are finite."""
    s = samples[np.isfinite(samples)]
    if not len(s):
        return math.nan, math.nan
    lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def fit_sweep(runs: Sequence[dict[str, Any]], *, huber_delta: float = 1e-3, top_inits: int = 16,
              n_boot: int = 200, boot_inits: int = 4, interval_level: float = 0.9, seed: int = 0,
              **_: Any) -> dict[str, Any]:
    """Both approaches, bootstrap intervals and the held-out error for a sweep's run records
    (dicts with name, budget, n_params, tokens, loss, diverged; see sweep.collect). Diverged runs
    are left out with a warning each; too few runs raise TooFewPointsError saying how many."""
    usable = usable_runs(runs)
    budget, n, d, loss = _columns(usable) if usable else (np.zeros(0),) * 4
    para = fit_parametric(n, d, loss, delta=huber_delta, top_inits=top_inits)
    iso = fit_isoflop(budget, n, loss)
    boot = bootstrap(usable, para, n_boot=n_boot, delta=huber_delta, inits=boot_inits, seed=seed)
    intervals = {k: interval(v, interval_level) for k, v in boot.items()}
    return {"parametric": para, "isoflop": iso, "bootstrap": boot, "intervals": intervals,
            "interval_level": interval_level, "held_out": held_out_error(usable, huber_delta, top_inits),
            "n_runs": len(usable), "excluded": [r["name"] for r in runs if r.get("diverged")]}
