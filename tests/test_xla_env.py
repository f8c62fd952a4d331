"""XLA:CPU flags chosen by the host's ISA (nanojax/xla_env.py): the choice from cpuinfo text, the
merge with the user's XLA_FLAGS (the user wins per flag), the opt-out, and a real process in
which `import nanojax` sets XLA_FLAGS and JAX still starts and computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import nanojax
from nanojax import xla_env
from nanojax.metrics import cpu_description
from nanojax.xla_env import ADDED_ENV, OPT_OUT_ENV, TUNED_FLAGS, choose, parse_cpuinfo, tune_xla

REPO = Path(__file__).resolve().parent.parent

# Trimmed /proc/cpuinfo of the machines seen so far (two CPUs each), and two others.
XEON = ("processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        "physical id\t: 0\ncore id\t\t: {i}\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 "
        "avx512_vnni amx_bf16 amx_tile amx_int8\n\n")
EPYC = ("processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\n"
        "core id\t\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\n")  # 2 SMT threads of one core
ZEN4 = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n"
VERSION = "0.10.2"
FAKE = ("--xla_cpu_a=1", "--xla_cpu_b=x,y")


def two(template):
    return "".join(template.format(i=i) for i in range(2))


@pytest.fixture
def fake_table(monkeypatch):
    """Two made-up flags for the Xeon family, so the merge rules are tested apart from what was
    measured (test_the_measured_table_is_documented checks that)."""
    monkeypatch.setitem(TUNED_FLAGS, "intel-avx512", FAKE)


def test_cpuinfo_gives_model_family_and_cores():
    x, e = parse_cpuinfo(two(XEON)), parse_cpuinfo(two(EPYC))
    assert (x.model, x.vendor, x.cores) == ("Intel(R) Xeon(R) Processor", "GenuineIntel", 2)
    assert e.cores == 1 and "avx512f" not in e.flags
    assert [xla_env.isa_family(parse_cpuinfo(t)) for t in (two(XEON), two(EPYC), ZEN4, ARM, "")] == [
        "intel-avx512", "amd-avx2", "amd-avx512", "other", "unknown"]
    assert choose(x, {}, VERSION)["isa_flags"] == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                    "amx_tile", "amx_bf16", "amx_int8"]


def test_flags_appended_after_the_users_and_the_user_wins_per_flag(fake_table):
    info = parse_cpuinfo(two(XEON))
    rec = choose(info, {}, VERSION)
    assert rec["xla_flags"] == "--xla_cpu_a=1 --xla_cpu_b=x,y" and rec["added"] == list(FAKE)
    assert rec["skipped"] is None and rec["user_flags"] == []
    # conftest's device count stays first; a flag the user set keeps the user's value, even off
    user = "--xla_force_host_platform_device_count=8  --xla_cpu_b=z"
    rec = choose(info, {"XLA_FLAGS": user}, VERSION)
    assert rec["xla_flags"] == "--xla_force_host_platform_device_count=8 --xla_cpu_b=z --xla_cpu_a=1"
    assert rec["added"] == ["--xla_cpu_a=1"] and rec["user_kept"] == ["xla_cpu_b"]
    assert rec["user_flags"] == ["--xla_force_host_platform_device_count=8", "--xla_cpu_b=z"]
    rec = choose(info, {"XLA_FLAGS": "--xla_cpu_a --xla_cpu_b="}, VERSION)  # bare and empty forms
    assert rec["added"] == [] and rec["xla_flags"] == "--xla_cpu_a --xla_cpu_b="
    assert rec["user_kept"] == ["xla_cpu_a", "xla_cpu_b"]


def test_opt_out_unmeasured_families_and_unchecked_jaxlib_add_nothing(fake_table):
    user = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    xeon = parse_cpuinfo(two(XEON))
    for info, env, version, why in [
        (xeon, {**user, OPT_OUT_ENV: "1"}, VERSION, OPT_OUT_ENV),
        (parse_cpuinfo(two(EPYC)), user, VERSION, "amd-avx2"),  # measured there: nothing helped
        (parse_cpuinfo(ZEN4), user, VERSION, "amd-avx512"),  # measured on Zen 5: nothing helped
        (parse_cpuinfo(""), user, VERSION, "unknown"),
        (xeon, user, "0.9.1", "jaxlib 0.9.1"),  # an unknown flag would abort XLA
        (xeon, user, "", "not installed"),
    ]:
        rec = choose(info, env, version)
        assert rec["added"] == [] and rec["xla_flags"] == user["XLA_FLAGS"], rec
        assert why in rec["skipped"], rec
    assert choose(xeon, {**user, OPT_OUT_ENV: "0"}, VERSION)["added"] == list(FAKE)  # 0: not opted out


def test_a_child_process_reports_inherited_flags_as_nanojax_not_the_user(fake_table, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(two(XEON))
    before = nanojax.xla_tuning()
    parent: dict[str, str] = {"XLA_FLAGS": "--xla_cpu_b=z"}
    rec = tune_xla(parent, info)
    assert parent["XLA_FLAGS"] == "--xla_cpu_b=z --xla_cpu_a=1" and parent[ADDED_ENV] == "xla_cpu_a"
    child = dict(parent)
    rec = tune_xla(child, info)
    assert child == parent and rec["added"] == [] and rec["inherited"] == ["--xla_cpu_a=1"]
    assert rec["user_flags"] == ["--xla_cpu_b=z"] and rec["user_kept"] == ["xla_cpu_b"]
    line = cpu_description(tuning=rec)
    assert line.endswith("; XLA tuning intel-avx512: inherited --xla_cpu_a=1; user XLA_FLAGS: --xla_cpu_b=z")
    assert nanojax.xla_tuning() == before  # a test's dict is not this process's choice


def test_flags_set_after_a_backend_started_are_reported_as_not_applied(fake_table, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(two(XEON))
    jax.devices()  # XLA has read XLA_FLAGS by now: appending to it changes nothing
    rec = tune_xla({}, info)
    assert rec["added"] == list(FAKE) and rec["applied"] is False
    assert "(too late: a backend was already started)" in cpu_description(tuning=rec)


def test_the_measured_table_is_documented():
    """Every family in the table, measured, has its row in docs/performance/xla_flags.md, and every flag
    chosen for it is named there."""
    doc = (REPO / "docs/performance/xla_flags.md").read_text()
    for family, flags in TUNED_FLAGS.items():
        assert f"`{family}`" in doc, family
        for flag in flags:
            assert f"`{flag}`" in doc, (family, flag)


# A fresh process whose table gives its own CPU family a real flag with a visible effect (YNN off:
# a dot compiles without a `ynn_fusion`), then `import nanojax`, as a user's script does.
CHILD = """
import importlib.util, json, os, sys
import numpy as np
spec = importlib.util.spec_from_file_location("nanojax.xla_env", sys.argv[1])
xe = importlib.util.module_from_spec(spec)
sys.modules["nanojax.xla_env"] = xe  # the package's own `from nanojax.xla_env import` gets this one
spec.loader.exec_module(xe)
xe.TUNED_FLAGS[xe.isa_family(xe.read_cpuinfo())] = ("--xla_cpu_experimental_ynn_fusion_type=",)
xe.VERIFIED_JAXLIB = (".".join(xe._jaxlib_version().split(".")[:2]),)
import nanojax, jax, jax.numpy as jnp
a = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 100
b = np.cos(np.arange(48 * 32, dtype=np.float32)).reshape(48, 32)
dot = jax.jit(jnp.dot)
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS"), "devices": jax.device_count(),
                  "rec": nanojax.xla_tuning(), "err": float(np.abs(np.asarray(dot(a, b)) - a @ b).max()),
                  "ynn": "ynn_fusion" in dot.lower(a, b).compile().as_text()}))
"""


def _child(xla_flags):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", ADDED_ENV, OPT_OUT_ENV)}
    env = {**base, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS": xla_flags}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "nanojax/xla_env.py")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_nanojax_sets_xla_flags_and_xla_obeys_them():
    """In a fresh process with conftest's kind of XLA_FLAGS, `import nanojax` appends the family's
    flag after the user's, before the backend starts: XLA compiles the dot as the appended flag
    says (no YNN fusion), the user's device count still holds, and the dot matches numpy."""
    force = "--xla_force_host_platform_device_count=2"
    got = _child(force)
    assert got["xla_flags"] == force + " --xla_cpu_experimental_ynn_fusion_type=", got
    assert got["rec"]["applied"] and got["rec"]["user_flags"] == [force], got
    assert got["devices"] == 2 and got["err"] < 1e-4 and not got["ynn"], got
