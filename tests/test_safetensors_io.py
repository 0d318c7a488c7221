"""common/io/safetensors_io.py against safetensors' own reader and writer, and transformers' checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.io.safetensors_io import (
    INDEX_FILE,
    CheckpointIndex,
    SafetensorsWriter,
    Scratch,
    ShardedWriter,
    TensorSpec,
    iter_row_chunks,
    plan_shards,
    read_header,
)

# Every dtype the module maps, plus the shapes a checkpoint can hold: 0-d, empty, 1-D, 3-D, a single row.
CASES: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
    ("f32", torch.float32, (5, 3)),
    ("f16", torch.float16, (4, 4)),
    ("bf16", torch.bfloat16, (7, 2)),
    ("f64", torch.float64, (3, 5)),
    ("i64", torch.int64, (6,)),
    ("i32", torch.int32, (2, 3, 4)),
    ("i16", torch.int16, (5, 2)),
    ("i8", torch.int8, (9, 1)),
    ("u8", torch.uint8, (4, 3)),
    ("u16", torch.uint16, (3, 2)),
    ("u32", torch.uint32, (2, 2)),
    ("u64", torch.uint64, (3,)),
    ("bool", torch.bool, (5, 5)),
    ("f8_e4m3", torch.float8_e4m3fn, (4, 2)),
    ("f8_e5m2", torch.float8_e5m2, (2, 4)),
    ("scalar", torch.float32, ()),
    ("scalar_i64", torch.int64, ()),
    ("empty", torch.float32, (0, 4)),
    ("vector", torch.bfloat16, (11,)),
    ("one_row", torch.float16, (1, 6)),
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, -0.0, subnormals included); bools are 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def sample_tensors(cases=CASES) -> dict[str, torch.Tensor]:
    return {name: random_tensor(dtype, shape, seed) for seed, (name, dtype, shape) in enumerate(cases)}


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Same dtype, same shape, same bytes (torch.equal would call two equal NaNs different)."""
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    assert torch.equal(bits(actual), bits(expected)), name


def write_in_chunks(writer, name: str, tensor: torch.Tensor, sizes: list[int]) -> None:
    """Feed a tensor to a writer in row chunks of the given sizes, cycling through them."""
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        writer.write(name, tensor)
        return
    start, i = 0, 0
    while start < tensor.shape[0]:
        stop = start + sizes[i % len(sizes)]
        writer.write(name, tensor[start:stop])
        start, i = stop, i + 1


def data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


# --- SafetensorsWriter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[10**6], [1], [2, 1, 3], [4, 7]], ids=["whole", "rows", "mixed", "large"])
def test_writer_file_equals_save_file_round_trip(tmp_path, sizes):
    tensors = sample_tensors()
    metadata = {"format": "pt", "note": "written front to back ✓"}
    ours, reference = tmp_path / "ours.safetensors", tmp_path / "reference.safetensors"
    with SafetensorsWriter(ours, specs_of(tensors), metadata) as writer:
        for name, tensor in tensors.items():
            write_in_chunks(writer, name, tensor, sizes)
    save_file(tensors, reference, metadata=metadata)
    expected = load_file(reference)

    with safe_open(ours, framework="pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(tensors)
        for name in tensors:
            assert_identical(f.get_tensor(name), expected[name], name)
    loaded = load_file(ours)
    for name in tensors:
        assert_identical(loaded[name], expected[name], name)
    assert data_start(ours) % 8 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "reference.safetensors"]

    # Our own reader gives the same tensors, in the order they were written.
    with CheckpointIndex(ours) as index:
        assert index.names() == list(tensors)
        assert index.metadata == metadata
        for name in tensors:
            assert_identical(index.read(name), expected[name], name)


@pytest.mark.parametrize("name_length", range(1, 17))
def test_writer_pads_the_header_so_data_starts_8_byte_aligned(tmp_path, name_length):
    path = tmp_path / "aligned.safetensors"
    tensor = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    name = "t" * name_length
    with SafetensorsWriter(path, [TensorSpec(name, tensor.dtype, (3, 2))]) as writer:
        writer.write(name, tensor)
    assert data_start(path) % 8 == 0
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor(name), tensor)


def test_writer_file_appears_only_when_complete(tmp_path):
    path = tmp_path / "model.safetensors"
    partial = tmp_path / "model.safetensors.partial"
    tensors = {"a": torch.ones(4, 2), "b": torch.zeros(3, dtype=torch.int32)}
    writer = SafetensorsWriter(path, specs_of(tensors))
    writer.write("a", tensors["a"][:2])
    assert partial.is_file() and not path.exists()
    writer.write("a", tensors["a"][2:])
    writer.write("b", tensors["b"])
    assert partial.is_file() and not path.exists()
    writer.close()
    assert path.is_file() and not partial.exists()
    assert load_file(path).keys() == tensors.keys()


WRITER_SPECS = [TensorSpec("a", torch.float32, (4, 2)), TensorSpec("b", torch.int64, (3,))]
B = torch.zeros(3, dtype=torch.int64)

# Each mistake writes everything else correctly, so only the check for that mistake can make it raise.


def _out_of_order(w):
    w.write("b", B)
    w.write("a", torch.zeros(4, 2))


def _switch_tensor_mid_way(w):
    w.write("a", torch.zeros(2, 2))
    w.write("b", B)
    w.write("a", torch.zeros(2, 2))


def _too_many_bytes(w):
    w.write("a", torch.zeros(5, 2))
    w.write("b", B)


def _too_many_bytes_across_chunks(w):
    w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 2))
    w.write("b", B)


def _wrong_dtype_of_the_same_size(w):
    w.write("a", torch.zeros(4, 2, dtype=torch.int32))
    w.write("b", B)


def _wrong_dtype_in_a_later_chunk(w):
    w.write("a", torch.zeros(2, 2))
    w.write("a", torch.zeros(2, 2, dtype=torch.int32))
    w.write("b", B)


def _close_early(w):
    w.write("a", torch.zeros(4, 2))


def _close_mid_tensor(w):
    w.write("a", torch.zeros(4, 2))
    w.write("b", B[:2])


def _nothing_written(w):
    pass


def _write_past_the_last_tensor(w):
    w.write("a", torch.zeros(4, 2))
    w.write("b", B)
    w.write("b", B[:1])


MISTAKES = [
    _out_of_order,
    _switch_tensor_mid_way,
    _too_many_bytes,
    _too_many_bytes_across_chunks,
    _wrong_dtype_of_the_same_size,
    _wrong_dtype_in_a_later_chunk,
    _close_early,
    _close_mid_tensor,
    _nothing_written,
    _write_past_the_last_tensor,
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda f: f.__name__.strip("_"))
def test_writer_mistakes_raise_and_leave_no_file(tmp_path, mistake):
    # Writing past the last tensor currently raises IndexError ("pop from empty list"), the rest RuntimeError.
    with pytest.raises((RuntimeError, IndexError)):
        with SafetensorsWriter(tmp_path / "model.safetensors", WRITER_SPECS) as writer:
            mistake(writer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda f: f.__name__.strip("_"))
def test_writer_mistakes_without_a_with_block(tmp_path, mistake):
    """The protocol merge_checkpoint follows: a failed write, then abort(); or close() on its own."""
    writer = SafetensorsWriter(tmp_path / "model.safetensors", WRITER_SPECS)
    with pytest.raises((RuntimeError, IndexError)):
        try:
            mistake(writer)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda f: f.__name__.strip("_"))
def test_a_failed_write_or_close_removes_the_partial_file_by_itself(tmp_path, mistake):
    """No abort() and no with block: the writer cleans up after its own failure."""
    writer = SafetensorsWriter(tmp_path / "model.safetensors", WRITER_SPECS)
    with pytest.raises((RuntimeError, IndexError)):
        mistake(writer)
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_write_the_disk_refuses_names_the_file_and_removes_it(tmp_path):
    """A real EFBIG: the file size limit (RLIMIT_FSIZE) lowered for this process; Python ignores SIGXFSZ."""
    import resource

    path = tmp_path / "model.safetensors"
    writer = SafetensorsWriter(path, [TensorSpec("w", torch.float32, (256, 256))])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError) as error:
            writer.write("w", torch.ones(256, 256))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert error.value.filename == str(path) and "File too large" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_file_the_disk_cut_short_is_caught_by_the_check_before_the_rename(tmp_path):
    """close() reads the header back from disk: a file shorter than its header says never reaches `path`."""
    path = tmp_path / "model.safetensors"
    writer = SafetensorsWriter(path, [TensorSpec("w", torch.float32, (256, 256))])
    writer.write("w", torch.ones(256, 256))  # 256 kB: past the write buffer, on disk already
    os.truncate(writer.partial, writer.partial.stat().st_size - 4)
    with pytest.raises(UserError, match="truncated safetensors file"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_refusing_an_unsupported_dtype_leaves_no_partial_file(tmp_path):
    with pytest.raises((KeyError, ValueError, TypeError, RuntimeError, UserError)):
        SafetensorsWriter(tmp_path / "model.safetensors", [TensorSpec("c", torch.complex64, (2,))])
    assert list(tmp_path.iterdir()) == []


# --- ShardedWriter and plan_shards ---------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [1, 100, 116, 300, 1000, 10**9])
def test_plan_shards_keeps_order_and_fills_shards_greedily(max_shard_bytes):
    sizes = [(7, 4), (0, 4), (), (50,), (3, 3), (1, 1), (20, 2), (2,), (40,), (5, 5)]
    specs = [TensorSpec(f"t{i}", torch.float32, shape) for i, shape in enumerate(sizes)]
    shards = plan_shards(specs, max_shard_bytes)
    assert [s for _, shard in shards for s in shard] == specs
    totals = [sum(s.nbytes for s in shard) for _, shard in shards]
    for (_, shard), total in zip(shards, totals, strict=True):
        assert shard and (total <= max_shard_bytes or len(shard) == 1)
    for (_, shard), (_, following) in zip(shards, shards[1:], strict=False):
        assert sum(s.nbytes for s in shard) + following[0].nbytes > max_shard_bytes
    n = len(shards)
    if n == 1:
        assert shards[0][0] == "model.safetensors"
    else:
        assert [f for f, _ in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, sizes: list[int]):
    writer = ShardedWriter(folder, specs_of(tensors), max_shard_bytes, {"format": "pt"})
    for name, tensor in tensors.items():
        write_in_chunks(writer, name, tensor, sizes)
        writer.tensor_done(name)
    writer.close()
    return writer


def test_sharded_writer_folder_reads_back_bitwise(tmp_path):
    tensors = sample_tensors()
    writer = write_sharded(tmp_path, tensors, max_shard_bytes=96, sizes=[2, 1, 3])
    files = sorted({f for f, _ in writer.shards})
    assert len(files) > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, INDEX_FILE])

    index_json = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index_json["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index_json["weight_map"] == writer.weight_map
    assert set(index_json["weight_map"]) == set(tensors)

    expected = {}
    for file in files:
        with safe_open(tmp_path / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == sorted(n for n, shard in index_json["weight_map"].items() if shard == file)
            expected.update({name: f.get_tensor(name) for name in f.keys()})
    with CheckpointIndex(tmp_path) as index:
        assert index.names() == list(tensors)
        for name, tensor in tensors.items():
            assert_identical(expected[name], tensor, name)
            assert_identical(index.read(name), tensor, name)
            if tensor.dim() == 0:
                continue
            rows = tensor.shape[0]
            for a, b in {
                (0, rows),
                (0, min(1, rows)),
                (rows // 2, rows),
                (min(1, rows), max(1, rows - 1)),
                (rows, rows),
            }:
                if a <= b <= rows:
                    assert_identical(index.read_rows(name, a, b), tensor[a:b], f"{name}[{a}:{b}]")


@pytest.mark.parametrize("chunk_bytes", [0, 1, 7, 24, 64, 10**9])
def test_streaming_copy_through_iter_row_chunks_reproduces_the_checkpoint(tmp_path, chunk_bytes):
    """The merge's loop: read_rows per iter_row_chunks range into a ShardedWriter, tensor_done per tensor."""
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "source.safetensors")
    out = tmp_path / "copy"
    out.mkdir()
    with CheckpointIndex(tmp_path / "source.safetensors") as source:
        specs = [TensorSpec(n, source.info(n).dtype, source.info(n).shape) for n in source.names()]
        writer = ShardedWriter(out, specs, 128, {"format": "pt"})
        for spec in specs:
            for start, stop in iter_row_chunks(spec.shape, spec.dtype, chunk_bytes):
                writer.write(spec.name, source.read_rows(spec.name, start, stop))
            writer.tensor_done(spec.name)
        writer.close()
    assert_folder_holds(out, tensors)


def assert_folder_holds(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The folder's shards, read by safetensors' own reader, hold exactly these tensors, bit for bit."""
    copied = {}
    for shard in sorted(folder.glob("*.safetensors")):
        copied.update(load_file(shard))
    assert copied.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert_identical(copied[name], tensor, name)


@pytest.mark.parametrize(
    "how", ["scratch", "kernel_copy", "copy_through_memory", "no_copy_file_range", "no_positioned_io"]
)
def test_reused_buffers_and_kernel_copies_reproduce_the_checkpoint(tmp_path, how, monkeypatch):
    """The merge's fast paths: chunks read into one reused buffer, or bytes copied by copy_file_range (and
    the plain read-and-write it falls back to where the file system refuses it, or the system has no such call:
    macOS; or neither it nor positioned reads and writes: Windows)."""
    if how == "copy_through_memory":

        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    if how in ("no_copy_file_range", "no_positioned_io"):
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    if how == "no_positioned_io":
        for name in ("preadv", "pread", "pwrite"):
            monkeypatch.delattr(os, name, raising=False)
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "source.safetensors")
    out = tmp_path / "copy"
    out.mkdir()
    scratch = Scratch()
    with CheckpointIndex(tmp_path / "source.safetensors") as source:
        specs = [TensorSpec(n, source.info(n).dtype, source.info(n).shape) for n in source.names()]
        writer = ShardedWriter(out, specs, 128, {"format": "pt"})
        for spec in specs:
            if how == "scratch":
                for start, stop in iter_row_chunks(spec.shape, spec.dtype, 24):
                    writer.write(spec.name, source.read_rows(spec.name, start, stop, scratch))
            else:
                writer.copy_from(spec.name, spec.dtype, *source.byte_range(spec.name), spec.nbytes)
            writer.tensor_done(spec.name)
        writer.close()
    assert_folder_holds(out, tensors)


def test_zeros_are_written_as_holes_and_read_back_as_zeros(tmp_path):
    """A task vector's unchanged tensors: no bytes on disk, +0.0 when read (by safetensors' own reader)."""
    big = TensorSpec("zero.big", torch.float32, (1024, 1024))  # 4 MiB: whole blocks become a hole
    specs = [TensorSpec("head", torch.float32, (3,)), big, TensorSpec("zero.tail", torch.float16, (5, 7))]
    path = tmp_path / "sparse.safetensors"
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        writer.write("head", torch.tensor([1.0, -0.0, 2.0]))
        writer.write_zeros("zero.big", torch.float32, big.nbytes // 2)
        writer.write("zero.big", torch.zeros(512, 1024))
        writer.write_zeros("zero.tail", torch.float16, 70)  # the file ends in a hole
    loaded = load_file(path)
    assert torch.equal(loaded["head"], torch.tensor([1.0, -0.0, 2.0])) and loaded["head"][1].signbit()
    for name in ("zero.big", "zero.tail"):
        assert not torch.count_nonzero(loaded[name].view(torch.int16)), name  # +0.0 bit for bit
    stat = path.stat()
    assert stat.st_size == 8 + read_header_size(path) + 12 + big.nbytes + 70
    assert stat.st_blocks * 512 < stat.st_size - 1024 * 1024  # at least 1 MiB of it is a hole


def read_header_size(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_sharded_writer_output_loads_in_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rewritten"
    out.mkdir()
    with CheckpointIndex(tiny.base) as base:
        specs = [TensorSpec(n, base.info(n).dtype, base.info(n).shape) for n in base.names()]
        writer = ShardedWriter(out, specs, 100_000, {"format": "pt"})
        for spec in specs:
            for start, stop in iter_row_chunks(spec.shape, spec.dtype, 10_000):
                writer.write(spec.name, base.read_rows(spec.name, start, stop))
            writer.tensor_done(spec.name)
        writer.close()
    shutil.copyfile(tiny.base / "config.json", out / "config.json")
    assert len(writer.shards) > 1
    index_json = json.loads((out / INDEX_FILE).read_text())
    assert set(index_json["weight_map"]) == {s.name for s in specs}
    assert index_json["metadata"]["total_size"] == sum(s.nbytes for s in specs)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = AutoModelForCausalLM.from_pretrained(tiny.base).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert_identical(loaded[name], tensor, name)


# --- CheckpointIndex over real checkpoints ---------------------------------------------------------------


def test_index_over_a_save_pretrained_folder_matches_safe_open(tiny):
    weight_map = json.loads((tiny.base / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    with CheckpointIndex(tiny.base) as index:
        names = index.names()
        assert len(names) == len(set(names)) == len(index) == len(weight_map)
        assert set(names) == set(weight_map)
        for name in names:
            with safe_open(tiny.base / weight_map[name], framework="pt") as f:
                full = f.get_tensor(name)
            assert_identical(index.read(name), full, name)
            rows = full.shape[0]
            for a, b in [(0, 1), (1, 3), (rows - 2, rows), (0, rows), (rows // 3, rows // 2), (2, 2)]:
                assert_identical(index.read_rows(name, a, b), full[a:b], f"{name}[{a}:{b}]")


def test_index_json_naming_a_missing_shard_is_a_user_error(tiny, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny.base, folder)
    missing = sorted(folder.glob("model-*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(UserError) as error:
        CheckpointIndex(folder)
    assert missing.name in str(error.value) and INDEX_FILE in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"{", id="invalid-json"),
        pytest.param(b"{}", id="no-weight-map"),
        pytest.param(b'{"weight_map": ["shard.safetensors"]}', id="weight-map-a-list"),
        pytest.param(b'{"weight_map": {"a": "shard\xff.safetensors"}}', id="not-utf8"),
        pytest.param(b'{"weight_map": {"a": 5}}', id="file-name-not-a-string"),
        pytest.param(b'{"weight_map": {"a": "shard.safetensors", "b": 5}}', id="file-names-of-mixed-types"),
        pytest.param(b'{"weight_map": {"a": ["shard.safetensors"]}}', id="file-name-a-list"),
        pytest.param(b'{"weight_map": ' * 100_000, id="deeply-nested"),
        pytest.param(b'{"weight_map": {"a": "../shard.safetensors"}}', id="file-outside-the-folder"),
    ],
)
def test_corrupt_index_json_is_a_user_error(tmp_path, text):
    """(A shard not named model.safetensors: that file alone would be read, as transformers reads it.)"""
    save_file({"a": torch.ones(2)}, tmp_path / "shard.safetensors")
    (tmp_path / INDEX_FILE).write_bytes(text)
    with pytest.raises(UserError) as error:
        CheckpointIndex(tmp_path)
    assert str(tmp_path / INDEX_FILE) in str(error.value)


# --- corrupt files ---------------------------------------------------------------------------------------


def raw_file(header: object, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
B_AFTER_A = {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}
VALID = raw_file({"a": A, "b": B_AFTER_A}, bytes(24))

CORRUPT = [
    pytest.param(b"", id="empty-file"),
    pytest.param(b"\x01\x02\x03", id="shorter-than-8-bytes"),
    pytest.param(struct.pack("<Q", 1000) + b"{}", id="header-length-past-end"),
    pytest.param(struct.pack("<Q", 2**63) + b"{}", id="header-length-huge"),
    pytest.param(raw_file(b"{not json"), id="invalid-json"),
    pytest.param(raw_file(b'{"\xff": 1}'), id="header-not-utf8"),
    pytest.param(raw_file([1, 2]), id="header-not-an-object"),
    pytest.param(raw_file({"a": {**A, "dtype": "Q7"}}, bytes(16)), id="unknown-dtype"),
    pytest.param(raw_file({"a": {"dtype": "F32", "shape": [2, 2]}}, bytes(16)), id="missing-offsets"),
    pytest.param(raw_file({"a": {**A, "shape": [-2, -2]}}, bytes(16)), id="negative-shape"),
    pytest.param(raw_file({"a": 5}, bytes(16)), id="entry-not-an-object"),
    pytest.param(raw_file({"a": A, "b": {**B_AFTER_A, "data_offsets": [8, 16]}}, bytes(24)), id="overlap"),
    pytest.param(raw_file({"a": A, "b": {**B_AFTER_A, "data_offsets": [20, 28]}}, bytes(28)), id="gap"),
    pytest.param(raw_file({"b": B_AFTER_A}, bytes(24)), id="gap-at-start"),
    pytest.param(raw_file({"a": {**A, "data_offsets": [0, 12]}}, bytes(12)), id="byte-range-not-shape"),
    pytest.param(raw_file({"a": {**A, "data_offsets": [16, 0]}}, bytes(16)), id="offsets-reversed"),
    pytest.param(VALID[:-4], id="truncated-data"),
    pytest.param(VALID[:-24], id="truncated-at-data-start"),
    pytest.param(raw_file({"__metadata__": ["format", "pt"], "a": A}, bytes(16)), id="metadata-not-an-object"),
    pytest.param(raw_file({"__metadata__": "pt", "a": A}, bytes(16)), id="metadata-a-string"),
    pytest.param(raw_file(b"[" * 100_000), id="deeply-nested-header"),
    pytest.param(raw_file({"a": A}, bytes(24)), id="bytes-after-the-last-tensor"),
    pytest.param(raw_file({"__metadata__": {"n": 1}, "a": A}, bytes(16)), id="metadata-value-not-a-string"),
    pytest.param(raw_file({"a": {**A, "shape": [True, 4]}}, bytes(16)), id="shape-entry-a-bool"),
]


def test_the_valid_file_the_corrupt_ones_come_from_is_valid(tmp_path):
    path = tmp_path / "valid.safetensors"
    path.write_bytes(VALID)
    tensors, metadata = read_header(path)
    assert list(tensors) == ["a", "b"] and metadata == {}
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b"]


@pytest.mark.parametrize("content", CORRUPT)
def test_corrupt_file_is_a_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorError):  # safetensors itself refuses every one of these files
        safe_open(path, framework="pt")
    for read in (read_header, CheckpointIndex, lambda p: CheckpointIndex(p.parent)):
        with pytest.raises(UserError) as error:
            read(path)
        assert str(path) in str(error.value)


def test_file_cut_short_after_indexing_is_a_user_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(8.0).reshape(4, 2), "b": torch.arange(6.0).reshape(3, 2)}, path)
    with CheckpointIndex(path) as index:
        last = max(index.names(), key=lambda n: index.info(n).end)
        os.truncate(path, path.stat().st_size - 4)
        with pytest.raises(UserError) as error:
            index.read(last)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("start, stop", [(2, 4), (0, 4), (-1, 2), (2, 1), (4, 4)])
def test_read_rows_out_of_range_is_refused(tmp_path, start, stop):
    """Rows past the end must not come back as the bytes of the tensor stored next."""
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0).reshape(3, 2), "b": torch.full((3, 2), 7.0)}, path)
    with CheckpointIndex(path) as index:
        for name in index.names():
            with pytest.raises(IndexError):
                index.read_rows(name, start, stop)


def test_read_rows_of_a_0d_tensor_is_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    scalar = torch.tensor(3.5, dtype=torch.float64)
    save_file({"s": scalar, "v": torch.ones(2)}, path)
    with CheckpointIndex(path) as index:
        assert_identical(index.read("s"), scalar)
        assert_identical(index.read_rows("s", 0, 1), scalar)
        with pytest.raises(IndexError):
            index.read_rows("s", 0, 2)


# --- iter_row_chunks -------------------------------------------------------------------------------------

SHAPES = [(), (0,), (0, 4), (1,), (1, 8), (2,), (3,), (5, 3), (7, 1, 2), (64, 64), (1000,), (5, 0), (3, 0, 2), (13, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.float64], ids=str)
def test_iter_row_chunks_covers_every_row_once_in_order(dtype):
    for shape in SHAPES:
        rows = shape[0] if shape else 1
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        for chunk_bytes in [0, 1, 3, 4, 8, 12, 13, 100, 4096, 10**12]:
            chunks = list(iter_row_chunks(shape, dtype, chunk_bytes))
            where = f"shape={shape} chunk_bytes={chunk_bytes}"
            if rows == 0:
                # One empty chunk, so a zero-row tensor is still written (the writer expects every tensor).
                assert chunks == [(0, 0)], where
                continue
            assert chunks[0][0] == 0 and chunks[-1][1] == rows, where
            assert all(stop == start for (_, stop), (start, _) in zip(chunks, chunks[1:], strict=False)), where
            for start, stop in chunks:
                n = stop - start
                assert n >= 1, where
                assert n == 1 or n * row_bytes <= chunk_bytes, where  # over budget only as a single row
            if row_bytes:
                # Not needlessly small: one more row would have gone over the budget.
                assert all((stop - start + 1) * row_bytes > chunk_bytes for start, stop in chunks[:-1]), where


# --- no memory map ---------------------------------------------------------------------------------------


def mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def open_fds_to(path: Path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


def test_reading_does_not_memory_map_the_checkpoint(tmp_path):
    path = tmp_path / "big.safetensors"
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    save_file({"w": weight, "b": torch.arange(10)}, path)
    with CheckpointIndex(path) as index:
        assert_identical(index.read("w"), weight)
        assert_identical(index.read_rows("w", 10, 200), weight[10:200])
        index.read("b")
        assert not mapped(path)
        assert open_fds_to(path) == 1
    assert open_fds_to(path) == 0
    # The check can fail: safetensors' own reader does map the file.
    with safe_open(path, framework="pt") as f:
        f.get_tensor("w")
        assert mapped(path)


def _sharded(
    folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str] | None = None
) -> Path:
    """A checkpoint folder written with safetensors' own writer, and its index (`weight_map`, else the true one)."""
    folder.mkdir()
    true_map = {}
    for file, tensors in shards.items():
        save_file(tensors, folder / file, metadata={"format": "pt"})
        true_map |= dict.fromkeys(tensors, file)
    index = {"metadata": {}, "weight_map": true_map if weight_map is None else weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def test_an_index_listing_a_tensor_no_shard_holds_is_refused(tmp_path):
    a, b = torch.zeros(2), torch.ones(3)
    folder = _sharded(tmp_path / "m", {"s1.safetensors": {"a": a}}, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(UserError, match="the index lists b in s1.safetensors, but no shard holds it"):
        CheckpointIndex(folder)
    folder = _sharded(tmp_path / "n", {"s1.safetensors": {"a": a, "b": b}}, {"a": "s1.safetensors"})
    with pytest.raises(UserError, match="s1.safetensors holds b, which the index does not list"):
        CheckpointIndex(folder)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    shards = {"s1.safetensors": {"a": torch.zeros(2)}, "s2.safetensors": {"a": torch.ones(2), "b": torch.ones(1)}}
    folder = _sharded(tmp_path / "m", shards, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(UserError, match="tensor a is in two files"):
        CheckpointIndex(folder)


def test_a_stray_single_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path, caplog):
    """transformers loads model.safetensors before any index: so do we, and say so."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "m"
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    model.save_pretrained(folder, max_shard_size="4KB")
    assert (folder / INDEX_FILE).is_file()
    stray = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(stray, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = GPT2LMHeadModel.from_pretrained(folder).state_dict()
    with caplog.at_level("WARNING", logger="lora_tv"), CheckpointIndex(folder) as index:
        assert set(index.names()) == set(stray)
        for name in index.names():
            assert torch.equal(index.read(name), loaded[name]), name
    assert "model.safetensors is read, as transformers reads it" in caplog.text
