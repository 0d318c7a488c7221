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

from common.errors import UserError
from common.io.outputs import MARKER


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
    assert run_main("merge_lora.py", *merge_args(tiny, out)).returncode == 0
    (out / "keep.txt").write_text("added to an output of ours")
    assert_user_error(run_main("merge_lora.py", *merge_args(tiny, out)), "--overwrite")
    assert (out / "keep.txt").is_file()
    assert run_main("merge_lora.py", *merge_args(tiny, out, "--overwrite")).returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_overwrite_never_replaces_a_folder_the_toolkit_did_not_write(tiny, tmp_path):
    """--overwrite replaces only outputs of this toolkit (they hold its marker file), not a user's own folder."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_main("merge_lora.py", *merge_args(tiny, out, "--overwrite"))
    assert_user_error(result, "holds files this toolkit did not write", "choose another folder")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_empty_output_path_is_refused(tiny, tmp_path, monkeypatch):
    """`--output_dir "$UNSET"` is the working folder: refused, on the command line and in YAML, and the working
    folder keeps its files even with --overwrite."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    result = run_main("merge_lora.py", "--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", "")
    assert_user_error(result, "--output_dir", "empty path")
    config = tmp_path / "c.yml"
    for line in ('output_dir: ""', "output_dir:"):
        config.write_text(f"base_model: {tiny.base}\nlora_path: {tiny.adapter}\n{line}\noverwrite: true\n")
        result = run_main("merge_lora.py", "--config", config)
        assert result.returncode == 2 and "output_dir" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml", "keep.txt"]


def test_overwrite_never_deletes_the_files_behind_symlinked_inputs(tiny, tmp_path):
    """A hub cache snapshot's shards are links into blobs/: an output there would delete the real weights."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for item in tiny.base.iterdir():
        (blobs / item.name).write_bytes(item.read_bytes())
        (snapshot / item.name).symlink_to(blobs / item.name)
    (blobs / MARKER).write_text("a marker does not make an input an output")
    before = checksums(blobs)
    args = ["--base_model", snapshot, "--lora_path", tiny.adapter, "--output_dir", blobs, "--overwrite"]
    assert_user_error(run_main("merge_lora.py", *args), "overlaps the input")
    assert checksums(blobs) == before


def test_a_run_whose_output_appeared_meanwhile_does_not_replace_it(tiny, tmp_path):
    """Publication is exclusive: without --overwrite an output that appeared during the run is never replaced; with
    it, the later run replaces it and says so."""
    from common.io.outputs import staged_output_dir

    out = tmp_path / "out"
    with pytest.raises(UserError, match="another run .* put something there while this one ran"):
        with staged_output_dir(out) as staging:
            (staging / "ours.txt").write_text("later run")
            assert run_main("merge_lora.py", *merge_args(tiny, out)).returncode == 0  # the other run publishes first
    assert (out / "model.safetensors").is_file() and not (out / "ours.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    with staged_output_dir(out, overwrite=True) as staging:
        (staging / "ours.txt").write_text("later run")
        assert run_main("merge_lora.py", *merge_args(tiny, out, "--overwrite")).returncode == 0
    assert (out / "ours.txt").is_file() and not (out / "model.safetensors").exists()


def test_a_replaced_output_that_cannot_be_removed_is_named_and_the_new_one_is_complete(tmp_path, caplog, monkeypatch):
    """A file of the old output the user may not delete (EACCES: simulated, since the tests may run as root)."""
    import common.io.outputs

    out, staging = tmp_path / "out", tmp_path / ".out.partial-x"
    for folder, name in ((out, "old.txt"), (staging, "new.txt")):
        folder.mkdir()
        (folder / name).write_text(name)
    replaced = tmp_path / ".out.replaced-x"

    def refused(path):
        raise PermissionError(13, "Permission denied", str(replaced / "old.txt"))

    monkeypatch.setattr(common.io.outputs.shutil, "rmtree", refused)
    with caplog.at_level("WARNING", logger="lora_tv"):
        common.io.outputs.move_into_place(staging, out)
    assert (out / "new.txt").read_text() == "new.txt" and (replaced / "old.txt").is_file()
    assert f"{out} is complete" in caplog.text and f"moved to {replaced}" in caplog.text
    assert f"{replaced / 'old.txt'}: Permission denied" in caplog.text


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("tolerance: -1", "--tolerance"),
        ("tolerance: .nan", "--tolerance"),
        ("base_model:", "base_model is empty"),
    ],
)
def test_compare_config_values_are_validated_as_flags_are(tiny, tmp_path, line, fragment):
    config = tmp_path / "c.yml"
    config.write_text(f"lora_path: {tiny.adapter}\ntask_vector_path: {tmp_path / 'tv'}\n{line}\n")
    result = run_main("compare_lora_task_vector.py", "--config", config, "--output_dir", tmp_path / "o")
    assert_user_error(result, fragment)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_invalid_tolerance_flag_is_refused(tiny, tmp_path, value):
    args = ["--lora_path", tiny.adapter, "--task_vector_path", tmp_path / "tv", "--tolerance", value]
    assert_user_error(run_main("compare_lora_task_vector.py", *args), "--tolerance", "finite number >= 0")


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("export_lora: -5", "--export_lora"),
        ("max_rank: -4", "--max_rank"),
        ("export_lora_energy: 2.0", "--export_lora_energy"),
        ("export_lora_energy: -0.5", "--export_lora_energy"),
        ("intruder_epsilon: 7", "--intruder_epsilon"),
        ("intruder_k: -3", "--intruder_k"),
        ("export_lora: 0", "--export_lora"),
        ("intruder_k:", "intruder_k is empty"),
    ],
)
def test_analyze_config_values_are_validated_as_flags_are(tmp_path, line, fragment):
    config = tmp_path / "c.yml"
    config.write_text(f"task_vector_file: {tmp_path / 'tv.safetensors'}\n{line}\n")
    result = run_main("analyze_lora_vs_task_vector_math.py", "--config", config, "--output_dir", tmp_path / "o")
    assert_user_error(result, fragment)


def test_negative_intruder_k_flag_is_refused(tmp_path):
    args = ["--task_vector_file", tmp_path / "tv.safetensors", "--intruder_k", "-3"]
    assert_user_error(run_main("analyze_lora_vs_task_vector_math.py", *args), "--intruder_k", "integer >= 0")


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


def test_analyze_export_never_writes_over_the_base_tau_records(tiny, tmp_path, pipeline):
    """The export reads the base τ's header records: that folder is an input, so it can never be the output."""
    before = checksums(tiny.base)
    args = ["--task_vector_file", pipeline("fp32").task_vector_file, "--export_lora", "4", "--skip_plots"]
    result = run_main("analyze_lora_vs_task_vector_math.py", *args, "--output_dir", tiny.base, "--overwrite")
    assert_user_error(result, "overlaps the input", str(tiny.base))
    assert checksums(tiny.base) == before


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_config_file_not_in_utf8_is_one_line(tiny, tmp_path, encoding):
    config = tmp_path / "c.yml"
    config.write_bytes(f"base_model: {tiny.base}\nfinetuned_model: café\n".encode(encoding))
    result = run_main("extract_task_vectors.py", "--config", config, "--output_dir", tmp_path / "o")
    assert_user_error(result, f"--config {config}: not UTF-8 text", "save it as UTF-8")


def test_a_number_where_a_regex_goes_is_read_as_the_flag_reads_it(tmp_path, pipeline):
    """`export_include: 5` in YAML is the regex "5", as `--export_include 5` is: nothing matches, one line."""
    config = tmp_path / "c.yml"
    config.write_text(f"task_vector_file: {pipeline('fp32').task_vector_file}\nexport_lora: 4\nexport_include: 5\n")
    result = run_main("analyze_lora_vs_task_vector_math.py", "--config", config, "--output_dir", tmp_path / "o")
    assert_user_error(result, "--export_lora: no tensor to export")
