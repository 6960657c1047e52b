"""safetensors files read and written one tensor at a time, with plain reads and writes.

The format: the header's length (8 bytes, little-endian), a JSON header naming each tensor's dtype, shape and
byte range in the data (`data_offsets`, from the data's start), then the raw little-endian data.

safetensors.torch.save_file needs every tensor of a file in memory and copies them once more to serialise
them, and safe_open's memory map keeps every page it has read resident until the file is closed: merging
Mistral-7B's 10 GB first shard through them peaks at about three shards (30 GB). A TensorReader reads each
tensor into memory of its own (plain reads leave the file in the page cache, not in this process), and a
TensorWriter writes each tensor as it comes, so a caller that drops one tensor before reading the next holds
one tensor at a time. safetensors' own reader loads what TensorWriter writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from qlora_cli.errors import QloraError

# safetensors' dtype codes and the torch dtypes they hold.
DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
LENGTH_BYTES = 8  # the header's length, an unsigned little-endian 64-bit integer
ALIGNMENT = 8  # safetensors pads the header with spaces so that the data starts on a multiple of 8


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it: dtype code, shape, and its bytes [begin, end) in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise QloraError(f"safetensors dtype {self.dtype} is not supported here (known: {', '.join(DTYPES)})")
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: its tensors in the order of their data, and where the data begins."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    raw: bytes  # the JSON header as stored, padding included: what a fingerprint of the file hashes


def read_header(path: Path) -> Header:
    """The header of the safetensors file at `path`; QloraError when the file is truncated or not safetensors."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(LENGTH_BYTES), "little")
        if size < LENGTH_BYTES or length > size - LENGTH_BYTES:
            raise _corrupt(path, f"its header claims {length} bytes of a {size}-byte file")
        raw = handle.read(length)
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, f"its header is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    data_start = LENGTH_BYTES + length
    tensors = {}
    try:
        for name, entry in parsed.items():
            begin, end = entry["data_offsets"]
            tensors[name] = TensorEntry(
                str(entry["dtype"]), tuple(int(n) for n in entry["shape"]), int(begin), int(end)
            )
    except (KeyError, TypeError, ValueError) as error:
        raise _corrupt(path, f"tensor {name!r} has a malformed entry ({type(error).__name__}: {error})") from None
    ordered = dict(sorted(tensors.items(), key=lambda item: item[1].begin))
    data_bytes = max((entry.end for entry in ordered.values()), default=0)
    if data_start + data_bytes > size:
        raise _corrupt(path, f"its tensors end at byte {data_start + data_bytes}, past its end at {size}")
    return Header(tensors=ordered, metadata=metadata, data_start=data_start, raw=raw)


def _corrupt(path: Path, reason: str) -> QloraError:
    return QloraError(f"{path}: truncated or corrupt safetensors file ({reason}); download or write it again")


class TensorReader:
    """Reads the tensors of one safetensors file by name, each into memory of its own.

    with TensorReader(path) as reader:
        for name in reader.tensors:
            tensor = reader.read(name)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._handle: BinaryIO | None = None

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        """The file's tensors in the order of their data: reading them in this order reads the file front to back."""
        return self.header.tensors

    def __enter__(self) -> TensorReader:
        self._handle = self.path.open("rb")
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.close()
        self._handle = None

    def read(self, name: str) -> torch.Tensor:
        entry = self.header.tensors[name]
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        self._handle.seek(self.header.data_start + entry.begin)
        if self._handle.readinto(buffer.numpy()) != entry.nbytes:
            raise _corrupt(self.path, f"{name} ends past the end of the file")
        return buffer.view(entry.torch_dtype).reshape(entry.shape)


class TensorWriter:
    """Writes a safetensors file whose tensors are declared up front and then written one at a time, in order.

    with TensorWriter(path, {"weight": (torch.bfloat16, (4, 4))}) as writer:
        writer.write("weight", tensor)

    The header goes first, so each tensor is written as it arrives and none is kept. Leaving the block without
    an exception before every declared tensor is written raises ValueError: the file would be incomplete.
    """

    def __init__(
        self,
        path: Path,
        layout: dict[str, tuple[torch.dtype, Sequence[int]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.metadata = {"format": "pt"} if metadata is None else metadata
        self.entries: dict[str, TensorEntry] = {}
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * dtype.itemsize
            self.entries[name] = TensorEntry(CODES[dtype], tuple(shape), offset, offset + size)
            offset += size
        self.data_bytes = offset
        self._handle: BinaryIO | None = None
        self._pending = iter(self.entries)

    def header_bytes(self) -> bytes:
        """The length prefix and the JSON header, padded so the data starts on a multiple of 8."""
        header = {
            name: {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [entry.begin, entry.end]}
            for name, entry in self.entries.items()
        }
        encoded = json.dumps({"__metadata__": self.metadata, **header}, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % ALIGNMENT)
        return len(encoded).to_bytes(LENGTH_BYTES, "little") + encoded

    def __enter__(self) -> TensorWriter:
        self._handle = self.path.open("wb")
        self._handle.write(self.header_bytes())
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self._handle.close()
        self._handle = None
        if exc_type is None:
            missing = list(self._pending)
            if missing:
                raise ValueError(f"{self.path}: {len(missing)} declared tensors never written, first {missing[0]}")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; its dtype and shape must be the declared ones."""
        expected = next(self._pending, None)
        if name != expected:
            raise ValueError(f"{self.path}: wrote {name}, but the next declared tensor is {expected}")
        entry = self.entries[name]
        if CODES.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, declared {entry.dtype} {entry.shape} in the header"
            )
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(data.numpy())
