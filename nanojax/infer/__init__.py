"""Inference: generate / generate_stream (generate.py) over a compiled prefill and windowed decode
loop with a KV cache (engine.py), with stop tokens and stop strings (stops.py); pack_weights
(arena.py) puts a CPU params tree on 2 MiB pages for the weight-streaming decode step."""

from nanojax.infer.arena import pack_weights
from nanojax.infer.generate import generate, generate_stream

__all__ = ["generate", "generate_stream", "pack_weights"]
