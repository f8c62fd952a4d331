"""Quantized matmuls: C++ XLA FFI kernels on CPU, a pure-JAX dequantize-then-dot path everywhere else.

    y = int8_matmul(x, q, scale, group_size)   # x (M, I), q int8 (O, I),       scale (O, I // G) -> (M, O)
    y = int4_matmul(x, q, scale, group_size)   # x (M, I), q uint8 (O, I // 2), scale (O, I // G) -> (M, O)

The weight layout is the quant layout contract (docs/quantization.md): out-major like ggml, so a
matrix-vector product reads each output's row contiguously; W[i, o] = q[o, i] * scale[o, i // G], and
for int4 byte j of row o holds element 2j in its low nibble and 2j+1 in its high one, each stored as
value + 8. Both paths compute in fp32 (a bf16 x is widened, the result cast back to x's dtype), so
they agree to fp32 rounding.

Why a kernel: XLA:CPU converts int8 weights to a full fp32 copy before every dot (DESIGN.md), so in
pure JAX a quantized decode step reads more bytes than the fp32 one. `csrc/qmatmul.cc` reads the
packed bytes once and widens them in registers (AVX-512 or AVX2, picked at run time), splitting the
output rows over XLA's intra-op thread pool. It is compiled with g++ on first use into a per-user
cache keyed by the source hash, jaxlib version, compiler and CPU flags (`make kernels` builds it
ahead). Without g++, or if the build fails, or with NANOJAX_NO_KERNELS=1, the pure-JAX path runs
and one warning says why. For large M (prefill) XLA's own dot of the dequantized weights wins,
so the kernel is used for M <= KERNEL_MAX_ROWS only (measured: docs/quantization.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.quant import arrays as _layout
from nanojax.quant import blas

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("qmatmul.cc", "fmatmul.cc", "dattn.cc", "fattn.cc", "adamw.cc", "gemm.cc", "norm.cc", "parallel.h",
           "simd.h", "kernels_fp32.inc", "kernels_vnni.inc", "fattn_tiles.inc")  # all hashed
KERNEL_MAX_ROWS = 16  # above this many rows of x, dequantize + XLA's dot is faster (measured)
# The fp32 kernel beats XLA's dot up to 32 rows (the serving engine's 8-32 slots; docs/performance/decode.md).
FP32_KERNEL_MAX_ROWS = 32
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")  # part of the cache key
# activations="int8": on a CPU with AVX-512 VNNI the kernels round x to int8 per 32-element block and
# multiply in integers (llama.cpp's q8_0 / q4_0 x q8_0 dots): 1.5-3x fewer instructions than widening
# every weight to fp32, at a bounded cost in accuracy (|error| <= sum_i |w_i| * amax(x block) / 254,
# ~0.5% of the output's rms for random data; tested against that rounding done in numpy). The
# default "fp32" keeps the product exact to fp32 rounding, the same numbers as the pure-JAX path.
KERNEL_ACTIVATIONS = os.environ.get("NANOJAX_KERNEL_ACTIVATIONS", "fp32")
_TARGETS = {"int8": "nanojax_int8_matmul", "int4": "nanojax_int4_matmul"}
_FP32_TARGET = "nanojax_fp32_matmul"  # csrc/fmatmul.cc: fp32 x (M, I) @ w (I, O), M <= FP32_KERNEL_MAX_ROWS
_ATTN_TARGET = "nanojax_decode_attention"  # csrc/dattn.cc: one query per row over the slot cache
_ADAMW_TARGET = "nanojax_adamw"  # csrc/adamw.cc: the whole clipped AdamW update, in place
GEMM_TARGET = "nanojax_gemm"  # csrc/gemm.cc: fp32 op(a) @ op(b) on MKL's sgemm (nanojax.kernels.cpu_gemm)
GEMM_BF16_TARGET = "nanojax_gemm_bf16"  # the same for bf16 a, b (fp32 sums and result)
GEMM_BF16_DNNL_TARGET = "nanojax_onednn_gemm_bf16"  # the bf16 product on oneDNN's matmul
# csrc/fattn.cc: causal training attention, forward and backward (nanojax.kernels.cpu_attention)
_TRAIN_ATTN_TARGETS = {"nanojax_causal_attention_fwd": "NjCausalAttentionFwd",
                       "nanojax_causal_attention_bwd": "NjCausalAttentionBwd"}
# csrc/norm.cc: LayerNorm / RMSNorm for training, forward and backward (nanojax.kernels.cpu_norm)
_NORM_TARGETS = {"nanojax_norm_fwd": "NjNormFwd", "nanojax_norm_bwd": "NjNormBwd"}

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str, "bits": int, once loaded


# ----------------------------------------------------------------------------------------------
# The pure-JAX reference (also the GPU path and the CPU fallback).


# The unpacking and group scaling are the records' own (nanojax.quant.arrays, imported as a module:
# arrays imports this file while it loads), here in float32 and transposed to W (I, O).


def dequantize_int8(q: jax.Array, scale: jax.Array, group_size: int) -> jax.Array:
    """int8 q (O, I), scale (O, I // G) -> fp32 W (I, O)."""
    return _layout.dequantize_rows(q, scale, group_size, jnp.float32).T


def unpack_int4(q: jax.Array) -> jax.Array:
    """uint8 q (O, I // 2) -> int8 values (O, I) in [-8, 7]: low nibble first, each stored as value + 8."""
    return _layout.unpack_values(q, 4)


def dequantize_int4(q: jax.Array, scale: jax.Array, group_size: int) -> jax.Array:
    """uint8 q (O, I // 2), scale (O, I // G) -> fp32 W (I, O)."""
    return dequantize_int8(unpack_int4(q), scale, group_size)


def _reference(x: jax.Array, w: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Building and loading the kernel library.


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(f for f in line.split(":", 1)[1].split()
                                       if f.startswith(("avx", "fma", "f16c", "sse4"))))
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("NANOJAX_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanojax", "kernels")
    return Path(root)


def library_path(cxx: str = "g++") -> Path:
    """Where the kernel library for this source, jaxlib, compiler and CPU lives in the cache."""
    import jaxlib

    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CSRC / name).read_bytes())
    try:
        ver = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        ver = ""
    link = blas.link_args()  # with MKL / oneDNN: the libraries' paths, and their sizes and times below
    mkl = [f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in map(Path, link)
           if p.suffix == ".a" or p.name == blas.DNNL_SONAME]
    h.update(f"{jaxlib.__version__}|{CXXFLAGS}|{ver.splitlines()[:1]}|{_cpu_flags()}|{platform.machine()}|"
             f"{link}|{mkl}".encode())
    return _cache_dir() / h.hexdigest()[:16] / "libnjquant.so"


def build(cxx: str | None = None, verbose: bool = False) -> Path:
    """Compile csrc/ into the cache (atomic: a temp file renamed into place); returns the .so path.

    Raises RuntimeError with the compiler's message when the build fails.
    """
    cxx = cxx or os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (install g++, or set CXX)")
    out = library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    # -march is left at the x86-64 baseline: the AVX2 / AVX-512 loops carry their own target
    # attributes and are chosen at run time, so the library runs on any x86-64 CPU.
    units = [str(CSRC / name) for name in SOURCES if name.endswith(".cc")]
    cmd = [cxx, *CXXFLAGS, "-isystem", jax.ffi.include_dir(), *units, *blas.link_args(), "-o", tmp]
    if verbose:
        print(" ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise RuntimeError(f"{cxx} failed to run: {e}") from e
    if res.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{cxx} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def _load() -> bool:
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        why = None
        if os.environ.get("NANOJAX_NO_KERNELS", "") not in ("", "0"):
            why = "NANOJAX_NO_KERNELS is set"
        elif platform.machine() not in ("x86_64", "AMD64"):
            why = f"the kernels are written for x86-64, this is {platform.machine()}"
        else:
            try:
                lib = ctypes.CDLL(str(build()))
                for scheme, target in _TARGETS.items():
                    fn = lib.NjInt8Matmul if scheme == "int8" else lib.NjInt4Matmul
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
                jax.ffi.register_ffi_target(_FP32_TARGET, jax.ffi.pycapsule(lib.NjFp32Matmul), platform="cpu")
                jax.ffi.register_ffi_target(_ATTN_TARGET, jax.ffi.pycapsule(lib.NjDecodeAttention),
                                            platform="cpu")
                jax.ffi.register_ffi_target(_ADAMW_TARGET, jax.ffi.pycapsule(lib.NjAdamW), platform="cpu")
                for target, fn in ((GEMM_TARGET, lib.NjGemm), (GEMM_BF16_TARGET, lib.NjGemmBf16),
                                   (GEMM_BF16_DNNL_TARGET, lib.NjGemmBf16Dnnl)):
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
                for target, fn in (*_TRAIN_ATTN_TARGETS.items(), *_NORM_TARGETS.items()):
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, fn)), platform="cpu")
                lib.nj_attn_vector_bits.restype = ctypes.c_int
                lib.nj_adamw_vector_bits.restype = ctypes.c_int
                lib.nj_attn_vector_bits.argtypes = [ctypes.c_int64]
                lib.nj_norm_vector_bits.restype = ctypes.c_int
                lib.nj_norm_vector_bits.argtypes = [ctypes.c_int64]
                lib.nj_quant_vector_bits.restype = ctypes.c_int
                lib.nj_fp32_vector_bits.restype = ctypes.c_int
                bits = lib.nj_quant_vector_bits()
                _state["bits"], _state["vnni"] = bits & ~1, bool(bits & 1)
                _state["fp32_bits"] = lib.nj_fp32_vector_bits()
                libs = lib.nj_gemm_blas()
                _state["gemm_blas"] = "mkl" if libs & 1 else None
                _state["gemm_onednn"] = bool(libs & 2)
                _state["lib"] = lib  # keep the library loaded
            except (RuntimeError, OSError, AttributeError) as e:
                why = str(e)
        _state["ok"] = why is None
        if why is not None:
            _state["why"] = why
            warnings.warn(f"nanojax CPU kernels unavailable ({why}); XLA runs their parts instead "
                          "(quantized products dequantize first, training attention and AdamW are "
                          "XLA's: the same numbers to fp32 rounding, slower on CPU). Build them with "
                          "`make kernels` (needs g++).", RuntimeWarning, stacklevel=3)
        return _state["ok"]


def kernels_available() -> bool:
    """True when the C++ kernels are built and registered (builds them on first call if needed)."""
    return _load()


def kernels_info() -> dict:
    """What `kernels_available` found: {"available", "vector_bits" (512/256/0), "vnni" (int4 x int8
    activations in integers), "fp32_vector_bits" (the fp32 kernel's loops), "gemm_blas" (the BLAS
    the training gemm kernel calls: "mkl", or None when built without one), "gemm_onednn" (its
    bf16 products can run on oneDNN), "why" (if not)}."""
    ok = _load()
    return {"available": ok, "vector_bits": _state.get("bits", 0), "vnni": _state.get("vnni", False),
            "fp32_vector_bits": _state.get("fp32_bits", 0), "gemm_blas": _state.get("gemm_blas"),
            "gemm_onednn": _state.get("gemm_onednn", False), "why": _state.get("why")}


def _reset_for_tests() -> None:
    """Forget the load result so a test can load again under another environment."""
    with _lock:
        _state.clear()


# ----------------------------------------------------------------------------------------------
# The public products.


def _check(name: str, x, q, scale, group_size: int, int4: bool) -> tuple[int, int, int]:
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be 2-D (M, I), got shape {x.shape}; reshape it first")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"{name}: x must be float32 or bfloat16, got {x.dtype}")
    want = jnp.uint8 if int4 else jnp.int8
    if q.dtype != want or q.ndim != 2:
        raise ValueError(f"{name}: q must be a 2-D {np.dtype(want).name} array, got {q.dtype} {q.shape}")
    M, I = x.shape
    O = q.shape[0]
    if int4 and I % 2:
        raise ValueError(f"{name}: I = {I} must be even (two int4 values per byte)")
    if group_size <= 0 or I % group_size:
        raise ValueError(f"{name}: group_size {group_size} must divide I = {I}")
    if int4 and group_size % 32:
        raise ValueError(f"{name}: int4 group_size must be a multiple of 32 (32/64/128), got {group_size}")
    if q.shape[1] != (I // 2 if int4 else I):
        raise ValueError(f"{name}: q has shape {q.shape}, expected (O, {I // 2 if int4 else I}) for x of "
                         f"shape {x.shape}")
    if scale.shape != (O, I // group_size) or scale.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"{name}: scale must be float32/bfloat16 of shape {(O, I // group_size)}, got "
                         f"{scale.dtype} {scale.shape}")
    return M, I, O


def _use_kernel(x: jax.Array, M: int) -> bool:
    if M == 0 or M > KERNEL_MAX_ROWS or not _load():
        return False
    # The kernel is registered for the CPU platform only; elsewhere XLA fuses the dequantization.
    return jax.default_backend() == "cpu"


def _call(scheme: str, x, q, scale, group_size: int, M: int, O: int, **attrs) -> jax.Array:
    call = jax.ffi.ffi_call(_TARGETS[scheme], jax.ShapeDtypeStruct((M, O), x.dtype),
                            vmap_method="sequential")
    return call(x, q, scale, group_size=np.int64(group_size), **{k: np.int64(v) for k, v in attrs.items()})


def _activations(name: str, activations: str | None) -> str:
    activations = activations or KERNEL_ACTIVATIONS
    if activations not in ("int8", "fp32"):
        raise ValueError(f"{name}: activations must be 'int8' or 'fp32', got {activations!r} (or set "
                         "NANOJAX_KERNEL_ACTIVATIONS)")
    return activations


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, group_size: int, *,
                activations: str | None = None) -> jax.Array:
    """x (M, I) float32|bfloat16 @ int8 W -> (M, O) in x.dtype.

    q: int8 (O, I); scale: (O, I // group_size) float32|bfloat16 (group_size = I: one per channel).
    activations: "fp32" (default: KERNEL_ACTIVATIONS) keeps x exact; "int8" lets the kernel on a VNNI
    CPU round x to int8 per 32-block (I a multiple of 32), faster. The pure-JAX path is always exact.
    """
    M, I, O = _check("int8_matmul", x, q, scale, group_size, int4=False)
    activations = _activations("int8_matmul", activations)
    if _use_kernel(x, M):
        return _call("int8", x, q, scale, group_size, M, O, int8_activations=activations == "int8")
    return _reference(x, dequantize_int8(q, scale, group_size))


def int4_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, group_size: int, *,
                activations: str | None = None) -> jax.Array:
    """x (M, I) float32|bfloat16 @ int4 W -> (M, O) in x.dtype.

    q: uint8 (O, I // 2), two values per byte (low nibble = even element, stored as value + 8);
    scale: (O, I // group_size), group_size in {32, 64, 128} dividing I.
    activations: "fp32" (default: KERNEL_ACTIVATIONS) keeps x exact; "int8" lets the kernel on a VNNI
    CPU round x to int8 per 32-block, faster. The pure-JAX path is always exact.
    """
    M, I, O = _check("int4_matmul", x, q, scale, group_size, int4=True)
    activations = _activations("int4_matmul", activations)
    if _use_kernel(x, M):
        return _call("int4", x, q, scale, group_size, M, O, int8_activations=activations == "int8")
    return _reference(x, dequantize_int4(q, scale, group_size))


def int8_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array, group_size: int) -> jax.Array:
    """The pure-JAX path of `int8_matmul` (any backend)."""
    _check("int8_matmul", x, q, scale, group_size, int4=False)
    return _reference(x, dequantize_int8(q, scale, group_size))


def int4_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array, group_size: int) -> jax.Array:
    """The pure-JAX path of `int4_matmul` (any backend)."""
    _check("int4_matmul", x, q, scale, group_size, int4=True)
    return _reference(x, dequantize_int4(q, scale, group_size))


# ----------------------------------------------------------------------------------------------
# The fp32 product for small M (csrc/fmatmul.cc), behind nanojax.dense.matmul.


def _switched_off(var: str) -> bool:
    """Whether the environment variable var turns a kernel off ("0", "false", "no" or "off")."""
    return os.environ.get(var, "1") in ("0", "false", "no", "off")


def fp32_kernel_enabled(force: bool = False) -> bool:
    """Whether `nanojax.dense.matmul` may route small-M fp32 products to the kernel: the CPU backend,
    the library loaded, and NANOJAX_FP32_KERNEL not "0" (unless `force`: dense.fp32_kernel(True))."""
    if not force and _switched_off("NANOJAX_FP32_KERNEL"):
        return False
    return jax.default_backend() == "cpu" and _load()


def fp32_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, I) float32 @ w (I, O) float32 -> (M, O) float32, 1 <= M <= FP32_KERNEL_MAX_ROWS, on the CPU.

    w is read in place in its (I, O) layout. Each output is a fixed-order fp32 sum: an fma chain in
    input order over each block of 128 input rows, the blocks' sums added in order (csrc/fmatmul.cc),
    so a row's result does not depend on M, the batch it sits in or the thread count. It
    agrees with `x @ w` to fp32 rounding. Needs the kernels (`kernels_available()`); callers that
    want a fallback go through `nanojax.dense.matmul`, which picks XLA's dot when this cannot run.
    Under vmap the call runs once per mapped element (sequential).
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"fp32_matmul: need x (M, I) and w (I, O), got {x.shape} and {w.shape}; reshape "
                         "them to 2-D first")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"fp32_matmul: x and w must be float32, got {x.dtype} and {w.dtype}; cast them, "
                         "or call x @ w for other dtypes")
    if not 1 <= x.shape[0] <= FP32_KERNEL_MAX_ROWS:
        raise ValueError(f"fp32_matmul: x has {x.shape[0]} rows, the kernel takes 1..{FP32_KERNEL_MAX_ROWS}; "
                         "use x @ w for larger M (XLA's dot is faster there)")
    if not _load():
        raise RuntimeError(f"fp32_matmul: the CPU kernels are unavailable ({_state.get('why')}); build "
                           "them with `make kernels`, or use x @ w")
    call = jax.ffi.ffi_call(_FP32_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(x, w)


# ----------------------------------------------------------------------------------------------
# Decode attention over the serving engine's slot cache (csrc/dattn.cc), behind infer/slots.py.


def attention_kernel_enabled(head_dim: int) -> bool:
    """Whether infer/slots.py's decode may use `decode_attention`: the CPU backend, the library
    loaded, its AVX-512 loop for this head size (elsewhere XLA's batched dots stay: the scalar loop
    is for tests), and NANOJAX_ATTN_KERNEL not "0" (read at each decode_chunk call)."""
    if _switched_off("NANOJAX_ATTN_KERNEL"):
        return False
    return jax.default_backend() == "cpu" and _load() and _state["lib"].nj_attn_vector_bits(head_dim) == 512


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array, lens: jax.Array,
                     kv_heads: int, starts: jax.Array | None = None) -> jax.Array:
    """One query per row over its own slot of the cache, on the CPU.

    q float32 (R, N, H); k, v float32 (S*K, C, H) (K = kv_heads; slot s's kv head j is row s*K + j),
    read in place; rows int32 (R,): each query row's slot; lens int32 (R,) and starts int32 (R,)
    (default zeros): it attends to cache positions [starts[r], lens[r]) (lens clamped to [1, C],
    starts to [0, lens - 1]). Query head n uses kv head n // (N / K). Returns
    float32 (R, N, H) = softmax(q k^T / sqrt(H)) v per row and head; a row's result does not depend
    on the other rows. Needs the kernels (`kernels_available()`).
    """
    R, N, H = q.shape
    if k.ndim != 3 or k.shape != v.shape or k.shape[2] != H or N % kv_heads or k.shape[0] % kv_heads:
        raise ValueError(f"decode_attention: need q (R, N, H) and k, v (S*K, C, H) with K = kv_heads "
                         f"({kv_heads}) dividing N and S*K; got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
        raise ValueError(f"decode_attention: q, k and v must be float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not _load():
        raise RuntimeError(f"decode_attention: the CPU kernels are unavailable ({_state.get('why')}); build "
                           "them with `make kernels`")
    call = jax.ffi.ffi_call(_ATTN_TARGET, jax.ShapeDtypeStruct((R, N, H), jnp.float32),
                            vmap_method="sequential")
    starts = jnp.zeros((R,), jnp.int32) if starts is None else starts
    return call(q, k, v, rows.astype(jnp.int32), lens.astype(jnp.int32), jnp.asarray(starts, jnp.int32),
                kv_heads=np.int64(kv_heads))


def adamw_kernel_enabled() -> bool:
    """Whether train/step.py's jit step may run the AdamW update as `adamw`: the CPU backend, the
    library loaded (AVX-512 or AVX2 loop; the scalar one is for tests), and NANOJAX_ADAMW_KERNEL not
    "0" (read when the step is built)."""
    if _switched_off("NANOJAX_ADAMW_KERNEL"):
        return False
    return jax.default_backend() == "cpu" and _load() and _state["lib"].nj_adamw_vector_bits() > 0


def adamw(hyper: jax.Array, decay: jax.Array, params: list, mu: list, nu: list,
          grads: list) -> tuple[list, list, list]:
    """The clipped AdamW update of L float32 arrays in one call (csrc/adamw.cc has the formula).

    hyper float32 (11,): lr, b1, 1 - b1, b2, 1 - b2, eps, 1 - b1^t, 1 - b2^t, the gradients' global
    norm, the clip threshold (inf: none), ok (0: change nothing); decay float32 (L,): each leaf's
    weight decay (0: not decayed). params, mu, nu, grads: L arrays each, leaf i of the four the
    same size. Returns the new (params, mu, nu), computed in place of the old ones (aliased: donate
    them, or XLA copies them first). Needs the kernels (`kernels_available()`)."""
    L = len(params)
    if not (len(mu) == len(nu) == len(grads) == L == decay.shape[0]) or hyper.shape != (11,):
        raise ValueError(f"adamw: need hyper (11,) and decay (L,) with L params, moments and gradients; got "
                         f"hyper {hyper.shape}, decay {decay.shape}, {L}/{len(mu)}/{len(nu)}/{len(grads)}")
    for i, (p, m, v, g) in enumerate(zip(params, mu, nu, grads, strict=True)):
        if not p.shape == m.shape == v.shape == g.shape or any(a.dtype != jnp.float32 for a in (p, m, v, g)):
            raise ValueError(f"adamw: leaf {i}: params, moments and gradient must be float32 of one "
                             f"shape; got {[(a.shape, str(a.dtype)) for a in (p, m, v, g)]}")
    if not _load():
        raise RuntimeError(f"adamw: the CPU kernels are unavailable ({_state.get('why')}); build them with "
                           "`make kernels`")
    arrays = [*params, *mu, *nu]
    call = jax.ffi.ffi_call(_ADAMW_TARGET, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
                            input_output_aliases={2 + i: i for i in range(3 * L)})
    out = call(hyper, decay, *arrays, *grads)
    return list(out[:L]), list(out[L:2 * L]), list(out[2 * L:])
