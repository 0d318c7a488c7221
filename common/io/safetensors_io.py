"""Streaming safetensors I/O: a lazy index over a checkpoint's shards and a front-to-back writer.

Reads go through our own `os.preadv` calls into reused buffers (`Scratch`), never through a memory map, so
the pages of a 12 GB checkpoint are not counted in our resident memory (docs/streaming.md). Every call that only
some systems have (`os.preadv`, `os.pread`, `os.pwrite`: not on Windows; `os.copy_file_range`: Linux only) has a
plain fallback here, chosen when the call is made (tests/test_platform.py hides each one).
Files are little-endian: `[u64 header length N][N bytes of JSON header][tensor data]`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import stat
import struct
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

import torch

from common.errors import UserError, shorten
from common.io.four_bit import dequantize_saved, saved_four_bit, saved_state_layout

log = logging.getLogger("lora_tv")

# safetensors' dtype names; those this torch lacks (uint16/32/64 came in torch 2.3) are left out, and a file
# holding one is refused as an unknown dtype.
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, t) for name, t in _DTYPE_NAMES.items() if hasattr(torch, t)}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # transformers reads it, when present, before any index
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Row chunks of 4 MB: a chunk's reads and arithmetic stay in the CPU caches (subtracting the 604 MB embedding
# in 4 MB chunks took 0.14 s against 0.29 s in 64 MB ones), and buffers stay small.
CHUNK_BYTES = 4 * 1024 * 1024
MAX_DIMENSION = 2**63 - 1  # safetensors stores sizes as u64 and torch as int64
MAX_RANK = 64  # dimensions of one tensor (torch's own limit); bounds the work a forged shape can ask for


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path, opened: BinaryIO | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: tensors by name (in file order) and metadata; from the file
    `opened` (at its start) when given, else opened here.

    Every shape is checked against the bytes the file holds before anything is allocated, so a forged
    shape is refused here, not met as a huge allocation later.
    """
    status = os.fstat(opened.fileno()) if opened is not None else path.stat()
    if not stat.S_ISREG(status.st_mode):
        raise UserError(f"{path}: not a regular file")
    size = status.st_size
    with contextlib.nullcontext(opened) if opened is not None else open(path, "rb") as f:
        f.seek(0)
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise UserError(f"{path}: corrupt safetensors file (header length {header_len} past end of file)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8, an integer of 5000 digits, deep nesting
            raise UserError(f"{path}: corrupt safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ is not an object of strings)")
    if not all(_is_unicode(text) for text in (*header, *metadata, *metadata.values())):
        raise UserError(f"{path}: corrupt safetensors header (a name that is not valid Unicode)")
    data_start = 8 + header_len
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: t.start)
    _check_layout(path, tensors, data_start, size)
    return {t.name: t for t in tensors}, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape whose bytes are exactly its data_offsets' range."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise UserError(f"{path}: tensor {name!r} has a malformed header entry (needs dtype, shape, data_offsets)")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise UserError(f"{path}: tensor {name!r} has an unknown dtype {shorten(repr(entry['dtype']))}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_RANK
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(d) is int and 0 <= d <= MAX_DIMENSION for d in (*shape, *offsets))
    ):
        raise UserError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
    if math.prod(max(d, 1) for d in shape[1:]) > MAX_DIMENSION:  # torch's largest stride, even of an empty tensor
        raise UserError(f"{path}: tensor {name!r} has strides past torch's int64 ({shorten(str(shape))})")
    info = TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    if info.nbytes != info.numel * dtype.itemsize:
        raise UserError(
            f"{path}: tensor {name!r} of shape {shorten(str(shape))} needs {info.numel * dtype.itemsize} bytes "
            f"but its data_offsets give {info.nbytes}"
        )
    return info


def _check_layout(path: Path, tensors: list[TensorInfo], data_start: int, size: int) -> None:
    """Tensors must fill the data section exactly, in order: no overlap, no gap, nothing past the end."""
    position = data_start
    for t in tensors:
        if t.end > size:
            raise UserError(
                f"{path}: truncated safetensors file, or data_offsets out of range (tensor {t.name!r} ends at "
                f"byte {t.end}, the file has {size})"
            )
        if t.start != position:
            problem = "overlaps the tensor before it" if t.start < position else "leaves a gap before it"
            raise UserError(f"{path}: corrupt safetensors file (tensor {t.name!r} {problem})")
        position = t.end
    if position < size:
        raise UserError(f"{path}: corrupt safetensors file ({size - position} bytes after the last tensor)")


def _is_unicode(text: str) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which no UTF-8 output can print (safetensors refuses them)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def read_bytes_into(f: BinaryIO, buffer: torch.Tensor, offset: int) -> None:
    """Fill a contiguous tensor with the file's bytes at `offset`, without a memory map."""
    view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = _read_at(f, view[done:], offset + done)
        if not n:
            raise UserError(f"{f.name}: truncated safetensors file")
        done += n


def _read_at(f: BinaryIO, view: memoryview, offset: int) -> int | None:
    """Bytes read into `view` from `offset`: `os.preadv` where the system has it, else a seek and a read (only
    our own reads use these descriptors' positions)."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [view], offset)
    f.seek(offset)
    return f.readinto(view)


def pread(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes of a file at `offset`: `os.pread`, else (Windows) a seek and a read."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


def pwrite(fd: int, data: bytes, offset: int) -> int:
    """Write `data` (or its first bytes: the count is returned) at `offset`: `os.pwrite`, else a seek and a write."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


class Scratch:
    """A reusable read buffer: reading chunk after chunk into the same memory, instead of fresh memory each
    time, saves the page faults of new allocations (measured: 26 ms against 7 ms per 64 MB chunk).

    `pinned` (page-locked, for CUDA) lets host-to-device copies of the chunks run asynchronously.
    """

    def __init__(self, pinned: bool = False):
        self.pinned = pinned
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` over the buffer (grown when too small); valid until the next take."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free the old buffer before the new one
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self._buffer[:nbytes].view(dtype).view(shape)


class CheckpointIndex:
    """Lazy, shard-aware index of the tensors in a checkpoint folder or a single safetensors file.

    Nothing is read until `read` is called; `read` returns a tensor of its own, `read_rows` one in a reused
    buffer when given one (no memory map either way).
    """

    def __init__(self, source: Path):
        self.source = Path(source)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        shards, weight_map = _shard_paths(self.source)
        self._files: dict[Path, BinaryIO] = {}
        self._opened: dict[Path, tuple[int, ...]] = {}
        _OPEN.add(self)
        for shard in shards:
            # Every file is opened now and read through that descriptor only: a file replaced later (a merge
            # with --overwrite finishing) cannot mix into this run; check_unchanged says so before publishing.
            if not shard.is_file():
                raise UserError(f"{shard}: not a regular file")
            self._files[shard] = open(shard, "rb", buffering=0)
            self._opened[shard] = _signature(os.fstat(self._files[shard].fileno()))
            tensors, metadata = read_header(shard, self._files[shard])
            for name, info in tensors.items():
                if name in self.tensors:
                    first = self.tensors[name].path.name
                    raise UserError(f"{self.source}: tensor {name} is in two files ({first} and {shard.name})")
                self.tensors[name] = info
            self.metadata.update(metadata)
        if weight_map is not None:
            _check_index(self.source, weight_map, self.tensors)
        self.four_bit: dict[str, dict[str, TensorInfo]] = self._find_four_bit()
        self._dequantized: tuple[str, torch.Tensor] | None = None  # the last 4-bit weight read, whole

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, offset by offset): reads stay sequential."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    def _find_four_bit(self) -> dict[str, dict[str, TensorInfo]]:
        """A checkpoint saved 4-bit by transformers (bitsandbytes): each packed weight is shown as the weight it
        holds (its dtype and shape), read dequantized; the tensors of its quantization state are hidden."""
        if not any(".quant_state.bitsandbytes__" in name for name in self.tensors):
            return {}
        found = {}
        for weight, parts in saved_four_bit(list(self.tensors)).items():
            packed = self.tensors[weight]
            state = {part.removeprefix(f"{weight}."): self.tensors.pop(part) for part in parts}
            blob = next(info for key, info in state.items() if key.startswith("quant_state."))
            dtype, shape = saved_state_layout(self.read_raw(blob))
            size = math.prod(shape) * dtype.itemsize
            self.tensors[weight] = TensorInfo(weight, packed.path, dtype, shape, packed.start, packed.start + size)
            found[weight] = {"packed": packed, **state}
        return found

    def read_raw(self, info: TensorInfo) -> torch.Tensor:
        out = torch.empty(info.shape, dtype=info.dtype)
        if out.numel():
            read_bytes_into(self._file(info.path), out, info.start)
        return out

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, in its stored dtype."""
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, name: str, start: int, stop: int, scratch: Scratch | None = None) -> torch.Tensor:
        """Rows `start:stop` of a tensor (along its first dimension), in its stored dtype: a tensor of its
        own, or a view of `scratch` (valid until its next use)."""
        if name in self.four_bit:
            return self._read_four_bit(name)[start:stop]
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"rows {start}:{stop} out of range for {name} with {rows} rows")
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        out = torch.empty(shape, dtype=info.dtype) if scratch is None else scratch.take(shape, info.dtype)
        if out.numel():
            read_bytes_into(self._file(info.path), out, info.start + start * (info.nbytes // rows))
        return out

    def _read_four_bit(self, name: str) -> torch.Tensor:
        if self._dequantized is None or self._dequantized[0] != name:
            parts = {key: self.read_raw(info) for key, info in self.four_bit[name].items()}
            self._dequantized = (name, dequantize_saved(parts.pop("packed"), parts))
        return self._dequantized[1]

    def byte_range(self, name: str) -> tuple[int, int]:
        """The open file descriptor holding a tensor and the tensor's absolute byte offset in it."""
        info = self.tensors[name]
        return self._file(info.path).fileno(), info.start

    def _file(self, path: Path) -> BinaryIO:
        if path not in self._files:
            raise ValueError(f"{self.source} is closed")
        return self._files[path]

    def check_unchanged(self) -> None:
        """Refuse a run during which a file of this checkpoint was replaced, removed or rewritten: what the run
        computed no longer describes what the path holds."""
        for path, f in self._files.items():
            try:
                now = _signature(os.stat(path))
            except FileNotFoundError:
                now = None
            if now != self._opened[path] or _signature(os.fstat(f.fileno())) != self._opened[path]:
                raise UserError(f"{path}: input changed during the run (replaced, removed or rewritten); run again")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        _OPEN.discard(self)

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_OPEN: weakref.WeakSet[CheckpointIndex] = weakref.WeakSet()  # the checkpoints a run is reading


def _signature(status: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced (device, inode) or rewritten (size, modification time)."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def check_inputs_unchanged() -> None:
    """CheckpointIndex.check_unchanged for every checkpoint still open: called before an output is published."""
    for checkpoint in list(_OPEN):
        checkpoint.check_unchanged()


def _shard_paths(source: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint (a file, an index json, or a folder with or without an index) and the
    index's weight map when there is one. A folder holding model.safetensors is read from that file alone, as
    transformers loads it, even beside an index and its shards (said)."""
    if source.is_file():
        return _indexed_shards(source) if source.name.endswith(".index.json") else ([source], None)
    if not source.is_dir():
        raise UserError(f"{source}: no such file or folder")
    indexes = sorted(source.glob("*.safetensors.index.json"))
    single = source / SINGLE_FILE
    if single.is_file():
        others = [p.name for p in sorted(source.glob("*.safetensors")) if p != single] + [p.name for p in indexes]
        if others:
            listing = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
            log.warning(
                f"note: {source} holds {SINGLE_FILE} and {listing}: {SINGLE_FILE} is read, as transformers reads it"
            )
        return [single], None
    if (source / INDEX_FILE).is_file() or len(indexes) == 1:
        return _indexed_shards(source / INDEX_FILE if (source / INDEX_FILE).is_file() else indexes[0])
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        found = "only .bin weights" if any(source.glob("*.bin")) else "no weights"
        raise UserError(f"{source}: {found} (a folder of *.safetensors files is needed)")
    return shards, None


def _indexed_shards(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shard_names = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) and Path(name).name == name for name in shard_names):
            raise TypeError("shard names must be plain file names in the same folder")
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index_path}: invalid index file ({type(e).__name__}: {e})") from None
    shards = [index_path.parent / name for name in shard_names]
    missing = [str(p.name) for p in shards if not p.is_file()]
    if missing:
        raise UserError(f"{index_path}: shard files missing: {', '.join(missing[:3])}")
    return shards, weight_map


def _check_index(source: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """The index and its shards must agree: every tensor it lists in the file it names, and no other tensor."""
    misplaced = [n for n, file in weight_map.items() if n not in tensors or tensors[n].path.name != file]
    if misplaced:
        name = misplaced[0]
        where = f"it is in {tensors[name].path.name}" if name in tensors else "no shard holds it"
        more = f" (and {len(misplaced) - 1} more)" if len(misplaced) > 1 else ""
        raise UserError(f"{source}: the index lists {name} in {weight_map[name]}, but {where}{more}")
    unlisted = [n for n in tensors if n not in weight_map]
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise UserError(
            f"{source}: {tensors[unlisted[0]].path.name} holds {unlisted[0]}, which the index does not list{more}"
        )


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about a tensor before any byte is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def safetensors_header(
    specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None, size: int | None = None
) -> bytes:
    """The length prefix and JSON header for tensors stored in the given order, padded to 8 bytes.

    With `size`, the JSON is padded with spaces to exactly `size` bytes in all (it must fit).
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    padding = -len(text) % 8 if size is None else size - 8 - len(text)
    if padding < 0:
        raise ValueError("header does not fit the space reserved for it")
    text += b" " * padding
    return struct.pack("<Q", len(text)) + text


class ClosedOrAborted:
    """A writer as a context manager: `close()` when the block ends normally, `abort()` when it raises."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(ClosedOrAborted):
    """Writes a safetensors file front to back: header first, then each tensor's bytes in order.

    Tensors may arrive in row chunks; only the chunk being written is in memory. A tensor just written
    can be `discard`ed (its bytes are truncated away and the header, whose space was reserved for all
    declared tensors, is rewritten without it). The file appears at `path` only after every byte has
    been written and its header read back from disk matches the tensors written (it is built as
    `<path>.partial`); a failed write or close removes the partial file.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.metadata = metadata
        self.kept = list(specs)
        self._declared = len(specs)
        self._remaining = [(s.name, s.nbytes, s.dtype) for s in reversed(specs)]
        header = safetensors_header(specs, metadata)
        self._header_size = len(header)
        self._current: str | None = None  # the tensor being written, its declared dtype, and bytes still due
        self._dtype: torch.dtype | None = None
        self._left_in_tensor = 0
        self._ends_in_hole = False
        self._tensor_start = self._header_size
        self._file = open(self.partial, "wb")
        with self._aborting_on_error():
            self._file.write(header)

    @contextlib.contextmanager
    def _aborting_on_error(self) -> Iterator[None]:
        """Whatever fails, the partial file goes; a failed write (disk full) names the file it was for."""
        try:
            yield
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(self.path)
            raise

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next rows of tensor `name` (tensors must come in the order they were declared)."""
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with self._aborting_on_error():
            self._advance(name, chunk.dtype, data.nbytes)
            self._file.write(memoryview(data))
            self._ends_in_hole = self._ends_in_hole and not data.nbytes

    def write_zeros(self, name: str, dtype: torch.dtype, nbytes: int) -> None:
        """Append `nbytes` of zero bytes to tensor `name` as a hole in the file: nothing is written or held in
        memory, and the file reads back zeros there (a task vector's unchanged tensors cost no disk)."""
        with self._aborting_on_error():
            self._advance(name, dtype, nbytes)
            self._file.seek(nbytes, os.SEEK_CUR)
            self._ends_in_hole = True

    def copy_from(self, name: str, dtype: torch.dtype, source_fd: int, offset: int, nbytes: int) -> None:
        """Append `nbytes` of another file (from `offset`) to tensor `name`, copied by the kernel
        (`copy_file_range`: no pass through user memory); a plain read and write where the system has no such call
        (macOS, Windows) or the file system refuses it."""
        with self._aborting_on_error():
            self._advance(name, dtype, nbytes)
            self._file.flush()
            position = self._file.tell()
            done = _kernel_copy(source_fd, self._file.fileno(), offset, position, nbytes)
            while done < nbytes:  # another system or file system, an old kernel: copy through memory
                data = pread(source_fd, min(nbytes - done, CHUNK_BYTES), offset + done)
                if not data:
                    raise UserError(f"{self.path}: the source file ended early while copying {name!r}")
                done += pwrite(self._file.fileno(), data, position + done)
            self._file.seek(position + nbytes)
            self._ends_in_hole = self._ends_in_hole and not nbytes

    def _advance(self, name: str, dtype: torch.dtype, nbytes: int) -> None:
        """Account for the next `nbytes` of tensor `name`, starting it when the previous one is complete."""
        if self._left_in_tensor == 0:
            if not self._remaining:
                raise RuntimeError(f"writer got {name!r} after the last declared tensor")
            expected, size, declared = self._remaining.pop()
            if name != expected:
                raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
            self._current, self._dtype, self._left_in_tensor = name, declared, size
            self._tensor_start = self._file.tell()
        if name != self._current or dtype != self._dtype:
            raise RuntimeError(f"chunk of {name!r} ({dtype}) does not continue {self._current!r}")
        if nbytes > self._left_in_tensor:
            raise RuntimeError(f"too many bytes for tensor {name!r}")
        self._left_in_tensor -= nbytes

    def discard(self, name: str) -> None:
        """Leave out the tensor whose bytes were just written in full."""
        if self._left_in_tensor or self._current != name:
            raise RuntimeError(f"only the tensor just completed can be discarded, not {name!r}")
        with self._aborting_on_error():
            self._file.seek(self._tensor_start)
            self._file.truncate()  # sets the length exactly, holes before it included
            self._ends_in_hole = False
        self.kept = [s for s in self.kept if s.name != name]
        self._current = None

    def close(self) -> None:
        """Check that every declared byte was written and the file on disk says so, then move it into place."""
        with self._aborting_on_error():
            if self._left_in_tensor or self._remaining:
                raise RuntimeError(f"{self.path}: closed before all tensors were written")
            if self._ends_in_hole:
                self._file.truncate()  # give the file its length: seeking past the end wrote nothing
            if len(self.kept) < self._declared:
                self._file.seek(0)
                self._file.write(safetensors_header(self.kept, self.metadata, size=self._header_size))
            self._file.close()
            self._verify()
            os.replace(self.partial, self.path)

    def _verify(self) -> None:
        """Read the header back from disk: the tensors, their dtypes, shapes and sizes, and the file's length."""
        tensors, metadata = read_header(self.partial)
        written = [(t.name, t.dtype, t.shape) for t in tensors.values()]
        if written != [(s.name, s.dtype, tuple(s.shape)) for s in self.kept] or metadata != (self.metadata or {}):
            raise RuntimeError(f"{self.partial}: the file on disk does not hold the tensors written")

    def abort(self) -> None:
        """Remove the partial file (a failed flush of a file being thrown away is of no interest)."""
        with contextlib.suppress(OSError):
            self._file.close()
        self.partial.unlink(missing_ok=True)


def _kernel_copy(source_fd: int, target_fd: int, offset: int, position: int, nbytes: int) -> int:
    """Bytes copied by `copy_file_range` before it ran out of source or was refused (0: unsupported here, as on
    every system but Linux, where Python has no such call)."""
    done = 0
    if not hasattr(os, "copy_file_range"):
        return done
    try:
        while done < nbytes:
            copied = os.copy_file_range(source_fd, target_fd, nbytes - done, offset + done, position + done)
            if copied == 0:
                break
            done += copied
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EDQUOT):
            raise
    return done


def iter_row_chunks(shape: tuple[int, ...], dtype: torch.dtype, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges `(start, stop)` covering a tensor in order, each about `chunk_bytes` (at least one row)."""
    rows = shape[0] if shape else 1
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if rows == 0 or row_bytes == 0:  # no bytes at all: one chunk, however many rows a header claims
        yield 0, rows
        return
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class ShardedWriter(ClosedOrAborted):
    """Writes tensors in declared order across `<stem>-0000i-of-0000N.safetensors` shards plus the index.

    With a single shard the file is plain `<stem>.safetensors` and no index is written, as
    `save_pretrained` does. Used as a context manager: closed when the block ends, aborted (the shard being
    written removed) when it raises.
    """

    def __init__(
        self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int, metadata: dict[str, str], stem: str = "model"
    ):
        self.folder = Path(folder)
        self.metadata = metadata
        self.index_name = f"{stem}.safetensors.index.json"
        self.shards = plan_shards(specs, max_shard_bytes, stem)
        self.weight_map = {s.name: file for file, shard in self.shards for s in shard}
        self._pending = list(reversed(self.shards))
        self._writer: SafetensorsWriter | None = None
        self._left: set[str] = set()

    def write(self, name: str, chunk: torch.Tensor) -> None:
        self._shard_writer().write(name, chunk)

    def write_zeros(self, name: str, dtype: torch.dtype, nbytes: int) -> None:
        self._shard_writer().write_zeros(name, dtype, nbytes)

    def copy_from(self, name: str, dtype: torch.dtype, source_fd: int, offset: int, nbytes: int) -> None:
        self._shard_writer().copy_from(name, dtype, source_fd, offset, nbytes)

    def _shard_writer(self) -> SafetensorsWriter:
        if self._writer is None:
            file, shard = self._pending.pop()
            self._writer = SafetensorsWriter(self.folder / file, shard, self.metadata)
            self._left = {s.name for s in shard}
        return self._writer

    def discard(self, name: str) -> None:
        """Leave out the tensor just written in full (see SafetensorsWriter.discard)."""
        self._writer.discard(name)
        del self.weight_map[name]

    def tensor_done(self, name: str) -> None:
        """Tell the writer a tensor is complete, so a finished shard is closed straight away."""
        self._left.discard(name)
        if self._writer is not None and not self._left:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        if self._writer is not None or self._pending:
            self.abort()
            raise RuntimeError(f"{self.folder}: closed before all shards were written")
        if len(self.shards) > 1:
            total = sum(s.nbytes for _, shard in self.shards for s in shard if s.name in self.weight_map)
            index = {"metadata": {"total_size": total}, "weight_map": self.weight_map}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def plan_shards(
    specs: list[TensorSpec], max_shard_bytes: int, stem: str = "model"
) -> list[tuple[str, list[TensorSpec]]]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    n = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", group) for i, group in enumerate(groups)]
