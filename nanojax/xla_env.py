"""XLA:CPU options chosen by the host CPU's ISA, put into XLA_FLAGS before JAX starts a backend.

XLA reads XLA_FLAGS once, when the first backend is created, so nanojax/__init__.py calls
`tune_xla()` at import time (like `_malloc.tune_malloc()`), before anything touches a device.
Which flags help depends on the CPU family: a flag goes into TUNED_FLAGS for a family only where
it was measured to help on that family (docs/performance/xla_flags.md, "XLA:CPU options by CPU family");
every other family gets nothing. The rules:

- the user wins, per flag: a flag already named in the user's XLA_FLAGS is left as the user set
  it (with whatever value), and the others are still appended;
- `NANOJAX_NO_XLA_TUNING=1` turns the whole thing off;
- an unknown flag makes XLA abort the process, so flags are added only for jaxlib versions they
  were checked against (VERIFIED_JAXLIB);
- all flags are `xla_cpu_*`: they change how XLA:CPU compiles and nothing on a GPU or TPU.

`xla_tuning()` returns what was chosen and why; the train loop writes it into metrics.jsonl's
header line and the bench scripts print it under every table (metrics.cpu_description).
The functions that decide are pure (text in, record out) so tests can feed them any cpuinfo.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPT_OUT_ENV = "NANOJAX_NO_XLA_TUNING"
# Names (space-separated) of the flags nanojax itself appended: a child process inherits XLA_FLAGS
# with them in it, and must not report them as the user's.
ADDED_ENV = "NANOJAX_XLA_FLAGS_ADDED"

# The x86 extensions that decide matmul speed on CPU (DESIGN.md: the EPYC has AVX2 only, the Xeon
# AVX-512, VNNI and AMX, and the fast path differs), in the order descriptions name them.
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")

# Family -> the flags measured to make training faster there. A family listed with no flags was
# measured and nothing helped; a family not listed was never measured. Both get nothing added.
# docs/performance/xla_flags.md ("XLA:CPU options by CPU family") has the A/Bs behind each row.
TUNED_FLAGS: dict[str, tuple[str, ...]] = {
    # Sapphire Rapids VM, jaxlib 0.10.2: `--xla_cpu_experimental_onednn_fusion_type=dot` alone
    # compiles the train step to the identical executable (YNN keeps the dots); with
    # `--xla_cpu_use_onednn=true` the step aborts in oneDNN ("partition compile failed"); YNN
    # off or YNN eltwise fusion, fast math, one Eigen thread, 512-bit vectors, the concurrency
    # scheduler: no faster than the default.
    "intel-avx512": (),
    "amd-avx2": (),  # EPYC: "XLA flags changed nothing" (DESIGN.md's measurements)
    # Zen 5 VM, jaxlib 0.10.2, the fp32 step compiled per option in one process: YNN off 0.98x
    # (quickstart) and 0.84x (GPT-2 124M), fast math 1.01x / 0.99x, the concurrency scheduler
    # 1.02x / 0.95x: none beat the default.
    "amd-avx512": (),
}
# jaxlib major.minor versions whose XLA knows every flag above (checked with `strings` on
# libjax_common.so and by running with them). Another version gets nothing rather than a crash.
VERIFIED_JAXLIB = ("0.10",)


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says about the first CPU: model name, vendor id, and its flags (None
    when the file has no flags line: not Linux, or an unknown layout)."""

    model: str
    vendor: str
    flags: frozenset[str] | None
    cores: int | None  # physical cores: distinct (physical id, core id) pairs, when listed


def parse_cpuinfo(text: str) -> CpuInfo:
    """Reads /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    model, vendor, flags = "", "", None
    cores: set[tuple[str, str]] = set()
    phys = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model") and not model:
            model = value
        elif key in ("vendor_id", "CPU implementer") and not vendor:
            vendor = value
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return CpuInfo(model, vendor, flags, len(cores) or None)


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """parse_cpuinfo of `path`; an unreadable file gives an empty record (nothing known)."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return CpuInfo("", "", None, None)


def isa_family(info: CpuInfo) -> str:
    """The CPU family TUNED_FLAGS is keyed by: vendor and widest vector ISA, e.g. "intel-avx512",
    "amd-avx2"; "other" for a CPU of another vendor without AVX2 (e.g. Arm); "unknown" without
    flags. AMX is not a family of its own: these VMs list amx_*
    flags but the instructions trap (DESIGN.md), and fp32 dots do not use it."""
    if info.flags is None:
        return "unknown"
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(info.vendor, "other")
    if "avx512f" in info.flags:
        return f"{vendor}-avx512"
    if "avx2" in info.flags:
        return f"{vendor}-avx2"
    return f"{vendor}-sse" if vendor != "other" else "other"  # e.g. Arm: no x86 vector flags


def flag_name(flag: str) -> str:
    """`--xla_foo=1` -> `xla_foo` (also `--xla_foo`, `-xla_foo`)."""
    return flag.lstrip("-").partition("=")[0]


def merge_xla_flags(user: str, chosen: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """Appends each of `chosen` to the user's XLA_FLAGS string unless the user names that flag.

    Returns (the new XLA_FLAGS, the flags appended, the chosen flags' names the user had set).
    The user's own text is kept as it is, first."""
    named = {flag_name(f) for f in user.split()}
    added = [f for f in chosen if flag_name(f) not in named]
    kept = [flag_name(f) for f in chosen if flag_name(f) in named]
    return " ".join([*user.split(), *added]), added, kept


def _jaxlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return ""


def choose(info: CpuInfo, environ: Mapping[str, str], jaxlib_version: str) -> dict[str, Any]:
    """The decision, without side effects: a record with the CPU model, ISA family and flags, the
    flags to add, the user's flags, the resulting XLA_FLAGS and, where nothing is added, why."""
    family = isa_family(info)
    user = environ.get("XLA_FLAGS", "")
    ours = set(environ.get(ADDED_ENV, "").split())  # inherited from a parent nanojax process
    rec: dict[str, Any] = {
        "cpu_model": info.model or "unknown",
        "isa_family": family,
        "isa_flags": [f for f in CPU_ISA_FLAGS if f in (info.flags or ())],
        "jaxlib": jaxlib_version,
        "added": [],
        "inherited": [f for f in user.split() if flag_name(f) in ours],
        "user_flags": [f for f in user.split() if flag_name(f) not in ours],
        "user_kept": [],  # chosen flags the user's XLA_FLAGS already set, left as the user set them
        "xla_flags": user,
        "skipped": None,
    }
    chosen = TUNED_FLAGS.get(family, ())
    if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        rec["skipped"] = f"{OPT_OUT_ENV}={environ[OPT_OUT_ENV]}"
    elif family in TUNED_FLAGS and not chosen:
        rec["skipped"] = f"measured on {family}: no XLA:CPU flag made training faster"
    elif not chosen:
        rec["skipped"] = f"{family} was never measured"
    elif ".".join(jaxlib_version.split(".")[:2]) not in VERIFIED_JAXLIB:
        rec["skipped"] = (f"jaxlib {jaxlib_version or 'not installed'} is not one the flags were "
                          f"checked against ({', '.join(VERIFIED_JAXLIB)})")
    else:
        rec["xla_flags"], rec["added"], kept = merge_xla_flags(user, chosen)
        rec["user_kept"] = [n for n in kept if n not in ours]
    return rec


_RECORD: dict[str, Any] | None = None


def tune_xla(environ: MutableMapping[str, str] | None = None,
             cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """Chooses the flags for this host and writes them into `environ` (default os.environ, and
    then the record is kept for `xla_tuning()`): XLA_FLAGS, and ADDED_ENV for child processes.
    Returns the record, whose
    `applied` says whether tuned flags are in XLA_FLAGS in time to take effect: False when there
    are none, or when a JAX backend was started before nanojax was imported (XLA has read its
    flags by then)."""
    global _RECORD
    own = environ is None  # this process's choice (kept for xla_tuning()), not a test's dict
    environ = os.environ if environ is None else environ
    rec = choose(read_cpuinfo(cpuinfo), environ, _jaxlib_version())
    if rec["added"]:
        environ["XLA_FLAGS"] = rec["xla_flags"]
        names = set(environ.get(ADDED_ENV, "").split()) | {flag_name(f) for f in rec["added"]}
        environ[ADDED_ENV] = " ".join(sorted(names))
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = bridge is not None and bridge.backends_are_initialized()
    rec["applied"] = bool(rec["added"] or rec["inherited"]) and not started
    if own:
        _RECORD = rec
    return rec


def xla_tuning() -> dict[str, Any]:
    """What tune_xla chose for this process (a copy), for logs and benchmark headers."""
    return dict(_RECORD) if _RECORD is not None else {"skipped": "tune_xla() was not called"}


def describe(rec: Mapping[str, Any]) -> str:
    """One line for a benchmark header, e.g. "XLA tuning intel-avx512: added
    --xla_cpu_experimental_onednn_fusion_type=dot; user XLA_FLAGS: (none)"."""
    family = rec.get("isa_family", "?")
    if rec.get("added"):
        what = "added " + " ".join(rec["added"])
        if not rec.get("applied", True):
            what += " (too late: a backend was already started)"
    elif rec.get("inherited"):
        what = "inherited " + " ".join(rec["inherited"])
    else:
        what = f"none ({rec.get('skipped') or 'the user set every flag'})"
    user = " ".join(rec.get("user_flags", ())) or "(none)"
    return f"XLA tuning {family}: {what}; user XLA_FLAGS: {user}"
