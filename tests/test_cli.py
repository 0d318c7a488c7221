"""What every script does at its boundary: devices, usage errors, output folders, inputs left untouched.

The scripts' mains run in this process (`run_main`, which keeps the exit-code and one-line-on-stderr contract of
`common.cli.run`); `--help` runs each script itself, as `python script.py --help`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_user_error, run_main


def merge_args(tiny, out, *extra):
    return ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", out, *extra]


@pytest.fixture(scope="module", autouse=True)
def help_runs(request):
    """`python script.py --help` for each of the four scripts, processes of their own, started with this module's first
    test so that they run beside the tests before test_help_works_for_every_script (when it is selected)."""
    if not any(
        item.module is request.module and item.name == "test_help_works_for_every_script"
        for item in request.session.items
    ):
        yield {}
        return
    scripts = (
        "merge_lora.py",
        "extract_task_vectors.py",
        "compare_lora_task_vector.py",
        "analyze_lora_vs_task_vector_math.py",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    processes = {
        script: subprocess.Popen(
            [sys.executable, str(REPO / script), "--help"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in scripts
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_user_error(tiny, tmp_path):
    result = run_main("merge_lora.py", *merge_args(tiny, tmp_path / "out", "--device", "cuda:0"))
    assert_user_error(result, "--device cuda:0", "CUDA is not available")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["gpu7", "mps"])
def test_unknown_device_is_a_user_error(tiny, tmp_path, device):
    assert_user_error(run_main("merge_lora.py", *merge_args(tiny, tmp_path / "out", "--device", device)), device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_default_device_falls_back_to_cpu_in_one_line(tiny, tmp_path):
    result = run_main("merge_lora.py", *merge_args(tiny, tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("CUDA is not available, computing on cpu") == 1


def test_unknown_precision_is_one_line(tiny, tmp_path):
    assert_user_error(run_main("merge_lora.py", *merge_args(tiny, tmp_path / "o", "--precision", "fp8")), "fp8")


def test_missing_required_flag_is_one_line():
    assert_user_error(run_main("compare_lora_task_vector.py"), "--lora_path")


@pytest.mark.parametrize(
    ("make_path", "fragment"),
    [
        (lambda tiny, tmp: tmp / "no" / "such" / "folder/", "no such file or folder"),
        (lambda tiny, tmp: tiny.base, "no adapter_config.json"),
    ],
    ids=["missing", "not_an_adapter"],
)
def test_bad_adapter_path_is_one_line(tiny, tmp_path, make_path, fragment):
    args = ["--base_model", tiny.base, "--lora_path", make_path(tiny, tmp_path), "--output_dir", tmp_path / "o"]
    assert_user_error(run_main("merge_lora.py", *args), fragment)


def test_output_inside_an_input_is_refused(tiny):
    result = run_main("merge_lora.py", *merge_args(tiny, tiny.base / "merged"))
    assert_user_error(result, "overlaps the input")
    assert not (tiny.base / "merged").exists()


def test_existing_output_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_main("merge_lora.py", *merge_args(tiny, out)), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_main("merge_lora.py", *merge_args(tiny, out, "--overwrite")).returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def checksums(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_pipeline_never_modifies_its_inputs(tiny, tmp_path):
    before = checksums(tiny.root)
    merged, tvs, cmp = tmp_path / "merged", tmp_path / "tv", tmp_path / "cmp"
    assert run_main("merge_lora.py", *merge_args(tiny, merged, "--precision", "fp16")).returncode == 0
    args = ["--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", tvs]
    assert run_main("extract_task_vectors.py", *args).returncode == 0
    tv_file = tvs / "task_vector.safetensors"
    args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--task_vector_path", tv_file, "--output_dir", cmp]
    assert run_main("compare_lora_task_vector.py", *args).returncode == 1
    args = [
        "--lora_file",
        cmp / "lora_deltas.safetensors",
        "--task_vector_file",
        tv_file,
        "--output_dir",
        tmp_path / "a",
    ]
    assert run_main("analyze_lora_vs_task_vector_math.py", *args).returncode == 0
    assert checksums(tiny.root) == before


def test_help_works_for_every_script(help_runs):
    assert len(help_runs) == 4
    for script, process in help_runs.items():
        stdout, _ = process.communicate(timeout=300)
        assert process.returncode == 0 and "--device" in stdout, script
