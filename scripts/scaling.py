"""A scaling-law sweep: train a grid of models (IsoFLOP budgets x sizes), fit the Chinchilla laws,
write DIR/report.md with its plots.

    python scripts/scaling.py --preset=tiny --input=tinyshakespeare.txt --workdir=out/scaling_tiny
    python scripts/scaling.py --preset=gpu --input=data/owt --workdir=out/scaling_gpu

--input is a UTF-8 text file (tokenized once into DIR/data with the preset's tokenizer) or a data
dir made by scripts/prepare_data.py. Every run is an ordinary training workdir under DIR/runs/:
rerunning the command resumes an unfinished run and skips finished ones, so a rerun of a finished
sweep only refits. A DIR made from another corpus or tokenizer is refused. See docs/scaling.md.
"""

import runpy
import sys
import time
import warnings
from pathlib import Path

from absl import app, flags, logging

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nanojax  # noqa: E402,F401  (tunes malloc before JAX allocates)
from nanojax import cli, scaling  # noqa: E402

flags.DEFINE_string("preset", "tiny", "A sweep config: configs/scaling/<preset>.py (tiny or gpu), or a path.")
flags.DEFINE_string("input", None, "A UTF-8 text file, or a data dir prepared by scripts/prepare_data.py.")
flags.DEFINE_string("workdir", None, "The sweep dir: data, runs/, results.json, report.md, plots.")
flags.DEFINE_integer("n_boot", None, "Bootstrap resamples (default: the preset's).")
flags.DEFINE_bool("compile_cache", True, "Keep XLA executables in DIR/.jax_cache: runs of one shape "
                  "share their eval/init/checksum programs, and a resumed sweep compiles nothing twice.")
flags.mark_flags_as_required(["input", "workdir"])
FLAGS = flags.FLAGS


def load_preset(preset: str):
    path = Path(preset) if preset.endswith(".py") else REPO / "configs" / "scaling" / f"{preset}.py"
    if not path.is_file():
        known = sorted(p.stem for p in (REPO / "configs" / "scaling").glob("*.py"))
        raise app.UsageError(f"--preset={preset}: no sweep config {path}; use one of {known} or a .py path")
    return runpy.run_path(str(path))["get_config"]()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import matplotlib

    matplotlib.use("Agg")  # the report's PNGs only; no window
    sweep = load_preset(FLAGS.preset)
    if FLAGS.n_boot is not None:
        sweep.fit.n_boot = FLAGS.n_boot
    if FLAGS.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(FLAGS.workdir).absolute() / ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    t0 = time.perf_counter()
    runs = scaling.run_sweep(sweep, FLAGS.input, FLAGS.workdir)
    t_train = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = scaling.fit_sweep(runs, **sweep.fit.to_dict())
    for w in caught:
        print(f"warning: {w.message}")
    t_all = time.perf_counter() - t0
    notes = [f"Preset `{sweep.name}`, input `{FLAGS.input}`, {len(runs)} runs. This invocation: "
             f"{t_train:.0f} s sweep (training what was not yet done), {t_all:.0f} s with the fits."]
    path = scaling.write_report(FLAGS.workdir, runs, fits, title=f"Scaling sweep: {sweep.name}", notes=notes)
    p = fits["parametric"]
    a, b = fits["intervals"]["alpha"], fits["intervals"]["beta"]
    print(f"alpha {p.alpha:.3f} [{a[0]:.3f}, {a[1]:.3f}], beta {p.beta:.3f} [{b[0]:.3f}, {b[1]:.3f}], "
          f"E {p.E:.3f}; N_opt ∝ C^{fits['isoflop'].n_exp:.3f}")
    print(f"report: {path} ({t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    cli.run(main)
