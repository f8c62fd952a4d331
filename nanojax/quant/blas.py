"""The BLAS libraries the kernel library (csrc/, built by nanojax.quant.ffi) links for gemm.cc's
training products: where each is installed and the compiler and linker arguments for it.

    MKL     the `mkl-static` package's static archives (pip install 'nanojax[mkl]'), its
            sequential layer, linked in with its symbols kept local (-DNJ_WITH_MKL);
    oneDNN  the `onednn-cpu-gomp` package's shared library and `onednn-devel-cpu-gomp`'s headers
            (pip install 'nanojax[onednn]'), found by rpath (-DNJ_WITH_DNNL).

Each is optional: without it the library builds without that handler's library and
nanojax.kernels.cpu_gemm never routes to it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The static MKL archives gemm.cc links (sequential layer, 32-bit ints), in link order.
MKL_ARCHIVES = ("libmkl_intel_lp64.a", "libmkl_sequential.a", "libmkl_core.a")
DNNL_SONAME = "libdnnl.so.3"  # oneDNN 3.x, GNU OpenMP build (the onednn-cpu-gomp package)


def mkl_static_dir() -> Path | None:
    """The folder holding MKL's static archives: $NANOJAX_MKL_LIB, else the `mkl-static` package's
    (pip install 'nanojax[mkl]'), else None (the library builds without the gemm kernel's BLAS).
    NANOJAX_MKL_LIB=0 builds without it."""
    env = os.environ.get("NANOJAX_MKL_LIB")
    if env == "0":
        return None
    if env:
        return Path(env)
    core = _package_file("mkl-static", MKL_ARCHIVES[-1])
    if core is None:
        return None
    return core.parent if all((core.parent / a).exists() for a in MKL_ARCHIVES) else None


def _package_file(dist: str, name: str) -> Path | None:
    """The installed file of the distribution `dist` whose path ends with `name` (the first one
    listed), or None."""
    import importlib.metadata

    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(name):
            found = Path(f.locate()).resolve()
            return found if found.exists() else None
    return None


def onednn_dirs() -> tuple[Path, Path] | None:
    """(include folder, lib folder) of oneDNN for gemm.cc's bf16 handler on AMD CPUs: the
    `onednn-devel-cpu-gomp` and `onednn-cpu-gomp` packages (pip install 'nanojax[onednn]'), else
    None (the library builds without it). NANOJAX_ONEDNN=0 builds without it."""
    if os.environ.get("NANOJAX_ONEDNN") == "0":
        return None
    header = _package_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.h")
    lib = _package_file("onednn-cpu-gomp", DNNL_SONAME)
    if header is None or lib is None:
        return None
    return header.parent.parent.parent, lib.parent  # .../include/oneapi/dnnl/dnnl.h -> include


def link_args() -> list[str]:
    """Compiler and linker arguments for MKL and oneDNN, each where found ([] without either).
    --exclude-libs keeps MKL's symbols inside the library: loaded into a process that also holds
    PyTorch's MKL, neither binds to the other's. oneDNN is a shared library found by rpath; it
    exports only its dnnl_* API, which PyTorch's build does not export."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    args = []
    mkl = mkl_static_dir()
    if mkl is not None:
        args += ["-DNJ_WITH_MKL", "-Wl,--start-group", *(str(mkl / a) for a in MKL_ARCHIVES),
                 "-Wl,--end-group", "-Wl,--exclude-libs,ALL"]
    dnnl = onednn_dirs()
    if dnnl is not None:
        inc, lib = dnnl
        args += ["-DNJ_WITH_DNNL", "-isystem", str(inc), str(lib / DNNL_SONAME), f"-Wl,-rpath,{lib}",
                 "-lgomp"]
    return [*args, "-lpthread", "-lm", "-ldl"] if args else []
