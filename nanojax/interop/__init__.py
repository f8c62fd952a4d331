"""Interop with other formats: Hugging Face model directories in and out (hf.py).

    from nanojax.interop import load_hf, save_hf, hf_to_workdir, workdir_to_hf, HFFormatError

hf.py is the API; hf_config.py maps config.json <-> ModelConfig, layout.py maps every tensor's
name and shape, safetensors_reader.py reads the weights one tensor at a time; gguf.py reads and writes
llama.cpp's GGUF files.
"""

from nanojax.interop.gguf import GGUFFormatError, load_gguf, load_gguf_tokenizer, write_gguf
from nanojax.interop.hf import (
    IMPORTED_OPT_STATE,
    SUPPORTED,
    HFFormatError,
    hf_to_workdir,
    load_hf,
    save_hf,
    workdir_to_hf,
)

__all__ = ["SUPPORTED", "HFFormatError", "IMPORTED_OPT_STATE", "load_hf", "save_hf", "hf_to_workdir",
           "workdir_to_hf", "GGUFFormatError", "load_gguf", "load_gguf_tokenizer", "write_gguf"]
