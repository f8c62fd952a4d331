"""Scaling-law sweeps: the fitters against known laws (synthetic data drawn from a chosen
L(N, D), parabolas with a known vertex), the bad inputs (diverged runs, too few points, a sweep dir
of another corpus), and a microscopic real sweep that skips and resumes its finished runs."""

import json
import math

import numpy as np
import pytest

from nanojax import scaling
from nanojax.scaling import fit as F
from nanojax.scaling.sweep import RESULTS_FILE, prepare_corpus, run_record

CHINCHILLA = F.Parametric(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. eq. 10


def synthetic_runs(law: F.Parametric, budgets, sizes, sigma: float, seed: int = 0) -> list[dict]:
    """IsoFLOP runs whose losses come from `law` with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        for n in sizes:
            d = c / (6 * n)
            loss = float(law.predict(n, d) * math.exp(rng.normal(0, sigma)))
            runs.append({"name": f"C{c:.0e}_N{n:.0e}", "budget": c, "n_params": n, "tokens": d,
                         "flops": c, "seed": 0, "loss": loss, "diverged": False, "finished": True})
    return runs


@pytest.mark.parametrize("law", [CHINCHILLA, F.Parametric(E=2.1, A=900.0, B=2500.0, alpha=0.5, beta=0.35)])
def test_parametric_fit_recovers_exponents(law):
    rng = np.random.default_rng(1)
    n, d = (g.ravel() for g in np.meshgrid(np.logspace(7, 9.5, 6), np.logspace(9, 11.5, 6)))
    loss = law.predict(n, d) * np.exp(rng.normal(0, 0.002, n.shape))  # 0.2% noise
    p = F.fit_parametric(n, d, loss)
    assert abs(p.alpha / law.alpha - 1) < 0.05, p
    assert abs(p.beta / law.beta - 1) < 0.05, p
    assert abs(p.E / law.E - 1) < 0.05, p


def test_isoflop_finds_known_minimum():
    # loss(N) = 3 + 0.05 (ln N - ln N*)^2 per budget, N*(C) = 0.2 C^0.45: vertices and exponents known.
    budgets = [1e15, 1e16, 1e17]
    b, n, loss = [], [], []
    for c in budgets:
        n_star = 0.2 * c**0.45
        for k in np.linspace(-1.5, 1.1, 5):
            b.append(c)
            n.append(n_star * math.exp(k))
            loss.append(3.0 + 0.05 * k * k)
    iso = F.fit_isoflop(b, n, loss)
    for v, c in zip(iso.vertices, budgets, strict=True):
        assert v["n_opt"] == pytest.approx(0.2 * c**0.45, rel=1e-6)
        assert v["d_opt"] == pytest.approx(c / (6 * 0.2 * c**0.45), rel=1e-6)
        assert v["loss_opt"] == pytest.approx(3.0, abs=1e-9)
        assert v["inside"]
    assert iso.n_exp == pytest.approx(0.45, abs=1e-6)
    assert iso.d_exp == pytest.approx(0.55, abs=1e-6)


def test_fit_sweep_report_and_held_out(tmp_path):
    # Noiseless runs from a known law: the held-out budget is predicted (nearly) exactly, the
    # closed-form frontier matches the law's, and the report and its plots are written.
    runs = synthetic_runs(CHINCHILLA, [1e18, 1e19, 1e20], np.logspace(7.5, 9.5, 5), sigma=0.0)
    fits = F.fit_sweep(runs, n_boot=8, top_inits=8, boot_inits=2)
    assert fits["held_out"]["n_held"] == 5 and fits["held_out"]["rmse"] < 1e-3
    n_opt, d_opt = fits["parametric"].optimal(1e21)
    n_true, d_true = CHINCHILLA.optimal(1e21)
    assert n_opt == pytest.approx(n_true, rel=0.05) and d_opt == pytest.approx(d_true, rel=0.05)
    lo, hi = fits["intervals"]["alpha"]
    assert lo <= 0.34 + 1e-3 and hi >= 0.34 - 1e-3
    path = scaling.write_report(tmp_path, runs, fits)
    text = path.read_text()
    assert f"| alpha (N exponent) | {fits['parametric'].alpha:.3f} |" in text and "Held-out error" in text
    for name in scaling.report.PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_points_say_how_many():
    runs = synthetic_runs(CHINCHILLA, [1e18, 1e19], [1e8, 3e8, 1e9], sigma=0.0)[:5]
    with pytest.raises(F.TooFewPointsError, match=r"at least 6 finished runs.*got 5"):
        F.fit_parametric(*([r[k] for r in runs] for k in ("n_params", "tokens", "loss")))
    two_sizes = synthetic_runs(CHINCHILLA, [1e18, 1e19, 1e20], [1e8, 1e9], sigma=0.0)
    with pytest.raises(F.TooFewPointsError, match=r"at least 2 budgets each with 3 or more .*got 0"):
        F.fit_isoflop(*(np.array([r[k] for r in two_sizes]) for k in ("budget", "n_params", "loss")))


def test_diverged_runs_are_left_out_with_a_warning(tmp_path):
    runs = synthetic_runs(CHINCHILLA, [1e18, 1e19, 1e20], np.logspace(7.5, 9.5, 4), sigma=0.0)
    bad = dict(runs[5], name="exploded", loss=float("nan"), diverged=True, reason="non-finite loss")
    worse = dict(runs[6], name="uniform", loss=40.0)  # recorded as a finished run with a huge loss
    with pytest.warns(UserWarning, match="run exploded diverged"):
        fits = F.fit_sweep(runs + [bad], n_boot=0)
    assert fits["excluded"] == ["exploded"] and fits["n_runs"] == len(runs)
    assert fits["parametric"].alpha == pytest.approx(CHINCHILLA.alpha, rel=1e-3)
    # run_record marks a run whose final val loss is no better than uniform guessing as diverged.
    spec = scaling.RunSpec("uniform", 1, 16, 2, 10, 0, 1e9, 1000, 160, 9.6e5)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss": 40.0, "val_loss_full": 40.0}))
    rec = run_record(spec, tmp_path, vocab_size=300)
    assert rec["diverged"] and "ln(vocab)" in rec["reason"] and rec["loss"] == 40.0
    rec = run_record(spec, tmp_path, vocab_size=300, error="non-finite loss: step 3")
    assert rec["diverged"] and rec["reason"] == "non-finite loss: step 3"
    assert not F.usable_runs([dict(worse, diverged=True)])


def micro_sweep(vocab_size: int = 300):
    s = scaling.base_sweep_config("micro")
    s.vocab_size = vocab_size
    s.tokenizer = "char"
    t = s.train
    t.model.max_seq_len, t.model.bias = 16, False
    t.batch_size, t.eval_iters = 4, 1
    s.sizes = ((1, 16, 2),)
    s.budgets = (4e6,)
    s.seeds = (0, 1)
    s.extra_seed_max_flops = 1e7
    s.min_steps = 3
    return s


def test_corpus_mismatch_is_refused(tmp_path, shakespeare_text):
    sweep = micro_sweep()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(shakespeare_text[:20_000])
    b.write_text(shakespeare_text[20_000:40_000])
    data_dir = prepare_corpus(sweep, a, tmp_path / "sweep")
    assert prepare_corpus(sweep, a, tmp_path / "sweep") == data_dir  # the same corpus: reused
    with pytest.raises(scaling.CorpusMismatchError, match="another corpus.*differs from the one it was made"):
        prepare_corpus(sweep, b, tmp_path / "sweep")
    other = prepare_corpus(sweep, b, tmp_path / "other")  # a prepared data dir of another text
    with pytest.raises(scaling.CorpusMismatchError, match=r"differs in train, val"):
        prepare_corpus(sweep, other, tmp_path / "sweep")


def test_micro_sweep_skips_finished_runs_and_resumes(tmp_path, shakespeare_text, compile_cache):
    sweep, sd = micro_sweep(), tmp_path / "sweep"
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text[:20_000])
    logs: list[str] = []
    first = scaling.run_sweep(sweep, text, sd, progress=False, log=logs.append)
    assert [r["finished"] and not r["diverged"] for r in first] == [True, True]
    assert all(r["n_params"] == 3120 and r["tokens"] == r["steps"] * 64 for r in first)
    assert first[0]["loss"] != first[1]["loss"]  # two seeds, two runs
    assert first[0]["profile"]["step_time_s"] > 0 and len(first[0]["curve"]) >= 2
    metrics = [sd / "runs" / r["name"] / "metrics.jsonl" for r in first]
    before = [(m.stat().st_mtime_ns, m.read_text()) for m in metrics]
    logs.clear()
    again = scaling.run_sweep(sweep, text, sd, progress=False, log=logs.append)
    assert again == first and all("skipped" in line for line in logs)
    assert [(m.stat().st_mtime_ns, m.read_text()) for m in metrics] == before  # nothing retrained
    # Killed after training but before its record was written: the rerun resumes the finished
    # workdir (no step runs again) and recovers the same record from it.
    (sd / RESULTS_FILE).unlink()
    resumed = scaling.run_sweep(sweep, text, sd, progress=False, log=logs.append)
    assert [m.read_text() for m in metrics] == [b for _, b in before]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in first]
