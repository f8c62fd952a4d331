"""Shared fixtures. Tests run on CPU; sharding tests start their own 8-device subprocesses."""

import contextlib
import os
import runpy
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parent.parent
CPU_CONFIG = REPO / "configs/shakespeare_char_cpu.py"


def cpu_config(data_dir, overrides: dict, changes: dict | None = None):
    """configs/shakespeare_char_cpu.py with `overrides` and `changes` ({"model.dtype": ...}) on
    top, data from `data_dir`: what scripts/train.py builds from the same --config.* flags."""
    c = runpy.run_path(str(CPU_CONFIG))["get_config"]()
    c.update_from_flattened_dict({**overrides, "data_dir": str(data_dir), **(changes or {})})
    return c


def checkpoint_steps(workdir) -> list[int]:
    """The step directories orbax lists in workdir/checkpoints, ascending (moved-aside ones not)."""
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def np_params(cfg, seed: int):
    """Random params for cfg drawn with numpy, as init_params' specs say (init_params' threefry
    costs seconds of compile on CPU for each new config)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanojax.model import ParamSpec, param_specs

    rng = np.random.default_rng(seed)

    def make(s):
        if s.init == "normal":
            return jnp.asarray(s.std * rng.standard_normal(s.shape), jnp.float32)
        return jnp.full(s.shape, 1.0 if s.init == "ones" else 0.0, jnp.float32)

    return jax.tree.map(make, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def fresh_hlo(fn, *args) -> str:
    """The lowered module of fn, traced afresh (a new function each time: the CPU kernels' routing
    reads a context variable and the environment, which jit's trace cache does not key on)."""
    import jax

    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def assert_kernel_step_equals_xla(cfg, fwd: str, bwd: str, kernel_off) -> None:
    """One-layer training loss and gradients for cfg (2 x 37 tokens) with a CPU kernel's custom
    calls `fwd` and `bwd` in the step, against the same step traced inside `kernel_off()` (the
    kernel's switch set to False), where neither may appear."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanojax.train.step import loss_fn

    params = np_params(cfg, 0)
    x = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 37)), jnp.int32)
    y = jnp.roll(x, -1, axis=1)

    def run():
        lowered = jax.jit(lambda p: jax.value_and_grad(loss_fn)(p, x, y, cfg)).lower(params)
        text = lowered.as_text()
        return (fwd in text, bwd in text), lowered.compile()(params)

    used, (loss, grads) = run()
    assert used == (True, True)
    with kernel_off():
        used, (loss_x, grads_x) = run()
    assert used == (False, False)
    np.testing.assert_allclose(float(loss), float(loss_x), rtol=1e-6)
    flat_x = dict(jax.tree_util.tree_leaves_with_path(grads_x))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_x[path]), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Tiny Shakespeare from $NANOJAX_TEST_TEXT; tests that need real text skip without it."""
    path = os.environ.get("NANOJAX_TEST_TEXT")
    if not path or not Path(path).is_file():
        pytest.skip("set NANOJAX_TEST_TEXT to a copy of Tiny Shakespeare to run real-text tests")
    return Path(path).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def _compile_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_compile_cache")  # one per xdist worker: never shared


@contextlib.contextmanager
def compile_cache_on(cache_dir: Path) -> Iterator[dict[str, str]]:
    """JAX's persistent compilation cache in `cache_dir` while the block runs; yields the
    environment that turns it on in subprocesses too. Nests: the settings it found come back."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(cache_dir),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    cc.reset_cache()  # jax decides once per process whether a cache is in use; ask it again
    try:
        yield {name.upper(): str(value) for name, value in settings.items()}
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        cc.reset_cache()


@pytest.fixture(scope="module")
def compile_cache(_compile_cache_dir) -> Iterator[dict[str, str]]:
    """JAX's persistent compilation cache, on for one test module; yields the environment that
    turns it on in that module's subprocesses too.

    train() builds fresh jitted functions on every call, so each run in a test recompiled the
    same step (~2 s of XLA:CPU each, most of a tiny run). With the cache a run of a config
    already compiled in this session loads the executable instead; what runs is the same
    executable, so results are unchanged (the resume tests compare losses bit for bit)."""
    with compile_cache_on(_compile_cache_dir) as env:
        yield env


# ----------------------------------------------------------------------------------------------
# The tiny training run of tests/train_run.py, made once per worker and shared by
# test_train_step.py and test_train.py. Session fixtures are set up before a module's, so these
# turn the compilation cache on themselves: the step they compile is then in it for every later
# run of that config, in this process or a subprocess.


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """train.bin / val.bin of train_run.SYNTH, character-tokenized."""
    from train_run import SYNTH

    from nanojax import data
    from nanojax.tokenizer import CharTokenizer

    d = tmp_path_factory.mktemp("synth")
    data.prepare(SYNTH, CharTokenizer.from_text(SYNTH), d)
    return d


@pytest.fixture(scope="session")
def trained(synth_data, _compile_cache_dir, tmp_path_factory) -> Path:
    """The reference run's workdir: train_run.base_config, one device, uninterrupted."""
    from train_run import base_config

    from nanojax.train import train

    workdir = tmp_path_factory.mktemp("trained") / "run"
    with compile_cache_on(_compile_cache_dir):
        train(base_config(synth_data), workdir, progress=False)
    return workdir


@pytest.fixture(scope="session")
def fresh_params(trained, synth_data, _compile_cache_dir):
    """Freshly initialised params of the reference run's model, on the host: its init is compiled
    already (eager init_params compiles op by op, seconds)."""
    import jax
    from train_run import ALPHABET, TINY, base_config

    from nanojax.train import build, model_config_from

    config = base_config(synth_data)
    cfg = model_config_from(config, len(ALPHABET))
    assert cfg == TINY
    with compile_cache_on(_compile_cache_dir):
        return jax.device_get(build(config, cfg).init_fn(jax.random.key(0))[0])


@pytest.fixture(scope="module")
def kernels():
    """nanojax.quant.ffi with the C++ kernels built (or found cached) and loaded, once per module;
    where g++ exists they must build (tests/test_quant_kernels.py, tests/test_dense_kernel.py)."""
    import shutil

    from nanojax.quant import ffi

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine: the kernels cannot be built (fallback tested below)")
    ffi._reset_for_tests()
    assert ffi.kernels_available(), ffi.kernels_info()
    return ffi
