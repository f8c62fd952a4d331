"""Inference: generate / generate_stream (generate.py) over a compiled prefill and windowed decode
loop with a KV cache (engine.py), with stop tokens and stop strings (stops.py)."""

from nanojax.infer.generate import generate, generate_stream

__all__ = ["generate", "generate_stream"]
