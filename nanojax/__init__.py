"""nanojax: a small, readable, pure-functional GPT in JAX.

    import nanojax as nj
    cfg = nj.ModelConfig.preset("gpt2-small")
    params = nj.init_params(cfg, jax.random.key(0))
    logits = nj.forward(params, tokens, cfg)         # int32 (B, T) -> float32 (B, T, V)
"""

from nanojax._malloc import tune_malloc
from nanojax.xla_env import tune_xla, xla_tuning

tune_malloc()  # before JAX allocates anything (see nanojax/_malloc.py)
tune_xla()  # XLA:CPU flags for this CPU family, before a backend reads XLA_FLAGS (nanojax/xla_env.py)

from nanojax.checkpoint import load_checkpoint  # noqa: E402
from nanojax.config import ModelConfig  # noqa: E402
from nanojax.infer import generate, generate_stream, pack_weights  # noqa: E402
from nanojax.interop import load_gguf, load_hf, save_hf  # noqa: E402
from nanojax.lora import init_lora, load_lora, merge_lora, save_lora, unmerge_lora  # noqa: E402
from nanojax.model import forward, init_params, param_axes  # noqa: E402
from nanojax.quant import load_quantized, quantize  # noqa: E402

__all__ = ["ModelConfig", "init_params", "forward", "param_axes", "load_checkpoint", "generate",
           "generate_stream", "pack_weights", "load_hf", "save_hf", "quantize", "load_quantized",
           "load_gguf", "init_lora", "load_lora", "save_lora", "merge_lora", "unmerge_lora", "xla_tuning"]
