"""Reading and writing PyTorch checkpoints as numpy arrays: the safetensors format (read and written
here in numpy, no ``safetensors`` or ``torch`` package needed; bf16 and fp8 through ``ml_dtypes``),
``pytorch_model.bin`` pickles (through ``torch`` when it is installed), and Hugging Face's sharded
``*.index.json`` layouts.

``read_state_dict(path)`` takes a file or a model folder and returns ``{key: np.ndarray}``;
safetensors files are memory-mapped, so a large checkpoint is read as it is copied into a model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["read_safetensors", "read_state_dict", "write_safetensors"]

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of one ``.safetensors`` file, as read-only numpy views of a memory map."""
    path = Path(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise ValueError(f"{path}: not a safetensors file (only {raw.size} bytes)")
    (n,) = struct.unpack("<Q", raw[:8].tobytes())
    if n > raw.size - 8:
        raise ValueError(f"{path}: not a safetensors file (header of {n} bytes in a {raw.size}-byte file)")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    data = raw[8 + n:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which this reader does not know")
        dtype, (start, end) = _DTYPES[info["dtype"]], info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != dtype.itemsize * int(np.prod(shape)) or end > data.size:
            raise ValueError(f"{path}: tensor {key!r} has inconsistent offsets {start}..{end} for {shape} {dtype}")
        out[key] = data[start:end].view(dtype).reshape(shape)
    return out


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (numpy arrays or anything ``np.asarray`` takes, e.g. jax arrays) to one
    ``.safetensors`` file that ``safetensors.torch.load_file`` reads."""
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k, a in arrays.items():
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {k!r}: dtype {a.dtype} has no safetensors name")
        header[k] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path} is a PyTorch pickle: reading it needs torch installed "
                         "(or convert it to .safetensors)") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training scripts' {"model": state_dict, ...}
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(sd).__name__}")
    out = {}
    for k, t in sd.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _read_torch(path)
    raise ValueError(f"{path}: expected a .safetensors, .bin, .pt or .pth file")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{key: array}`` from a checkpoint file, or from a Hugging Face model folder (``model.safetensors``,
    ``pytorch_model.bin``, or either's sharded ``*.index.json``; safetensors preferred)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_file():
        return _read_file(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _read_file(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, np.ndarray] = {}
            for shard in shards:
                out.update(_read_file(path / shard))
            return out
    raise ValueError(f"{path}: no model.safetensors, pytorch_model.bin or their sharded index in this folder")
