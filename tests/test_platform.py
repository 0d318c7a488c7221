"""What differs from one system or installation to another: calls only some systems have (each hidden here, as on
the systems that lack it), transformers' source layout, the τ sources' shared interface, and the dependency floors."""

from __future__ import annotations

import inspect
import os
import re
import signal
import typing
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_merge

from common.errors import UserError
from common.io import outputs, safetensors_io
from common.io.safetensors_io import CheckpointIndex
from common.io.tensor_source import TensorLayout, TensorSource
from common.model import layout

# The calls only some systems have, as each system lacks them: macOS has no copy_file_range; Windows has none of
# these (its positioned reads and writes are a seek and a read or write).
MISSING = {
    "macos": ["copy_file_range"],
    "windows": ["copy_file_range", "preadv", "pread", "pwrite"],
}


def hide(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> None:
    for name in names:
        monkeypatch.delattr(os, name, raising=False)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("system", list(MISSING))
def test_a_merge_without_the_linux_only_calls_is_byte_for_byte_the_same(tiny, pipeline, tmp_path, monkeypatch, system):
    """The fp32 merge copies every tensor the adapter leaves alone (copy_file_range on Linux): without the call it
    copies through memory, and without positioned reads it seeks; the output is the same, byte for byte."""
    reference = pipeline("fp32").merged
    copied, pwrite = [], getattr(safetensors_io, "pwrite", None)

    def counting_pwrite(fd: int, data: bytes, offset: int) -> int:
        copied.append(len(data))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(safetensors_io, "pwrite", counting_pwrite, raising=False)
    hide(monkeypatch, MISSING[system])
    run_merge(tiny.base, tiny.adapter, tmp_path / "merged", "--precision", "fp32", "--device", "cpu")
    assert copied, "no tensor was copied through memory: the fallback was not exercised"
    ours, theirs = files_of(tmp_path / "merged"), files_of(reference)
    assert ours.keys() == theirs.keys()
    assert all(ours[name] == theirs[name] for name in theirs), [n for n in theirs if ours[n] != theirs[n]]


def test_reads_and_the_fingerprint_without_positioned_reads(tiny, monkeypatch):
    """Windows has no os.preadv / os.pread: a seek and a read give the same tensors and the same fingerprint."""
    with CheckpointIndex(tiny.base) as base:
        names = base.names()
        expected = {name: base.read(name) for name in names}
        rows = base.read_rows(names[0], 1, 3, safetensors_io.Scratch()).clone()
        fingerprint = layout.fingerprint(base)
    hide(monkeypatch, MISSING["windows"])
    with CheckpointIndex(tiny.base) as base:
        assert all(torch.equal(base.read(name), expected[name]) for name in names)
        assert torch.equal(base.read_rows(names[0], 1, 3, safetensors_io.Scratch()), rows)
        assert layout.fingerprint(base) == fingerprint


def test_signals_are_held_without_pthread_sigmask_and_sighup(monkeypatch):
    """Windows has neither: a signal during the swap is noted and acts right after it, as when it is blocked."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        monkeypatch.delattr(signal, "pthread_sigmask")
        monkeypatch.delattr(signal, "SIGHUP")
        with outputs.signals_held():
            signal.raise_signal(signal.SIGTERM)
            assert got == []  # held
        assert got == [signal.SIGTERM]  # and delivered after, to the handler that was there
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_output_is_published_where_folders_cannot_be_synced(tmp_path, monkeypatch):
    """Windows opens no folder (and some file systems refuse fsync on one): the files are synced, the folders'
    entries left to the system, and the output appears whole."""
    opened = os.open

    def no_folders(path, flags, *args, **kwargs):
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_folders)
    with outputs.staged_output_dir(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"


def test_an_empty_output_folder_is_replaced_where_rename_refuses_any_existing_folder(tmp_path, monkeypatch):
    """Windows' rename never replaces a folder, even an empty one (POSIX's replaces an empty one); a non-empty
    folder that appeared meanwhile is still refused."""
    rename = Path.rename

    def windows_rename(path: Path, target: Path) -> Path:
        if Path(target).exists():
            raise FileExistsError(17, "Cannot create a file when that file already exists", str(target))
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", windows_rename)
    (tmp_path / "out").mkdir()
    with outputs.staged_output_dir(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    with pytest.raises(UserError, match="another run"), outputs.staged_output_dir(tmp_path / "other") as staging:
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "theirs.txt").write_text("theirs")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["theirs.txt"]


# Model classes whose fp32-kept modules transformers' source does not give where kept_in_fp32 first looks: a config
# whose model_type names no modeling file of its own (sarvam_mla, dots3_note_text are DeepSeek-V3-like decoders;
# blip-2's folder is blip_2), or a class written `_keep_in_fp32_modules = None`.
ELSEWHERE = [
    ("sarvam_mla", "DeepseekV3ForCausalLM"),
    ("sarvam_moe", "Glm4MoeForCausalLM"),
    ("dots3_note_text", "Dots3NoteForCausalLM"),
    ("blip-2", "Blip2ForConditionalGeneration"),
    ("audioflamingo3", "AudioFlamingo3Model"),
]
KEPT = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")


def transformers_class(name: str) -> type:
    import transformers

    model_class = getattr(transformers, name, None)
    if model_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return model_class


@pytest.mark.parametrize("model_type, architecture", ELSEWHERE)
def test_the_fp32_kept_modules_of_a_class_defined_elsewhere_are_the_classes_own(model_type, architecture):
    model_class = transformers_class(architecture)
    found = layout.class_attributes({"architectures": [architecture], "model_type": model_type}, KEPT)
    assert found == {name: list(getattr(model_class, name, None) or []) for name in KEPT}


def test_the_fp32_kept_modules_are_found_when_the_source_file_is_not(monkeypatch):
    """GPT-OSS keeps its norms in fp32 at fp16: still found when transformers' source is not where it is looked for
    (another layout of transformers' files)."""
    model_class = transformers_class("GptOssForCausalLM")
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda path: not path.name.startswith("modeling_") and is_file(path))
    kept = layout.kept_in_fp32({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"}, torch.float16)
    assert kept is not None
    assert all(kept.search(f"model.layers.0.{name}.weight") for name in model_class._keep_in_fp32_modules)


def test_a_router_kept_in_fp32_at_bf16_is_found_for_a_model_type_without_its_own_file():
    """DeepSeek-V3's router stays fp32 even at bf16 (`_keep_in_fp32_modules_strict`: its correction bias, and from
    later transformers its weight too), under any model_type."""
    strict = transformers_class("DeepseekV3ForCausalLM")._keep_in_fp32_modules_strict
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "sarvam_mla"}
    kept = layout.kept_in_fp32(config, torch.bfloat16)
    assert kept is not None and all(kept.search(f"model.layers.3.mlp.gate.{name.split('.')[-1]}") for name in strict)
    assert not kept.search("model.layers.3.mlp.experts.0.up_proj.weight")


def test_a_config_without_architectures_is_read_through_the_auto_mapping():
    model_class = transformers_class("GptOssForCausalLM")
    found = layout.class_attributes({"model_type": "gpt_oss"}, KEPT)
    assert found["_keep_in_fp32_modules"] == list(model_class._keep_in_fp32_modules)


def test_a_class_transformers_does_not_have_keeps_nothing_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="lora_tv"):
        kept = layout.kept_in_fp32({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}, torch.float16)
    assert kept is None
    assert "has no model class NoSuchForCausalLM" in caplog.text


def protocol_members(protocol: type) -> list[str]:
    return sorted(
        name
        for name, value in vars(protocol).items()
        if (callable(value) or isinstance(value, property)) and (not name.startswith("_") or name in PROTOCOL_DUNDERS)
    )


PROTOCOL_DUNDERS = {"__contains__", "__len__"}


def parameters(function: object) -> list[tuple[str, object]]:
    """A method's parameters by name and kind (annotations are strings under `from __future__ import annotations`)."""
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


@pytest.fixture(scope="module")
def tensor_sources(tiny, pipeline) -> typing.Iterator[list[object]]:
    from common.taskvec.of_models import TaskVectorOfModels

    with (
        CheckpointIndex(pipeline("fp32").task_vector_file) as tau_file,
        CheckpointIndex(tiny.base) as base,
        CheckpointIndex(pipeline("fp32").merged) as finetuned,
    ):
        of_models = TaskVectorOfModels(base, finetuned, {"base_model": str(tiny.base), "finetuned_model": "f"})
        yield [tau_file, of_models]


def test_both_tau_sources_are_a_tensor_source(tensor_sources):
    """A τ file and τ of two models: every member TensorSource names, with its parameters, and the same answers."""
    members = protocol_members(TensorSource)
    assert {"names", "info", "read", "shapes", "source", "metadata", "__contains__", "__len__"} <= set(members)
    tau_file, of_models = tensor_sources
    for source in (tau_file, of_models):
        assert isinstance(source, TensorSource), type(source).__name__
        for member in members:
            declared = getattr(TensorSource, member)
            if isinstance(declared, property):
                assert not callable(getattr(source, member)), member
                continue
            assert parameters(getattr(type(source), member)) == parameters(declared), (type(source).__name__, member)
    assert of_models.names() == tau_file.names() and len(of_models) == len(tau_file)
    assert of_models.shapes() == tau_file.shapes()
    for name in tau_file.names():
        assert name in of_models
        computed, stored = of_models.info(name), tau_file.info(name)
        assert isinstance(computed, TensorLayout) and isinstance(stored, TensorLayout)
        assert (computed.name, computed.dtype, tuple(computed.shape)) == (name, stored.dtype, stored.shape)
        assert torch.equal(of_models.read(name), tau_file.read(name)), name


def requirement_floors(path: Path) -> dict[str, str]:
    """`name>=version` lines of a requirements file: {normalised name: version}."""
    floors = {}
    for line in path.read_text().splitlines():
        found = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^\s,;#]+)", line)
        if found:
            floors[re.sub(r"[-_.]+", "_", found[1].lower())] = found[2]
    return floors


def pins(path: Path) -> dict[str, str]:
    found = (re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line) for line in path.read_text().splitlines())
    return {re.sub(r"[-_.]+", "_", m[1].lower()): m[2] for m in found if m}


def test_the_floors_make_test_floors_installs_are_requirements_floors():
    """constraints-floors.txt pins every floor of requirements.txt, exactly (torch: the wheel the Makefile installs)."""
    from packaging.version import Version

    floors = requirement_floors(REPO / "requirements.txt")
    pinned = pins(REPO / "constraints-floors.txt")
    for name, version in floors.items():
        if name != "torch":
            assert name in pinned and Version(pinned[name]) == Version(version), (name, version, pinned.get(name))


def test_the_scripts_entry_runs_without_sighup_or_resource(monkeypatch, capsys):
    """cli.run and the merge's peak-memory line on a platform without SIGHUP and without `resource` (Windows)."""
    import builtins
    import signal

    from common import cli

    monkeypatch.delattr(signal, "SIGHUP")
    real_import = builtins.__import__

    def no_resource(name, *args, **kwargs):
        if name == "resource":
            raise ImportError("no resource here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_resource)
    assert cli.peak_memory_gb() != cli.peak_memory_gb()  # NaN: nothing to report
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda argv: 0, [])
    assert exit_.value.code == 0
