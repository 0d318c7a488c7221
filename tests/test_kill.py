"""A run cut short leaves nothing unfinished at the final path: SIGKILL at random points, SIGTERM cleaning up.

The scripts run as subprocesses (fresh interpreters: `conftest.FreshPythons`, started ahead with torch imported)
under an audit hook (`sys.addaudithook`) that numbers their filesystem operations on the output (mkdir, open,
rename, replace, remove …). A seed picks one; the child announces it on stdout just before performing it, and the
test sends the real signal there (or a few milliseconds later, to land mid-write). Nothing in the scripts is
replaced or mocked. While paused the child sleeps in steps of 10 ms (up to 60 s), so that a signal whose Python
handler runs in the main thread after it arrived in another thread acts at once, not after one long sleep. The
run after a kill, which only reads what the kill left, runs merge's main in this process.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_main

HOOK = r"""
import os, runpy, sys, time
script, area, stop_at, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
EVENTS = {"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"}
count = 0

def hook(event, args):
    global count
    if event in EVENTS and args and str(args[0]).startswith(area):
        count += 1
        line = f"{count} {event} {os.path.basename(str(args[0]))}"
        if mode == "list":
            os.write(1, f"\nOPERATION {line}\n".encode())
        if count == stop_at:
            os.write(1, f"\nREACHED {line}\n".encode())
            if mode == "pause":  # up to 60 s, in short sleeps: a signal's Python handler runs within 10 ms of it
                for _ in range(6000):
                    time.sleep(0.01)

sys.addaudithook(hook)
sys.argv = [script, *sys.argv[5:]]
runpy.run_path(script, run_name="__main__")
"""


# The processes this module asks `fresh_python` for: 2 complete runs, 5 + 1 killed, 3 signalled.
FRESH_PYTHONS = 11


def start(pythons, script: str, args: list, area: Path, stop_at: int, mode: str) -> subprocess.Popen:
    """The script under the hook, in a fresh interpreter of its own (`python -c HOOK …`), announcing its `stop_at`-th
    operation under `area` ("pause": and waiting there; "list": announcing every operation)."""
    return pythons.popen(HOOK, REPO / script, area, stop_at, mode, *args)


def wait_for(process: subprocess.Popen, prefix: str) -> str | None:
    """Read the child's stdout up to the line starting with `prefix` (None: it ended without one)."""
    for line in process.stdout:
        if line.startswith(prefix):
            return line.strip()
    return None


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


SCRIPTS = {
    "merge": ("merge_lora.py", lambda tiny, p: ["--base_model", tiny.base, "--lora_path", tiny.adapter]),
    "extract": (
        "extract_task_vectors.py",
        lambda tiny, p: ["--base_model", tiny.base, "--finetuned_model", p("fp32").merged],
    ),
}


def old_output(which: str, pipeline, out: Path) -> dict[str, bytes]:
    """An earlier output (of the fp16 pipeline) at `out`, for --overwrite to replace."""
    shutil.copytree(pipeline("fp16").merged if which == "merge" else pipeline("fp16").task_vectors, out)
    return folder_bytes(out)


def arguments(which: str, tiny, pipeline, out: Path, *extra: str) -> list:
    return [*SCRIPTS[which][1](tiny, pipeline), "--output_dir", out, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def complete(tiny, pipeline, fresh_python, tmp_path_factory):
    """Per script, an uninterrupted --overwrite run under the hook: its output and its list of operations."""
    processes = {}
    for which, (script, _) in SCRIPTS.items():  # both at once
        area = tmp_path_factory.mktemp(f"complete_{which}")
        out = area / "out"
        old_output(which, pipeline, out)
        args = arguments(which, tiny, pipeline, out, "--overwrite")
        processes[which] = (start(fresh_python, script, args, area, 0, "list"), out)
    runs = {}
    for which, (process, out) in processes.items():
        code, stdout, stderr = finish(process)
        assert code == 0, stderr
        operations = [line.split()[2:] for line in stdout.splitlines() if line.startswith("OPERATION ")]
        assert ["os.rename", "out"] in operations, operations  # the old output renamed aside
        runs[which] = (folder_bytes(out), operations)
    return runs


def commit_index(operations: list[list[str]]) -> int:
    """The number of the first operation of the swap (the old output renamed aside)."""
    return operations.index(["os.rename", "out"]) + 1


@pytest.mark.parametrize(("which", "seed"), [("merge", 0), ("merge", 1), ("merge", 2), ("extract", 3), ("extract", 4)])
def test_sigkill_at_a_random_point_leaves_the_old_or_the_new_output(
    tiny, pipeline, complete, fresh_python, tmp_path, which, seed
):
    rng = random.Random(seed)
    expected, operations = complete[which]
    out = tmp_path / "out"
    old = old_output(which, pipeline, out)
    stop_at = rng.randint(1, len(operations))
    delay = rng.choice([None, rng.uniform(0, 0.02)])  # None: while paused just before that operation
    process = start(
        fresh_python,
        SCRIPTS[which][0],
        arguments(which, tiny, pipeline, out, "--overwrite"),
        tmp_path,
        stop_at,
        "pause" if delay is None else "go",
    )
    reached = wait_for(process, "REACHED")
    assert reached, f"operation {stop_at} of {len(operations)} never came"
    if delay is not None:
        time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    code, _, _ = finish(process)

    where = f"killed at {reached} (+{delay} s)"
    assert code in (-signal.SIGKILL, 0), where
    if out.exists():  # absent only between the two renames of the swap
        assert folder_bytes(out) in (expected, old), where
    assert all(".partial-" in name or ".replaced-" in name for name in leftovers(out)), where


def test_a_run_after_a_kill_names_what_the_kill_left(tiny, pipeline, complete, fresh_python, tmp_path):
    out = tmp_path / "out"
    args = arguments("merge", tiny, pipeline, out)
    process = start(fresh_python, "merge_lora.py", args, tmp_path, 3, "pause")  # parent mkdir, staging, first file
    assert wait_for(process, "REACHED 3 open")
    process.send_signal(signal.SIGKILL)
    finish(process)
    left = leftovers(out)
    assert not out.exists() and len(left) == 1 and left[0].startswith(".out.partial-")

    result = run_main("merge_lora.py", *args)
    assert result.returncode == 0, result.stderr
    assert f"an interrupted run left {tmp_path / left[0]}" in result.stdout
    assert folder_bytes(out) == complete["merge"][0]


INTERRUPTED = {
    signal.SIGTERM: "interrupted by SIGTERM: any unfinished output was removed",
    signal.SIGHUP: "interrupted by SIGHUP: any unfinished output was removed",
    signal.SIGINT: "interrupted: any unfinished output was removed",  # Ctrl-C
}


@pytest.mark.parametrize(
    ("which", "seed", "signum"),
    [("merge", 5, signal.SIGTERM), ("extract", 6, signal.SIGINT), ("extract", 7, signal.SIGHUP)],
    ids=["merge-SIGTERM", "extract-SIGINT", "extract-SIGHUP"],
)
def test_sigterm_ctrl_c_or_sighup_removes_the_unfinished_output(
    tiny, pipeline, complete, fresh_python, tmp_path, which, seed, signum
):
    out = tmp_path / "out"
    operations = complete[which][1]
    # Once the staging folder exists, up to the swap (during it, SIGTERM waits until the new output is in place).
    stop_at = random.Random(seed).randint(3, commit_index(operations) - 1)
    process = start(fresh_python, SCRIPTS[which][0], arguments(which, tiny, pipeline, out), tmp_path, stop_at, "pause")
    reached = wait_for(process, "REACHED")
    assert reached and list(tmp_path.glob(".out.partial-*")), reached
    process.send_signal(signum)
    code, _, stderr = finish(process)

    assert code == 128 + signum, (reached, stderr)
    assert stderr.strip().splitlines() == [INTERRUPTED[signum]], reached
    assert not out.exists() and leftovers(out) == [], reached
