"""Shared fixtures. Tests run on CPU; sharding tests start their own 8-device subprocesses."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Tiny Shakespeare from $NANOJAX_TEST_TEXT; tests that need real text skip without it."""
    path = os.environ.get("NANOJAX_TEST_TEXT")
    if not path or not Path(path).is_file():
        pytest.skip("set NANOJAX_TEST_TEXT to a copy of Tiny Shakespeare to run real-text tests")
    return Path(path).read_text(encoding="utf-8")
