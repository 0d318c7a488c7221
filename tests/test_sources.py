"""Hub ids resolved through a local Hugging Face cache (offline), and local paths taken as they are.

One merge from hub ids runs as `python merge_lora.py` with HF_HUB_CACHE and HF_HUB_OFFLINE in its environment (read
when huggingface_hub is imported); the other runs call merge's main in this process, with huggingface_hub's cache
and offline settings pointed at the same cache (`in_hub`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, assert_user_error, run_main, run_script

from common.errors import UserError
from common.io.sources import resolve_adapter, resolve_model

BASE_ID = "testorg/tiny-starcoder2"
ADAPTER_ID = "testorg/tiny-lora"


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay out `folder` as huggingface_hub caches a download: blobs by hash, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline: the hub reads the hash as is
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


@pytest.fixture(scope="module")
def hub(tiny, tmp_path_factory):
    """A hub cache holding the tiny base and its adapter, and the environment that points the scripts at it."""
    cache = tmp_path_factory.mktemp("hub_cache")
    add_to_hub_cache(cache, BASE_ID, tiny.base)
    add_to_hub_cache(cache, ADAPTER_ID, tiny.adapter)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def pointed_at(hub: dict) -> Iterator[dict]:
    """`hub`'s environment for runs in this process: huggingface_hub read HF_HUB_CACHE and HF_HUB_OFFLINE when it was
    imported, so its constants are set instead, for the duration."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", hub["HF_HUB_CACHE"])
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield hub


@pytest.fixture
def in_hub(hub):
    with pointed_at(hub):
        yield hub


@pytest.fixture(scope="module")
def merged_from_folders(tiny, hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("from_folders") / "merged"
    args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", out, "--precision", "fp32"]
    with pointed_at(hub):
        result = run_main("merge_lora.py", *args)
    assert result.returncode == 0, result.stderr
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("adapter_from_hub", [False, True], ids=["base-id", "base-and-adapter-ids"])
def test_merge_from_hub_ids_equals_merge_from_folders(tiny, in_hub, merged_from_folders, tmp_path, adapter_from_hub):
    out = tmp_path / "merged"
    adapter = ADAPTER_ID if adapter_from_hub else tiny.adapter
    args = ["--base_model", BASE_ID, "--lora_path", adapter, "--output_dir", out, "--precision", "fp32"]
    # Both ids: `python merge_lora.py` with the cache in its environment; the base id alone: merge's main in-process.
    result = run_script("merge_lora.py", *args, env=in_hub) if adapter_from_hub else run_main("merge_lora.py", *args)
    assert result.returncode == 0, result.stderr
    ours, reference = folder_bytes(out), folder_bytes(merged_from_folders)
    assert any(name.endswith(".safetensors") for name in reference)
    assert ours.keys() == reference.keys()
    for name, content in reference.items():
        assert ours[name] == content, name


@pytest.mark.parametrize("flag", ["--base_model", "--lora_path"])
def test_hub_id_not_in_the_cache_is_one_line_exit_2(tiny, in_hub, tmp_path, flag):
    sources = {"--base_model": tiny.base, "--lora_path": tiny.adapter, flag: "testorg/missing"}
    result = run_main("merge_lora.py", *(x for item in sources.items() for x in item), "--output_dir", tmp_path / "out")
    assert_user_error(result, "testorg/missing", "not in the Hugging Face cache", "offline")
    assert not (tmp_path / "out").exists()


def test_local_path_that_does_not_exist_is_one_line_exit_2(tiny, in_hub, tmp_path):
    missing = "./no/such/folder/"
    assert not Path(missing).exists() and not (REPO / missing).exists()  # the script runs from the repo root
    args = ["--base_model", missing, "--lora_path", tiny.adapter, "--output_dir", tmp_path / "out"]
    result = run_main("merge_lora.py", *args)
    assert_user_error(result, missing, "no such file or folder")
    assert not (tmp_path / "out").exists()


def test_existing_local_folder_or_file_is_returned_unchanged(tiny):
    assert resolve_model(str(tiny.base)) == tiny.base
    assert resolve_adapter(str(tiny.adapter)) == tiny.adapter
    config = tiny.base / "config.json"
    assert resolve_model(str(config)) == config


def test_relative_local_folder_is_returned_as_given(tiny, monkeypatch):
    monkeypatch.chdir(tiny.base.parent)
    assert resolve_model(tiny.base.name) == Path(tiny.base.name)
    assert resolve_model(f"./{tiny.base.name}/") == Path(tiny.base.name)


@pytest.mark.parametrize(
    "missing", ["./no/such/folder/", "/no/such/folder", "no/such/folder", "weights.safetensors", "org/config.json"]
)
def test_missing_path_that_cannot_be_a_hub_id_is_refused_without_a_lookup(missing):
    if os.path.exists(missing):
        pytest.skip(f"{missing} exists here")
    with pytest.raises(UserError) as error:
        resolve_model(missing, "base model")
    assert str(error.value) == f"base model {missing}: no such file or folder"


def test_the_one_step_export_names_a_hub_id_base_as_the_user_did(in_hub, merged_from_folders, tmp_path):
    """analyze --finetuned_model records the models as extract does, as named: the exported adapter's config points
    at the hub id, not at the cache's snapshot folder it was read from."""
    out = tmp_path / "analysis"
    args = ["--base_model", BASE_ID, "--finetuned_model", merged_from_folders, "--output_dir", out, "--device", "cpu"]
    result = run_main("analyze_lora_vs_task_vector_math.py", *args, "--export_lora", 8, "--skip_plots")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "exported_lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID
