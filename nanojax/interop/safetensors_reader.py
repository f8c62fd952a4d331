"""Reading safetensors checkpoints: one tensor at a time, single file or sharded, bf16 included.

Never pickle: a directory with only PyTorch pickle weights is refused, naming how to convert it.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from nanojax.interop.hf_config import HFFormatError, _read_json

_CONVERT_FIX = (
    "Convert it to safetensors with transformers, in a trusted environment: "
    "`AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)`."
)


class _SafetensorsReader:
    """Tensor name -> array over a single or sharded safetensors checkpoint, read lazily.

    numpy has no bfloat16, so safetensors' numpy framework cannot return BF16 tensors; those are
    read straight from the file (memory-mapped) and viewed as ml_dtypes.bfloat16.
    """

    def __init__(self, directory: Path):
        single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
        if single.exists():
            files = {single}
            self.where: dict[str, Path] = {}
        elif index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFFormatError(f"{index} has no \"weight_map\" object (tensor name -> shard "
                                    "file); the index is damaged. Download or save the model again.")
            self.where = {k: directory / f for k, f in weight_map.items()}
            files = set(self.where.values())
            missing = sorted(str(f.name) for f in files if not f.exists())
            if missing:
                raise HFFormatError(f"{index} names shard file(s) that are not there: {missing}.")
        else:
            pickles = sorted(p.name for pat in ("pytorch_model*.bin", "*.pt", "*.pth")
                             for p in directory.glob(pat))
            if pickles:
                raise HFFormatError(
                    f"{directory} has only PyTorch pickle weights ({', '.join(pickles)}), no "
                    "model.safetensors. nanojax does not load pickles: unpickling runs arbitrary code "
                    f"from the file. {_CONVERT_FIX}"
                )
            raise HFFormatError(
                f"no weights in {directory}: expected model.safetensors or model.safetensors.index.json."
            )
        from safetensors import safe_open

        self._handles = {}
        for f in sorted(files):
            try:
                self._handles[f] = safe_open(str(f), framework="numpy")
            except Exception as e:  # SafetensorError names no file
                raise HFFormatError(
                    f"{f} is not a readable safetensors file ({e}; {f.stat().st_size:,} bytes): it is "
                    "truncated or damaged, e.g. by an interrupted download. Download or save it again."
                ) from None
        if not self.where:
            self.where = {k: single for k in self._handles[single].keys()}
        self._headers: dict[Path, tuple[int, dict]] = {}

    def names(self) -> list[str]:
        return list(self.where)

    def dtype_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        sl = self._handles[self.where[name]].get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def read(self, name: str) -> np.ndarray:
        path = self.where[name]
        dtype, shape = self.dtype_shape(name)
        if dtype != "BF16":
            return self._handles[path].get_tensor(name)
        if path not in self._headers:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[path] = (8 + n, json.loads(fh.read(n)))
        base, header = self._headers[path]
        start, end = header[name]["data_offsets"]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return np.array(raw.view(ml_dtypes.bfloat16).reshape(shape))  # a copy: the file stays unmapped

