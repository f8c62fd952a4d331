"""LoRA: adapters applied through the matmul seam, merge/unmerge, PEFT in and out, and many
adapters served in one batch.

    adapter = nj.load_lora("peft_dir", cfg)                 # or nj.init_lora(cfg, key, rank=8, targets="q,v")
    logits = nj.forward(params, tokens, cfg, lora=adapter)  # base weights untouched
    merged = nj.merge_lora(params, cfg, adapter)            # W + s A B folded in
    nj.save_lora(adapter, cfg, "out_dir")                   # PeftModel.from_pretrained loads it
    nj.generate(params, cfg, prompts, lora=[a, b, None])    # a per-row adapter, one compiled decode

adapter.py: the record, targets, seam weights, merge. peft_io.py: the PEFT files. multi.py: the
per-row stack.
"""

from nanojax.lora.adapter import (
    LoraAdapter,
    LoraError,
    LoraWeight,
    RowLoraWeight,
    count_params,
    init_lora,
    lora_scaling,
    merge_lora,
    modules,
    resolve_targets,
    unmerge_lora,
)
from nanojax.lora.multi import StackedLora, stack_adapters
from nanojax.lora.peft_io import load_lora, save_lora

__all__ = ["LoraAdapter", "LoraError", "LoraWeight", "RowLoraWeight", "StackedLora", "count_params",
           "init_lora", "load_lora", "lora_scaling", "merge_lora", "modules", "resolve_targets",
           "save_lora", "stack_adapters", "unmerge_lora"]
