"""The notebooks: each notebooks/NAME.py (jupytext percent source) and its committed, executed
NAME.ipynb hold the same cells with outputs, plots included; and each one executes cleanly.

Executing them starts a kernel and trains, so that part is marked slow (pytest -m slow); it runs
in the fast mode the notebooks offer (NANOJAX_NOTEBOOK_FAST=1: fewer steps and resamples)."""

import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9]*.py"))


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_is_paired():
    assert [p.stem for p in SOURCES] == ["01_tour", "02_sharding", "03_scaling", "04_inference"]
    for py in SOURCES:
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --sync {py}` and execute it"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebook_source_and_saved_copy_agree(py):
    """The .py and .ipynb hold the same cells (jupytext's own reading of both), and the saved copy
    was executed: every code cell has run, none errored, and there are plots in it."""
    from_py = jupytext.read(py)
    saved = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    assert _cells(from_py) == _cells(saved), f"{py.name} and its .ipynb differ: run `jupytext --sync {py}`"
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{py.stem}.ipynb has unexecuted cells"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{py.stem}.ipynb saved an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{py.stem}.ipynb shows no plot"


@pytest.mark.slow
@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebook_executes(py, tmp_path):
    from nbclient import NotebookClient

    if py.stem in ("01_tour", "04_inference") and not Path(os.environ.get("NANOJAX_TEST_TEXT", "")).is_file():
        pytest.skip(f"set NANOJAX_TEST_TEXT to a copy of Tiny Shakespeare to run {py.stem}")
    nb = jupytext.read(py)
    env = {"NANOJAX_NOTEBOOK_FAST": "1", "JAX_PLATFORMS": "cpu"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
