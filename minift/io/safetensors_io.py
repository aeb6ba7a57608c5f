"""safetensors files read and written with NumPy alone, bf16 included, every defect a CheckpointError.

The format (``safetensors/src/tensor.rs``): an 8-byte little-endian header length N, N bytes of UTF-8
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {str: str}}``, then
the raw row-major little-endian data, whose offsets count from the end of the header.

Why not ``safetensors.numpy``: NumPy has no bfloat16, and that API raises ``TypeError: data type
'bfloat16' not understood`` unless ``ml_dtypes`` is installed; its errors also do not say which file is
broken. Here bf16 is widened to float32 exactly, ``f32 = uint32(u16) << 16``, bit for bit as torch does,
and every header is checked before a byte of data is read: a truncated file, a bad header or an
inconsistent offset names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from minift.backend import to_numpy
from minift.errors import CheckpointError
from minift.io.atomic import write_file_atomic
from minift.io.jsonio import loads

# safetensors dtype codes → the NumPy dtype of their bytes (bf16 is read as its uint16 bit pattern).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_CODE_OF = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
            np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
            np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit
MAX_NDIM = 32  # NumPy's limit is 64; no weight has more than a handful of axes


class TensorInfo(NamedTuple):
    """Where one tensor lies in its file."""

    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (uint16) to float32 exactly: the bf16 bits are the top half of the f32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bit patterns (uint16), to nearest even, as torch does.

    bf = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 on the f32 bits u; NaN is mapped to the quiet NaN 0x7FC0,
    since a NaN with only low mantissa bits set would otherwise round to inf.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bf = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bf)


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """Parse and check a safetensors header: (tensor name → TensorInfo, metadata or None).

    Checked: the length prefix fits in the file; the header is a JSON object; each entry has a known
    dtype, a shape of non-negative ints and offsets with end − begin = numel·itemsize; the ranges are
    contiguous from 0 and end exactly at the end of the file (a shorter file is truncated).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"{size} bytes is too short for a safetensors file (8-byte header length)")
            (n,) = struct.unpack("<Q", prefix)
            if 8 + n > size:
                raise _fail(path, f"header length {n} goes beyond the file's {size} bytes: the file is "
                                  "truncated or not a safetensors file")
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit of "
                                  "safetensors readers: not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    # strict JSON: repeated names, NaN, huge numbers or deep nesting are refused, naming the file
    header = loads(raw, str(path), error=CheckpointError, label="the header")
    if not isinstance(header, dict):
        raise _fail(path, "the header must be a JSON object mapping tensor names to descriptions")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _parse_entry(path, name, entry, data_start)

    expected = data_start  # the ranges must tile the data section exactly
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != expected:
            raise _fail(path, f"tensor {name!r} starts at data offset {info.begin - data_start}, "
                              f"expected {expected - data_start}: overlapping or non-contiguous data")
        if info.end > size:
            raise _fail(path, f"tensor {name!r} ends at byte {info.end} but the file has only {size} "
                              "bytes: the file is truncated")
        expected = info.end
    if expected != size:
        raise _fail(path, f"the tensors' data ends at byte {expected} but the file has {size} bytes")
    return infos, metadata


def _parse_entry(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    """One header entry, checked: dtype code, shape, offsets and their consistency."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _fail(path, f"tensor {name!r}: header entry must have dtype, shape and data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _fail(path, f"tensor {name!r}: unsupported dtype {code!r}; expected one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise _fail(path, f"tensor {name!r}: shape {shape!r} must be a list of at most {MAX_NDIM} "
                          "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor {name!r}: data_offsets {offsets!r} must be [begin, end] with "
                          "0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[code].itemsize  # Python ints: exact, never wraps around
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes of data for shape {shape} "
                          f"{code} ({nbytes} bytes expected)")
    return TensorInfo(code, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_tensor(path: str | os.PathLike[str], info: TensorInfo, dtype: Any = None) -> np.ndarray:
    """One tensor's data as a fresh, writable array; float tensors are cast to ``dtype`` when given.

    bf16 is widened to float32 exactly first, then cast (a no-op for float32).
    """
    with open(path, "rb") as f:
        f.seek(info.begin)
        buf = f.read(info.end - info.begin)
    if len(buf) != info.end - info.begin:
        raise _fail(Path(path), "the file changed size while being read")
    a = np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)
    if info.dtype == "BF16":
        a = bf16_to_float32(a)
    if dtype is not None and info.dtype in FLOAT_CODES:
        return a.astype(dtype)
    return a.astype(a.dtype.newbyteorder("="))  # a native-order copy (frombuffer is read-only)


def check_float_dtypes(path: str | os.PathLike[str], infos: Mapping[str, TensorInfo], what: str) -> None:
    """Refuse integer and bool tensors where only float ones make sense (weights, adapters, optimizer
    moments): cast silently, an I32 tensor's bit pattern becomes different numbers."""
    for name, info in infos.items():
        if info.dtype not in FLOAT_CODES:
            raise _fail(Path(path), f"tensor {name!r} has dtype {info.dtype}; {what} are floating point "
                                    f"({', '.join(FLOAT_CODES)})")


def read_safetensors(
    path: str | os.PathLike[str], *, dtype: Any = None, floats: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """All tensors of a file and its metadata; float tensors cast to ``dtype`` when given.

    With ``floats`` (what the tensors are, e.g. "adapter weights") every tensor must be floating point,
    checked on the header before any data is read, and finite.
    """
    infos, metadata = read_header(path)
    if floats is not None:
        check_float_dtypes(path, infos, floats)
    tensors = {name: read_tensor(path, info, dtype) for name, info in infos.items()}
    if floats is not None:
        for name, a in tensors.items():
            check_finite(path, name, a)
    return tensors, metadata


def check_finite(path: str | os.PathLike[str], name: str, a: np.ndarray) -> None:
    """Refuse NaN or ±inf in a weight: no trained model holds one, and it would make every output NaN."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise _fail(Path(path), f"tensor {name!r} holds NaN or infinite values")


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
    bf16: bool = False,
) -> None:
    """Write arrays (NumPy or CuPy) as a safetensors file, atomically (a temporary file, then a rename).

    With ``bf16=True`` floating tensors are rounded to bf16 (``float32_to_bf16``). The header is padded
    with spaces to a multiple of 8 bytes and tensors are laid out by name, as the reference writer does.
    """
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = to_numpy(tensors[name])  # NumPy or CuPy in, host bytes out
        if bf16 and a.dtype.kind == "f":
            a, code = float32_to_bf16(a.astype(np.float32)), "BF16"
        elif a.dtype in _CODE_OF:
            code = _CODE_OF[a.dtype]
        else:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {a.dtype}, not a safetensors dtype")
        data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)

    write_file_atomic(path, write)
