"""llama.cpp side by side for scripts/bench_decode.py (benchmark helpers, not library code).

`write_gguf` writes the same Llama weights as a GGUF file llama.cpp runs, F32 / Q8_0 / Q4_0
quantized by the `gguf` package itself; `LlamaCppRunner` times llama-cpp-python (the optional
`bench` extra) on it. (nanojax.interop.gguf.write_gguf's files load in transformers and in
nanojax, but llama-cpp-python 0.3.36 refused one at the llama-134m shape; until that is found,
the benchmark keeps this writer, whose F32 file gives nanojax's greedy tokens in llama.cpp.)
"""

from __future__ import annotations

import jax
import numpy as np

import nanojax as nj

# ----------------------------------------------------------------------------------------------
# GGUF for llama.cpp.


def write_gguf(params: dict, cfg: nj.ModelConfig, path: str, ftype: str) -> None:
    """A Llama-architecture GGUF of these weights; ftype "F32", "Q8_0" or "Q4_0" (norms stay F32,
    as llama.cpp's converter keeps them; token embedding quantized like the rest, as it does).
    The vocabulary is a placeholder (<0>, <1>, ...): the bench feeds token ids, not text."""
    import gguf

    D, N, K, H, F = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim, cfg.ff_dim
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0,
             "Q4_0": gguf.GGMLQuantizationType.Q4_0}[ftype]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(D)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_rope_dimension_count(H)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": 0, "Q8_0": 7, "Q4_0": 2}[ftype])
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)

    def put(name, arr, quant=True):  # arr: (out, in) float32, as torch's Linear stores it
        arr = np.ascontiguousarray(arr, np.float32)
        if quant and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    def rope_perm(m, n):  # HF half-split rows -> GGUF's interleaved pairs (llama.cpp's converter)
        return m.reshape(n, 2, H // 2, -1).swapaxes(1, 2).reshape(m.shape)

    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    put("token_embd.weight", p["wte"])
    for i, lp in enumerate(p["layers"]):
        a, m = lp["attn"], lp["mlp"]
        put(f"blk.{i}.attn_norm.weight", lp["ln1"]["scale"], quant=False)
        put(f"blk.{i}.ffn_norm.weight", lp["ln2"]["scale"], quant=False)
        put(f"blk.{i}.attn_q.weight", rope_perm(a["wq"].reshape(D, N * H).T, N))
        put(f"blk.{i}.attn_k.weight", rope_perm(a["wk"].reshape(D, K * H).T, K))
        put(f"blk.{i}.attn_v.weight", a["wv"].reshape(D, K * H).T)
        put(f"blk.{i}.attn_output.weight", a["wo"].reshape(N * H, D).T)
        put(f"blk.{i}.ffn_gate.weight", m["w_gate"].T)
        put(f"blk.{i}.ffn_up.weight", m["w_up"].T)
        put(f"blk.{i}.ffn_down.weight", m["w_down"].T)
    put("output_norm.weight", p["ln_f"]["scale"], quant=False)
    put("output.weight", p["lm_head"].T)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) greedy decode of token ids on a GGUF file, batch 1."""

    def __init__(self, path: str, n_ctx: int, threads: int, n_batch: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_batch, verbose=False)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)  # the last evaluated token's row
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def generate(self, prompt: list[int], n: int) -> list[int]:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out = []
        for i in range(n):
            tok = int(np.argmax(self._last_logits()))
            out.append(tok)
            if i + 1 < n:  # the last token needs no forward pass (nanojax's loop skips it too)
                llm.eval([tok])
        return out
