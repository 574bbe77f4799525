"""The safetensors file format, read and written by hand so that every check names the file and tensor.

A file is: 8 bytes little-endian header length N, N bytes of JSON header (padded with spaces), then the
data buffer. The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
relative to the start of the buffer, plus an optional "__metadata__" of str -> str. The buffer must be fully
covered by the tensors, without holes or overlaps (what the `safetensors` library itself enforces).
"""
import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from workbench.errors import CheckpointError
from workbench.user_files import open_regular, parse_json

# The safetensors library refuses headers over 100 MB; a length beyond that is garbage, not a model.
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_ALIGN = 8

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}
for _code, _attr in (("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)
DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Where one stored tensor lives: `offset` is the absolute byte offset in `file` (None for pickles)."""

    name: str
    shape: tuple
    dtype: torch.dtype
    file: Path
    offset: int | None
    nbytes: int


def code_from_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype; ValueError for dtypes the format cannot hold."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors "
                         f"(supported: {', '.join(str(d) for d in DTYPE_CODES)})") from None


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    return prod(shape) * dtype.itemsize


def read_header(path) -> tuple[list[TensorSpec], dict]:
    """Parse and validate the header of the safetensors file at `path`: (specs in file order, metadata).

    Raises CheckpointError naming the file (and the tensor) when the file is truncated or corrupt.
    """
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; expected at least "
                                      f"an 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file: header length {n} "
                                      f"does not fit in the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    header = parse_json(text, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object, "
                              f"got {type(header).__name__})")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    start = 8 + n
    specs = [_parse_entry(path, name, entry, start, size) for name, entry in header.items()]
    specs.sort(key=lambda s: (s.offset, s.nbytes))
    _check_coverage(path, specs, start, size)
    return specs, metadata


def _parse_entry(path, name, entry, start, size) -> TensorSpec:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: corrupt header entry (expected dtype, shape and data_offsets)")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in _DTYPES:
        raise CheckpointError(f"{where}: unknown or unsupported dtype {code!r} "
                              f"(expected one of {', '.join(_DTYPES)})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: corrupt shape {shape!r} (expected a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{where}: corrupt data_offsets {offsets!r} (expected [begin, end])")
    begin, end = offsets
    dtype = _DTYPES[code]
    nbytes = tensor_nbytes(shape, dtype)
    if not 0 <= begin <= end or start + end > size:
        raise CheckpointError(f"{where}: data_offsets {offsets} lie outside the file (data buffer holds "
                              f"{size - start} bytes; the file is truncated or the header is corrupt)")
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} span {end - begin} bytes, but shape {shape} "
                              f"of {code} needs {nbytes}")
    return TensorSpec(name, tuple(shape), dtype, path, start + begin, nbytes)


def _check_coverage(path, specs, start, size):
    """The tensors must tile the data buffer exactly: no overlap, no hole, nothing past the last tensor."""
    pos = start
    for spec in specs:
        if spec.offset != pos:
            what = "overlaps the tensor before it" if spec.offset < pos else "leaves a hole before it"
            raise CheckpointError(f"{path}: tensor {spec.name!r} at data offset {spec.offset - start} {what} "
                                  f"(expected offset {pos - start}); the header is corrupt")
        pos += spec.nbytes
    if pos != size:
        raise CheckpointError(f"{path}: {size - pos} unexpected bytes after the last tensor "
                              f"(header covers {pos} of {size} bytes); the file is corrupt")


def layout(entries, metadata=None) -> tuple[bytes, dict]:
    """Header bytes (length prefix included) and {name: absolute offset} for `entries` = [(name, shape, dtype)].

    Tensors are laid out by decreasing item size, then in the given order, as the safetensors library
    does, so that every tensor starts aligned to its item size (the header is padded to 8 bytes).
    Deterministic: fixed key order, compact JSON, no timestamps.
    """
    order = sorted(range(len(entries)), key=lambda i: -entries[i][2].itemsize)
    header = {"__metadata__": {"format": "pt", **(metadata or {})}}
    rel, pos = {}, 0
    for i in order:
        name, shape, dtype = entries[i]
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": code_from_dtype(dtype), "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel[name] = pos
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: start + off for name, off in rel.items()}
