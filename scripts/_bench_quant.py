"""llama.cpp side by side for scripts/bench_decode.py (a benchmark helper, not library code).

bench_decode writes the same weights as GGUF with nanojax.interop.gguf.write_gguf (F32, or Q8_0 /
Q4_0 quantized by the `gguf` package) and times `LlamaCppRunner` on them with llama-cpp-python (the
optional `bench` extra).
"""

from __future__ import annotations

import numpy as np


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
