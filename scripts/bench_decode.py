"""Decode throughput: nanojax `generate` against Hugging Face `transformers` `generate`, side by side.

    python scripts/bench_decode.py                         # the CPU table in docs/performance/decode.md
    python scripts/bench_decode.py --shapes=llama-134m --batches=1 --repeats=5
    python scripts/bench_decode.py --shapes=llama2-7b --dtype=bfloat16 --no_hf   # on a GPU
    python scripts/bench_decode.py --shapes=llama-134m --batches=1 --quant=fp32,int8,int4 --llama_cpp --no_hf
                                                     # docs/quantization.md: quantized + llama.cpp
    python scripts/bench_decode.py --shapes=llama-134m --batches=1 --quant=fp32 --fp32_ab --llama_cpp
                                       # docs/performance/decode.md: fp32 kernel vs XLA vs llama.cpp

Both sides get the same random weights (nanojax params converted into a transformers model),
the same prompts (random ids, `--prompt_len` long) and greedy decoding of `--new_tokens` tokens;
tokens/s counts new tokens of the whole batch over the wall time of one `generate` call, prefill
included. Runs alternate (nanojax, HF, nanojax, HF, ...) so machine noise hits both; the median
of `--repeats` runs is reported. The roofline is the time to read every weight once per decode
step (the embedding table's rows are gathered, not read whole) at a copy bandwidth measured here
with a large jax copy; the DESIGN.md practical figure for these CPUs (31 GB/s, llama.cpp fp32)
is printed alongside. Shapes whose context is shorter than prompt + new tokens (the Shakespeare
shape has 64) get a longer position table for the run; nothing else changes.
"""

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _bench_quant as bq  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nanojax as nj  # noqa: E402
from nanojax.dense import fp32_kernel  # noqa: E402
from nanojax.interop.gguf import write_gguf  # noqa: E402
from nanojax.metrics import cpu_description, usable_cpus  # noqa: E402
from nanojax.quant import ffi  # noqa: E402

DEFAULT_BATCHES = {"shakespeare-char-cpu": "1,8", "gpt2-small": "1,8", "llama-134m": "1", "llama2-7b": "1"}
PRACTICAL_CPU_GBPS = 31.0  # DESIGN.md: llama.cpp fp32 on the 134M Llama shape reads ~31 GB/s here

flags.DEFINE_list("shapes", ["shakespeare-char-cpu", "gpt2-small", "llama-134m"], "ModelConfig presets.")
flags.DEFINE_list("batches", None, "Batch sizes for every shape (default: 1,8 for the small shapes, "
                  "1 for the Llama shapes).")
flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
flags.DEFINE_integer("prompt_len", 16, "Prompt length in tokens.")
flags.DEFINE_integer("repeats", 3, "Timed runs per side (after one warm-up run each).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and compute dtype.")
flags.DEFINE_boolean("no_hf", False, "Skip the transformers baseline (e.g. a 7B shape on a GPU).")
flags.DEFINE_enum("hf_attn", "sdpa", ["sdpa", "eager"], "transformers attention implementation.")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads for the baseline.")
flags.DEFINE_list("quant", ["fp32"], "nanojax weight formats: fp32 (the --dtype params), int8 (per-channel), "
                  "int4 (group --group_size). Anything but fp32 alone switches to the quantized table.")
flags.DEFINE_list("kernel_activations", ["fp32", "int8"], "x precision inside the quantized CPU kernels "
                  "(nanojax.quant.ffi): one row per value for every int8/int4 format.")
flags.DEFINE_integer("group_size", 32, "int4 group size.")
flags.DEFINE_boolean("llama_cpp", False, "Also run llama.cpp (llama-cpp-python, the `bench` extra) on the "
                     "same weights written as GGUF F32 / Q8_0 / Q4_0, batch 1.")
flags.DEFINE_integer("llama_threads", 2, "llama.cpp threads.")
flags.DEFINE_boolean("pack", True, "nanojax's weights in one 2 MiB-page arena (nj.pack_weights), as "
                     "scripts/sample.py and serve.py load them; --nopack: XLA's own buffers.")
flags.DEFINE_list("llama_types", ["F32", "Q8_0", "Q4_0", "Q4_0/Q8_0"],
                  "GGUF types llama.cpp runs (with --llama_cpp); BODY/HEAD gives an untied head its own "
                  "type (Q4_0/Q8_0: a 4-bit body with an 8-bit head, as wide as nanojax int4's int8 head; "
                  "llama.cpp's own quantizer keeps the head wider than a Q4_0 body too).")
flags.DEFINE_boolean("fp32_ab", False, "Add a 'nanojax fp32 (XLA dots)' row: the fp32 params with the "
                     "small-M fp32 CPU kernel switched off (nanojax.dense.fp32_kernel(False)), interleaved "
                     "with the default row (kernel on) in the quantized-table run.")
flags.DEFINE_string("json", "", "With --llama_cpp, --quant or --fp32_ab: also write the table's rows "
                    "(tok/s per variant) and the CPU line to this JSON file (scripts/cpu_bars.py reads it).")
flags.DEFINE_float("pause_s", 0.5, "Idle seconds before each timed run (lets spinning threads sleep).")
FLAGS = flags.FLAGS


def bench_config(name: str, dtype: str, total_len: int) -> nj.ModelConfig:
    cfg = nj.ModelConfig.preset(name, dtype=dtype, param_dtype=dtype)
    return cfg.replace(max_seq_len=max(cfg.max_seq_len, total_len))


def weight_bytes(params: dict, cfg: nj.ModelConfig) -> int:
    """Bytes read per decode step: every weight once, except the gathered embedding tables."""
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if "wpe" in params:
        total -= params["wpe"].nbytes
    if not cfg.tie_embeddings:  # a tied wte is also the head, read whole every step
        total -= params["wte"].nbytes
    return total


def copy_bandwidth() -> float:
    """Bytes/s of a large copy (read + write counted, as in STREAM): numpy's memcpy on the host
    (XLA:CPU's own elementwise copy is slower than memcpy here), a jax copy on an accelerator."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        src = np.ones(512 * 2**20 // 4, np.float32)
        dst = np.empty_like(src)
        copy = lambda: np.copyto(dst, src)  # noqa: E731
    else:
        src = jnp.ones(4 * 2**30 // 4, jnp.float32)
        fn = jax.jit(lambda a: a + 1)
        copy = lambda: fn(src).block_until_ready()  # noqa: E731
    copy()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


# ----------------------------------------------------------------------------------------------
# The transformers baseline with nanojax's weights.


def to_hf(params: dict, cfg: nj.ModelConfig, attn: str):
    """A transformers GPT-2 or Llama model holding the same weights (float32 torch tensors)."""
    import torch
    import transformers

    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    D, N, K, H, F = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim, cfg.ff_dim
    sd = {}
    if cfg.pos_emb == "learned":  # GPT-2
        hc = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=D,
                                     n_layer=cfg.n_layer, n_head=N, n_inner=F, activation_function="gelu_new",
                                     layer_norm_epsilon=cfg.norm_eps, bos_token_id=None, eos_token_id=None,
                                     attn_implementation=attn)
        model_cls = transformers.GPT2LMHeadModel

        def b(d, key, n):  # a missing bias (bias=False shapes) is a zero bias
            return d.get(key, np.zeros((n,), np.float32)).reshape(-1)

        sd["transformer.wte.weight"] = p["wte"]
        sd["transformer.wpe.weight"] = p["wpe"]
        for i, lp in enumerate(p["layers"]):
            pre, a, m = f"transformer.h.{i}.", lp["attn"], lp["mlp"]
            sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"] = lp["ln1"]["scale"], b(lp["ln1"], "bias", D)
            sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"] = lp["ln2"]["scale"], b(lp["ln2"], "bias", D)
            sd[pre + "attn.c_attn.weight"] = np.concatenate(
                [a[w].reshape(D, N * H) for w in ("wq", "wk", "wv")], axis=1)  # Conv1D: (in, out)
            sd[pre + "attn.c_attn.bias"] = np.concatenate([b(a, n, N * H) for n in ("bq", "bk", "bv")])
            sd[pre + "attn.c_proj.weight"] = a["wo"].reshape(N * H, D)
            sd[pre + "attn.c_proj.bias"] = b(a, "bo", D)
            sd[pre + "mlp.c_fc.weight"], sd[pre + "mlp.c_fc.bias"] = m["w_in"], b(m, "b_in", F)
            sd[pre + "mlp.c_proj.weight"], sd[pre + "mlp.c_proj.bias"] = m["w_out"], b(m, "b_out", D)
        sd["transformer.ln_f.weight"] = p["ln_f"]["scale"]
        sd["transformer.ln_f.bias"] = b(p["ln_f"], "bias", D)
        sd["lm_head.weight"] = p["wte"]
    else:  # Llama
        hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=D, intermediate_size=F,
                                      num_hidden_layers=cfg.n_layer, num_attention_heads=N,
                                      num_key_value_heads=K, head_dim=H,
                                      max_position_embeddings=cfg.max_seq_len,
                                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                                      tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None, attn_implementation=attn)
        model_cls = transformers.LlamaForCausalLM
        sd["model.embed_tokens.weight"] = p["wte"]
        for i, lp in enumerate(p["layers"]):
            pre, a, m = f"model.layers.{i}.", lp["attn"], lp["mlp"]
            sd[pre + "input_layernorm.weight"] = lp["ln1"]["scale"]
            sd[pre + "post_attention_layernorm.weight"] = lp["ln2"]["scale"]
            sd[pre + "self_attn.q_proj.weight"] = a["wq"].reshape(D, N * H).T  # Linear: (out, in)
            sd[pre + "self_attn.k_proj.weight"] = a["wk"].reshape(D, K * H).T
            sd[pre + "self_attn.v_proj.weight"] = a["wv"].reshape(D, K * H).T
            sd[pre + "self_attn.o_proj.weight"] = a["wo"].reshape(N * H, D).T
            sd[pre + "mlp.gate_proj.weight"] = m["w_gate"].T
            sd[pre + "mlp.up_proj.weight"] = m["w_up"].T
            sd[pre + "mlp.down_proj.weight"] = m["w_down"].T
        sd["model.norm.weight"] = p["ln_f"]["scale"]
        sd["lm_head.weight"] = (p["wte"] if cfg.tie_embeddings else p["lm_head"].T)
    with torch.device("meta"):
        model = model_cls(hc)
    tensors = {k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.eval()
    if hasattr(model, "model") and hasattr(model.model, "rotary_emb"):  # buffers made on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=hc)
    return model


# ----------------------------------------------------------------------------------------------


def run_case(name: str, batch: int, rng: np.random.Generator) -> dict:
    total = FLAGS.prompt_len + FLAGS.new_tokens
    cfg = bench_config(name, FLAGS.dtype, total)
    params = nj.init_params(cfg, jax.random.key(0))
    jax.block_until_ready(params)
    nj_params = nj.pack_weights(params) if FLAGS.pack else params
    prompts = rng.integers(0, cfg.vocab_size, (batch, FLAGS.prompt_len)).tolist()
    n = FLAGS.new_tokens

    def nj_run():
        t0 = time.perf_counter()
        out = nj.generate(nj_params, cfg, prompts, max_new_tokens=n)
        return time.perf_counter() - t0, out

    t0 = time.perf_counter()
    _, nj_out = nj_run()  # compiles
    compile_s = time.perf_counter() - t0
    hf_run = None
    hf_out = None
    if not FLAGS.no_hf:
        import torch

        torch.set_num_threads(FLAGS.torch_threads)
        model = to_hf(params, cfg, FLAGS.hf_attn)
        ids = torch.tensor(prompts)

        def hf_run():
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0, out[:, FLAGS.prompt_len:].tolist()

        _, hf_out = hf_run()
    nj_times, hf_times = [], []
    for _ in range(FLAGS.repeats):
        # Pause before each timed run: the other library's idle workers spin for a while after a
        # call (OpenMP's default is ~200 ms) and would steal one of the two cores.
        time.sleep(FLAGS.pause_s)
        nj_times.append(nj_run()[0])
        if hf_run is not None:
            time.sleep(FLAGS.pause_s)
            hf_times.append(hf_run()[0])
    res = {"shape": name, "batch": batch, "cfg": cfg, "compile_s": compile_s - statistics.median(nj_times),
           "nj_tps": batch * n / statistics.median(nj_times), "wbytes": weight_bytes(params, cfg)}
    if hf_times:
        res["hf_tps"] = batch * n / statistics.median(hf_times)
        same = [a == b for a, b in zip(nj_out, hf_out, strict=True)]
        res["same"] = f"{sum(same)}/{len(same)}"
    return res


# ----------------------------------------------------------------------------------------------
# Quantized formats and llama.cpp, interleaved in one process.


def run_quant_case(name: str, batch: int, rng: np.random.Generator) -> list[dict]:
    """One row per variant: nanojax fp32 / int8 / int4 (each kernel activation mode) and llama.cpp
    F32 / Q8_0 / Q4_0. Timed runs go round-robin over all variants, so load hits each alike."""
    import tempfile

    total = FLAGS.prompt_len + FLAGS.new_tokens
    cfg = bench_config(name, FLAGS.dtype, total)
    params = nj.init_params(cfg, jax.random.key(0))
    prompts = rng.integers(0, cfg.vocab_size, (batch, FLAGS.prompt_len)).tolist()
    n = FLAGS.new_tokens
    pack = nj.pack_weights if FLAGS.pack else (lambda tree: tree)
    variants = {}  # label -> (run() -> tokens, bytes read per step)
    packed = pack(params) if "fp32" in FLAGS.quant else None
    for fmt in FLAGS.quant:
        if fmt == "fp32":
            variants["nanojax fp32"] = (lambda p=packed: nj.generate(p, cfg, prompts, max_new_tokens=n),
                                        weight_bytes(params, cfg))
            if FLAGS.fp32_ab:
                def xla_run(p=packed):
                    with fp32_kernel(False):  # re-traces: XLA's dots instead of the kernel
                        return nj.generate(p, cfg, prompts, max_new_tokens=n)
                variants["nanojax fp32 (XLA dots)"] = (xla_run, weight_bytes(params, cfg))
            continue
        for act in FLAGS.kernel_activations:
            qp = pack(nj.quantize(params, cfg, fmt, FLAGS.group_size if fmt == "int4" else None,
                                  kernel_activations=act))
            label = f"nanojax {fmt}" + (f" g{FLAGS.group_size}" if fmt == "int4" else "") + f" (x {act})"
            variants[label] = (lambda p=qp: nj.generate(p, cfg, prompts, max_new_tokens=n),
                               weight_bytes(qp, cfg))
    tmp = tempfile.TemporaryDirectory(prefix="nanojax_gguf_")
    if FLAGS.llama_cpp:
        if batch != 1 or cfg.pos_emb != "rope":
            print(f"# llama.cpp rows skipped for {name} batch {batch}: the runner does Llama shapes, batch 1")
        else:
            for ft in FLAGS.llama_types:
                body, head = llama_type(ft)
                path = os.path.join(tmp.name, f"{name}-{ft.replace('/', '-')}.gguf")
                write_gguf(params, cfg, path, body, head_qtype=head)
                runner = bq.LlamaCppRunner(path, n_ctx=total + 8, threads=FLAGS.llama_threads,
                                           n_batch=max(FLAGS.prompt_len, 8))
                variants[llama_label(body, head)] = (lambda r=runner: [r.generate(prompts[0], n)],
                                                     os.path.getsize(path))
    outs = {k: run() for k, (run, _) in variants.items()}  # warm-up: compiles / loads
    times = {k: [] for k in variants}
    for _ in range(FLAGS.repeats):
        for k, (run, _) in variants.items():
            time.sleep(FLAGS.pause_s)
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    ref = outs.get("nanojax fp32")
    rows = []
    for k, (_, nbytes) in variants.items():
        same = None if ref is None else sum(a == b for a, b in zip(ref[0], outs[k][0], strict=True))
        rows.append({"label": k, "tps": batch * n / statistics.median(times[k]), "bytes": nbytes,
                     "same": same, "shape": name, "batch": batch})
    tmp.cleanup()
    return rows


def llama_type(ft: str) -> tuple[str, str | None]:
    """A --llama_types entry, TYPE or BODY/HEAD, as (body type, head type or None)."""
    from nanojax.interop.gguf import WRITE_TYPES

    parts = ft.split("/")
    if len(parts) > 2 or any(p not in WRITE_TYPES for p in parts):
        raise app.UsageError(f"--llama_types: {ft!r} is not TYPE or BODY/HEAD, types from {WRITE_TYPES}")
    return parts[0], parts[1] if len(parts) == 2 else None


def llama_label(body: str, head: str | None = None) -> str:
    """The row label of a --llama_types entry (llama_type's parts): "llama.cpp Q4_0", or
    "llama.cpp Q4_0 (Q8_0 head)"."""
    return f"llama.cpp {body}" + (f" ({head} head)" if head else "")


def print_quant_table(rows: list[dict]) -> None:
    print("| shape | batch | variant | weights MB | tok/s | vs nanojax fp32 | vs llama.cpp same bits | "
          "greedy tokens = nanojax fp32 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        # ratios within one (shape, batch): the rows of other batches are other workloads
        tps = {q["label"]: q["tps"] for q in rows if (q["shape"], q["batch"]) == (r["shape"], r["batch"])}
        base = tps.get("nanojax fp32")
        lab = r["label"]
        peer = None
        if lab.startswith("nanojax int8"):
            peer = tps.get("llama.cpp Q8_0")
        elif lab.startswith("nanojax int4"):  # the same head width where that row ran (int8 vs Q8_0)
            peer = tps.get(llama_label("Q4_0", "Q8_0")) or tps.get("llama.cpp Q4_0")
        elif lab.startswith("nanojax fp32"):
            peer = tps.get("llama.cpp F32")
        print(f"| {r['shape']} | {r['batch']} | {lab} | {r['bytes'] / 1e6:.0f} | {r['tps']:.1f} | "
              + (f"{r['tps'] / base:.2f}x" if base else "-") + " | "
              + (f"{r['tps'] / peer:.2f}x" if peer else "-") + " | "
              + ("-" if r["same"] is None else f"{r['same']}/{FLAGS.new_tokens}") + " |")


def main(argv):
    del argv
    if FLAGS.quant != ["fp32"] or FLAGS.llama_cpp or FLAGS.fp32_ab:
        return main_quant()
    if FLAGS.json:
        raise app.UsageError("--json writes the table of --llama_cpp, --quant or --fp32_ab runs: pass one")
    dev = jax.devices()[0]
    load_before = os.getloadavg()[0]
    bw = copy_bandwidth()
    on_cpu = dev.platform == "cpu"
    rng = np.random.default_rng(0)
    rows = []
    for name in FLAGS.shapes:
        for b in (FLAGS.batches or DEFAULT_BATCHES.get(name, "1").split(",")):
            res = run_case(name, int(b), rng)
            rows.append(res)
            print(f"# {name} batch {b}: nanojax {res['nj_tps']:.1f} tok/s"
                  + (f", HF {res['hf_tps']:.1f} tok/s" if "hf_tps" in res else ""), flush=True)
    print()
    print(f"date {datetime.date.today()}, {platform.node()}, {dev.device_kind} ({dev.platform}), "
          f"jax {jax.__version__}, dtype {FLAGS.dtype}, prompt {FLAGS.prompt_len} + {FLAGS.new_tokens} new "
          f"tokens, greedy, median of {FLAGS.repeats}")
    used = f"XLA {usable_cpus()}" if on_cpu else f"XLA on {dev.device_kind}"
    used += "" if FLAGS.no_hf else f", torch {FLAGS.torch_threads}"
    print(f"CPU: {cpu_description(used)}")
    if on_cpu:
        print(f"nanojax weights {'packed (nj.pack_weights)' if FLAGS.pack else 'in XLA buffers'}")
    print(f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work "
          "on the machine slows both sides, torch's OpenMP most)")
    print(f"measured copy bandwidth {bw / 1e9:.1f} GB/s (read + write of a large array copy)"
          + (f"; DESIGN.md practical CPU figure {PRACTICAL_CPU_GBPS:.0f} GB/s" if on_cpu else ""))
    print()
    head = "| shape | batch | weights MB | nanojax tok/s | compile s |"
    sep = "|---|---:|---:|---:|---:|"
    if not FLAGS.no_hf:
        head += f" HF {FLAGS.hf_attn} tok/s | ratio | same greedy tokens |"
        sep += "---:|---:|---:|"
    head += " roofline (measured BW) |" + (" roofline (31 GB/s) |" if on_cpu else "")
    sep += "---:|" + ("---:|" if on_cpu else "")
    print(head)
    print(sep)
    for r in rows:
        steps_per_s = r["nj_tps"] / r["batch"]  # weights are read once per step for the whole batch
        line = (f"| {r['shape']} | {r['batch']} | {r['wbytes'] / 1e6:.0f} | {r['nj_tps']:.1f} | "
                f"{r['compile_s']:.1f} |")
        if not FLAGS.no_hf:
            line += f" {r['hf_tps']:.1f} | {r['nj_tps'] / r['hf_tps']:.2f}x | {r['same']} |"
        line += f" {100 * r['wbytes'] * steps_per_s / bw:.0f}% |"
        if on_cpu:
            line += f" {100 * r['wbytes'] * steps_per_s / (PRACTICAL_CPU_GBPS * 1e9):.0f}% |"
        print(line)


def main_quant():
    for ft in FLAGS.llama_types if FLAGS.llama_cpp else []:
        llama_type(ft)  # a bad entry stops the run here, before any timing
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    rows = []
    for name in FLAGS.shapes:
        for b in (FLAGS.batches or DEFAULT_BATCHES.get(name, "1").split(",")):
            rows += run_quant_case(name, int(b), rng)
            print(f"# {name} batch {b} done", flush=True)
    print()
    info = ffi.kernels_info()
    print(f"date {datetime.date.today()}, {platform.node()}, jax {jax.__version__}, prompt "
          f"{FLAGS.prompt_len} + {FLAGS.new_tokens} new tokens, greedy, median of {FLAGS.repeats} "
          "interleaved runs")
    print(f"CPU: {cpu_description(f'XLA {usable_cpus()}, llama.cpp {FLAGS.llama_threads} threads')}")
    where = "packed (nj.pack_weights)" if FLAGS.pack else "in XLA buffers"
    print(f"nanojax kernels: {info}; weights {where}")
    print(f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print()
    print_quant_table(rows)
    if FLAGS.json:
        record = {"cpu": cpu_description(f"XLA {usable_cpus()}, llama.cpp {FLAGS.llama_threads} threads"),
                  "jax": jax.__version__, "new_tokens": FLAGS.new_tokens, "repeats": FLAGS.repeats,
                  "packed": FLAGS.pack, "rows": rows}
        Path(FLAGS.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
