"""Mutated safetensors headers, adapter configs and adapter tensors fed to the readers.

Every case ends in the project's UserError or a correct read: never another exception, a hang, or an
allocation sized by a forged shape (a shape is only believed once the file holds its bytes).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import UserError
from common.io.safetensors_io import DTYPES, CheckpointIndex, iter_row_chunks, read_header
from common.lora.adapter import CONFIG_FILE, LoraAdapter
from common.lora.arithmetic import apply_changes
from common.lora.deltas import plan_deltas
from common.lora.merge_plan import plan_merge
from common.model.layout import read_config

# FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py searches harder than the suite's default.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MAX_CHUNKS = 10_000  # far more than any valid file here needs: more would be a forged shape driving a loop

# --- safetensors headers ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)
dimensions = st.sampled_from([0, 1, 2, 3, 4, 2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -1])
shapes = st.lists(dimensions, max_size=4) | st.lists(st.just(1), min_size=60, max_size=70)
dtype_names = st.sampled_from([*DTYPES, "F8_E8M0", "C64", "f32", "", "BF16 "]) | st.text(max_size=4)
offsets = st.lists(st.integers(min_value=-8, max_value=80) | dimensions, min_size=0, max_size=3)


def valid_file() -> tuple[dict, bytes]:
    """A real safetensors file (safetensors' own writer) of several dtypes and shapes: header and data."""
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
        "s": torch.tensor(7, dtype=torch.int64),
        "e": torch.zeros(0, 5, dtype=torch.float16),
        "m": torch.tensor([True, False, True]),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "valid.safetensors"
        save_file(tensors, path, metadata={"format": "pt"})
        raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


HEADER, DATA = valid_file()
NAMES = [name for name in HEADER if name != "__metadata__"]


@st.composite
def header_mutation(draw) -> tuple[str, object, object]:
    """One edit of the header: a field of an entry, an entry, the metadata, or a new entry."""
    kind = draw(st.sampled_from(["field", "delete_field", "entry", "metadata", "new_entry"]))
    name = draw(st.sampled_from(NAMES) | st.text(max_size=5))
    if kind == "field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        strategy = {"dtype": dtype_names, "shape": shapes, "data_offsets": offsets}[field]
        return kind, (name, field), draw(strategy | json_values)
    if kind == "delete_field":
        return kind, (name, draw(st.sampled_from(["dtype", "shape", "data_offsets"]))), None
    if kind == "new_entry":
        entry = {"dtype": draw(dtype_names), "shape": draw(shapes), "data_offsets": draw(offsets)}
        return kind, name, draw(st.just(entry) | json_values)
    return kind, name, draw(json_values)


def apply_mutation(header: dict, mutation: tuple[str, object, object]) -> None:
    kind, where, value = mutation
    if kind in ("field", "delete_field"):
        name, field = where
        entry = header.get(name)
        if isinstance(entry, dict):
            if kind == "field":
                entry[field] = value
            else:
                entry.pop(field, None)
    elif kind == "metadata":
        header["__metadata__"] = value
    else:
        header[where] = value


@st.composite
def mutated_file(draw) -> bytes:
    """A valid file with 1-3 header edits, a forged or shifted length prefix, data cut or extended, bytes flipped."""
    header = json.loads(json.dumps(HEADER))
    for mutation in draw(st.lists(header_mutation(), min_size=0, max_size=3)):
        apply_mutation(header, mutation)
    text = json.dumps(header).encode()
    length = len(text)
    length_edit = draw(st.sampled_from(["keep", "shift", "forge"]))
    if length_edit == "shift":
        length = max(0, length + draw(st.integers(-16, 16)))
    elif length_edit == "forge":
        length = draw(st.integers(0, 2**64 - 1))
    data = DATA
    data_edit = draw(st.integers(-len(DATA), 16))
    data = data[:data_edit] if data_edit < 0 else data + bytes(data_edit)
    raw = bytearray(struct.pack("<Q", length) + text + data)
    for position, value in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=3)):
        raw[position] = value
    return bytes(raw)


def bits(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_read_is_correct(path: Path) -> str:
    """UserError, or every tensor read back as the bytes its header entry names (and as safetensors reads it).

    Returns what happened, for hypothesis' statistics (pytest --hypothesis-show-statistics).
    """
    try:
        tensors, _ = read_header(path)
    except UserError as e:
        with pytest.raises(UserError):  # the index refuses it the same way
            CheckpointIndex(path)
        return f"refused: {str(e).removeprefix(f'{path}: ')[:30]}"
    raw = path.read_bytes()
    try:
        with safe_open(path, framework="pt") as f:
            theirs = {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # safetensors may refuse what we accept (e.g. spaces before the header's "{")
        theirs = {}
    with CheckpointIndex(path) as index:
        for name, info in tensors.items():
            assert info.nbytes == info.numel * info.dtype.itemsize <= len(raw), name
            tensor = index.read(name)
            assert tensor.dtype == info.dtype and tuple(tensor.shape) == info.shape, name
            assert bits(tensor) == raw[info.start : info.end], name
            if name in theirs:
                assert bits(theirs[name]) == bits(tensor), name
            chunks = list(itertools.islice(iter_row_chunks(info.shape, info.dtype, 8), MAX_CHUNKS))
            assert len(chunks) < MAX_CHUNKS, (name, info.shape)
            rows = sum(stop - start for start, stop in chunks)
            assert rows == (info.shape[0] if info.shape else 1), name
    return "read"


@FUZZ
@given(content=mutated_file())
def test_mutated_safetensors_file_is_refused_or_read_correctly(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(content)
        event(assert_read_is_correct(path))


def test_the_unmutated_file_reads_correctly(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(json.dumps(HEADER))) + json.dumps(HEADER).encode() + DATA)
    assert assert_read_is_correct(path) == "read"
    assert set(read_header(path)[0]) == set(NAMES)


def raw_file(entry: dict, data: bytes = b"") -> bytes:
    text = json.dumps({"t": entry}).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    "shape",
    [[2**40, 2**40], [2**62, 4], [2**63 - 1, 2**63 - 1], [2**64, 1], [65536] * 8, [1] * 65],
    ids=["2^40-squared", "2^62-rows", "int64-max", "past-int64", "8-dims", "65-dims"],
)
def test_forged_huge_shape_is_refused_before_any_read(tmp_path, shape):
    path = tmp_path / "forged.safetensors"
    path.write_bytes(raw_file({"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}, bytes(16)))
    with pytest.raises(UserError) as error:
        CheckpointIndex(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("shape", [[2**62, 0], [0, 2**63 - 1], [2**63 - 1, 0, 2**63 - 1]])
def test_empty_tensor_with_huge_dimensions_reads_as_empty_in_one_chunk(tmp_path, shape):
    """A shape with a zero holds no bytes however large the other dimensions: read and chunked at once."""
    path = tmp_path / "empty.safetensors"
    path.write_bytes(raw_file({"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}))
    with CheckpointIndex(path) as index:
        assert index.read("t").numel() == 0 and list(index.read("t").shape) == shape
        assert list(iter_row_chunks(tuple(shape), torch.float32, 64)) == [(0, shape[0])]


# --- adapter configs and adapter tensors ------------------------------------------------------------------

config_values = (
    json_values
    | st.integers(min_value=-3, max_value=20)
    | st.floats(min_value=-100, max_value=100)
    | st.dictionaries(
        st.sampled_from(["q_proj", "k_proj", "layers.0.self_attn.q_proj", ".*", "(", "v_proj|o_proj", "["])
        | st.text(max_size=4),
        st.integers(min_value=-2, max_value=16) | st.floats(allow_nan=True) | st.text(max_size=2),
        max_size=3,
    )
    | st.lists(st.integers(min_value=-2, max_value=600), max_size=3)
)
config_keys = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "use_rslora",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "peft_type",
        "layer_replication",
        "trainable_token_indices",
        "target_modules",
        "use_dora",
    ]
)


@st.composite
def mutated_config(draw, original: dict) -> bytes:
    """The adapter's own config with keys set to odd values or removed, replaced whole, or its bytes damaged."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "replace", "bytes"]))
    if kind == "replace":
        return json.dumps(draw(json_values)).encode()
    config = dict(original)
    for key, value in draw(st.lists(st.tuples(config_keys, st.none() | config_values), min_size=1, max_size=3)):
        if value is None and draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = value
    text = bytearray(json.dumps(config).encode())
    if kind == "bytes":
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(0, 255)))):
            text[position] = value
    return bytes(text)


@pytest.fixture(scope="module")
def fuzz_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_adapter")
    for name in ("adapter_model.safetensors", CONFIG_FILE):
        shutil.copyfile(tiny.adapter / name, folder / name)
    return folder


def read_adapter_and_merge_plan(folder: Path, base_dir: Path) -> None:
    """What merge and compare do with an adapter before writing: read it, match it to the base, compute Δ."""
    with CheckpointIndex(base_dir) as base:
        adapter = LoraAdapter(folder)
        try:
            plan = plan_merge(base, adapter, torch.float32, read_config(base_dir))
            for name, changes in list(plan.changes.items())[:3]:
                apply_changes(base.read(plan.sources[name]).double(), changes, adapter, torch.float64)
            plan_deltas(adapter, None, {}, set(base.names()))
        finally:
            adapter.close()


@FUZZ
@given(data=st.data())
def test_mutated_adapter_config_is_refused_or_read(tiny, fuzz_folder, data):
    original = json.loads((tiny.adapter / CONFIG_FILE).read_text())
    (fuzz_folder / CONFIG_FILE).write_bytes(data.draw(mutated_config(original)))
    try:
        read_adapter_and_merge_plan(fuzz_folder, tiny.base)
        event("read and merged")
    except UserError:
        event("refused")


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.embed_tokens", "lm_head"]
KINDS = [
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "token_adapter.trainable_tokens_delta",
    "base_layer.bias",
    "modules_to_save.default.weight",
]
adapter_dtypes = st.sampled_from(
    [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn]
)
small_shapes = st.lists(st.sampled_from([0, 1, 2, 8, 32, 64, 512]), max_size=3).filter(lambda s: math.prod(s) < 2**16)


@st.composite
def adapter_tensors(draw) -> dict[str, torch.Tensor]:
    """Keys of every kind peft writes, on real and unknown modules, with shapes and dtypes drawn freely."""
    tensors = {}
    for _ in range(draw(st.integers(1, 5))):
        module = draw(st.sampled_from(MODULES) | st.text(alphabet="abc._0", min_size=1, max_size=6))
        key = f"base_model.model.{module}.{draw(st.sampled_from(KINDS))}"
        shape, dtype = draw(small_shapes), draw(adapter_dtypes)
        tensors[key] = torch.ones(shape, dtype=torch.float32).to(dtype)
    return tensors


@FUZZ
@given(tensors=adapter_tensors(), rank=st.sampled_from([1, 2, 8]))
def test_forged_adapter_tensors_are_refused_or_merged(tiny, tmp_path_factory, tensors, rank):
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "trainable_token_indices": [1, 5]}
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        read_adapter_and_merge_plan(folder, tiny.base)
        event("read and merged")
    except UserError:
        event("refused")
    finally:
        shutil.rmtree(folder)


def test_an_empty_tensor_whose_strides_overflow_is_refused(tmp_path):
    """[0, 2, 2**62] holds no bytes, but torch cannot even make it (its first stride is 2**63): one line."""
    path = tmp_path / "empty.safetensors"
    path.write_bytes(raw_file({"dtype": "F16", "shape": [0, 2, 2**62], "data_offsets": [0, 0]}))
    with pytest.raises(UserError, match="strides past torch's int64"):
        CheckpointIndex(path)
