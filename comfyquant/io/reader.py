"""Validated, memory-mapped reading of one ``.safetensors`` file or a sharded ``*.safetensors.index.json``.

The header is parsed and checked (length, JSON, dtypes, shapes, contiguous in-bounds offsets, file size)
before any tensor data is touched; pickles and other non-safetensors files are refused by their magic
bytes and never unpickled. Tensors are handed out one at a time from a memory map of their byte range.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comfyquant.errors import CorruptFileError, UserError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
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
    "C64": torch.complex64,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it; ``offset`` is the absolute byte position in ``file``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_str(self) -> str:
        return DTYPE_NAMES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    infos: dict[str, TensorInfo]
    metadata: dict[str, str]


def sniff(path: Path, head: bytes, size: int) -> None:
    """Refuse files that are plainly not safetensors, with a message that says what they are."""
    if size == 0:
        raise CorruptFileError(f"{path}: the file is empty")
    if head[:1] == b"\x80" and head[8:9] != b"{":  # a header length can start with 0x80 too
        raise CorruptFileError(
            f"{path}: this is a pickled PyTorch checkpoint (.ckpt/.pt/.bin); comfyquant never unpickles files "
            "(unsafe): convert it to .safetensors first")
    if head[:4] == b"PK\x03\x04":
        raise CorruptFileError(
            f"{path}: this is a zip archive (torch.save checkpoint .pt/.ckpt/.bin); comfyquant never unpickles "
            "files (unsafe): convert it to .safetensors first")
    if head[:4] == b"GGUF":
        raise CorruptFileError(f"{path}: this is a GGUF file, not a safetensors checkpoint")
    if size < 8:
        raise CorruptFileError(f"{path}: too short to be a safetensors file ({size} bytes)")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{k}'")
        out[k] = v
    return out


def read_header(path: Path) -> Header:
    """Parse and validate the header of one safetensors file (reads only the header bytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)  # the 8-byte header length and the header's first byte
            sniff(path, head, size)
            n = int.from_bytes(head[:8], "little")
            if n == 0 or n > MAX_HEADER_BYTES or n > size - 8:
                raise CorruptFileError(
                    f"{path}: not a safetensors file or truncated (header length {n}, file size {size})")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw.lstrip()[:1] == b"{":
        raise CorruptFileError(f"{path}: not a safetensors file (header is not a JSON object)")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + n
    data_len = size - data_start
    entries = [_parse_entry(path, name, entry, data_start) for name, entry in obj.items()]
    entries.sort(key=lambda t: (t.offset, t.offset + t.nbytes))
    pos = data_start
    for t in entries:
        if t.offset != pos:
            what = "overlaps the previous tensor" if t.offset < pos else "leaves a gap before it"
            raise CorruptFileError(f"{path}: corrupt safetensors header (tensor '{t.name}' {what})")
        pos += t.nbytes
    if pos - data_start != data_len:
        if pos - data_start > data_len:
            raise CorruptFileError(
                f"{path}: truncated (header describes {pos - data_start} data bytes, file holds {data_len})")
        raise CorruptFileError(
            f"{path}: corrupt safetensors file ({data_len - (pos - data_start)} trailing bytes after the data)")
    return Header({t.name: t for t in entries}, dict(metadata))


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    bad = f"{path}: corrupt safetensors header (tensor '{name}'"
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{bad} is not an object)")
    dtype_s, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_s not in DTYPES:
        if isinstance(dtype_s, str) and dtype_s in ("F4", "F6_E2M3", "F6_E3M2", "C32"):
            raise UserError(f"{path}: tensor '{name}' has dtype {dtype_s}, which comfyquant does not support")
        raise CorruptFileError(f"{bad} has unknown dtype {dtype_s!r})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise CorruptFileError(f"{bad} has an invalid shape {shape!r})")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
            or offs[0] > offs[1]):
        raise CorruptFileError(f"{bad} has invalid data_offsets {offs!r})")
    dtype = DTYPES[dtype_s]
    nbytes = math.prod(shape) * dtype_size(dtype)
    if offs[1] - offs[0] != nbytes:
        raise CorruptFileError(
            f"{bad}: data_offsets span {offs[1] - offs[0]} bytes, shape {shape} of {dtype_s} needs {nbytes})")
    return TensorInfo(name, dtype, tuple(shape), nbytes, path, data_start + offs[0])


def read_index(path: Path) -> dict[str, Path]:
    """``weight_map`` of a sharded checkpoint index: tensor name -> shard path."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(f"{path}: not a valid JSON index ({e})") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise CorruptFileError(f"{path}: not a sharded checkpoint index (no \"weight_map\" of tensor -> file)")
    out = {}
    for name, shard in wm.items():
        p = path.parent / shard
        if not p.is_file():
            raise UserError(f"{path}: shard '{shard}' listed for '{name}' does not exist")
        out[name] = p
    return out


def resolve_input(path: str | Path) -> Path:
    """The file to open: a ``.safetensors`` file, an index, or a directory holding exactly one of them."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"input not found: {p}")
    if p.is_dir():
        found = sorted(p.glob("*.safetensors.index.json")) or sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise UserError(f"{p} is a directory; give the .safetensors file or its .index.json")
        p = found[0]
    if not p.is_file():
        raise UserError(f"input is not a regular file: {p}")
    return p


def is_index(path: Path) -> bool:
    """True for a sharded-checkpoint index file."""
    return path.name.endswith(".json")


class CheckpointReader:
    """Read-only access to a checkpoint's tensors.

    ``infos`` are in on-disk order (shard by shard, by offset), which is the streaming order. ``metadata`` is
    the ``__metadata__`` of all shards merged. ``get(name)`` maps just that tensor's bytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_input(path)
        if is_index(self.path):
            self.files, self.infos, self.metadata = _open_sharded(self.path)
        else:
            header = read_header(self.path)
            self.files = [self.path]
            self.infos = header.infos
            self.metadata = header.metadata

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` for preset detection."""
        return {k: t.shape for k, t in self.infos.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.infos.values())

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes in the background (no-op where unsupported).

        Called for the next tensor while the current one is quantized, so a cold disk read overlaps compute.
        """
        info = self.infos[name]
        if info.nbytes == 0 or not hasattr(os, "posix_fadvise"):
            return
        fd = os.open(info.file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, backed by a private (copy-on-write) memory map of its bytes; the file is never written."""
        try:
            info = self.infos[name]
        except KeyError:
            raise KeyError(f"no tensor '{name}' in {self.path}") from None
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        try:
            mm = np.memmap(info.file, dtype=np.uint8, mode="c", offset=info.offset, shape=(info.nbytes,))
        except OSError as e:
            raise UserError(f"cannot read {info.file}: {e.strerror or e}") from None
        return torch.frombuffer(mm, dtype=info.dtype).reshape(info.shape)


def _open_sharded(index: Path) -> tuple[list[Path], dict[str, TensorInfo], dict[str, str]]:
    weight_map = read_index(index)
    files = list(dict.fromkeys(weight_map.values()))
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in files:
        header = read_header(shard)
        for k, v in header.metadata.items():
            metadata.setdefault(k, v)
        for name, info in header.infos.items():
            listed = weight_map.get(name)
            if listed is None:
                raise CorruptFileError(f"{index}: shard {shard.name} holds '{name}', which the index does not list")
            if listed != shard:
                continue  # the index points elsewhere; it is checked there
            infos[name] = info
    missing = [n for n in weight_map if n not in infos]
    if missing:
        raise CorruptFileError(
            f"{index}: '{missing[0]}' is listed in shard {weight_map[missing[0]].name} but is not in it"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return files, infos, metadata


def header_shapes(infos: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a set of infos."""
    return {k: t.shape for k, t in infos.items()}
