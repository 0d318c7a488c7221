"""Hostile inputs, each given to a real script (docs/hostile_inputs.md lists them).

Every case must end in exactly one line on stderr naming the file and the problem, exit code 2, no
traceback, nothing at the output path (no temporary folder either), and every input file byte for byte
as it was. Each test checks one case.

Most cases run the script's main in this process, through `common.cli.run` as its `__main__` does
(`conftest.run_in_process`): the same exit code, stdout and stderr, without a fresh interpreter's imports.
The disk-full and file-size-limit cases (a small filesystem, a size limit: `wrap`) run `python script.py`
in a subprocess, a fresh interpreter with its own environment; so do merge's NaN-in-the-base case and
compare's and analyze's hub ids (`process=True`; HF_HUB_CACHE and HF_HUB_OFFLINE in the environment are
read when huggingface_hub is imported), so that every script's real `__main__` runs even where the small
filesystem cannot be made. The subprocesses run concurrently, beside the in-process cases (for which
huggingface_hub's cache and offline settings are set as the subprocesses' environment sets them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_main
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MERGE, EXTRACT = "merge_lora.py", "extract_task_vectors.py"
COMPARE, ANALYZE = "compare_lora_task_vector.py", "analyze_lora_vs_task_vector_math.py"


@dataclass
class Inputs:
    """Clean inputs from the tiny pipeline (fp32), and the folder each case builds its hostile copy in."""

    base: Path
    adapter: Path
    merged: Path
    task_vectors: Path
    lora_deltas: Path
    folder: Path

    @property
    def task_vector_file(self) -> Path:
        return self.task_vectors / "task_vector.safetensors"

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def copy(self, source: Path, name: str | None = None) -> Path:
        target = self.folder / (name or source.name)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        return target

    def adapter_copy(self) -> Path:
        """The adapter's two files, without the Trainer's other files."""
        target = self.folder / "adapter"
        target.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(self.adapter / name, target / name)
        return target


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    build: Callable[[Inputs], list]  # makes the hostile input in `inputs.folder`; returns the arguments
    says: Callable[[Inputs], tuple[str, ...]]  # fragments of the one stderr line (stdout when it succeeds)
    succeeds: bool = False  # warned about, not refused
    wrap: Callable[[list[str], Inputs], list[str]] | None = None  # e.g. run it on a small filesystem
    env: dict = field(default_factory=dict)
    process: bool = False  # `python script.py` in a subprocess (always with wrap or env), else its main in-process

    @property
    def in_subprocess(self) -> bool:
        return self.process or self.wrap is not None or bool(self.env)


# --- hostile files -------------------------------------------------------------------------------------


def corrupt(path: Path, how: str) -> Path:
    """Damage a real safetensors file in one way, keeping everything else as it was."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second, last = names[0], names[1], names[-1]
    if how == "truncated":
        path.write_bytes(raw[:-4])
        return path
    if how == "header-length-past-end":
        path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
        return path
    text = None
    if how == "invalid-header-json":
        text = raw[8 : 8 + length].replace(b":", b"=", 1)
    elif how == "offsets-out-of-range":
        header[last]["data_offsets"] = [offset + 4096 for offset in header[last]["data_offsets"]]
    elif how == "overlapping-offsets":
        header[second]["data_offsets"] = [offset - 4 for offset in header[second]["data_offsets"]]
    elif how == "unknown-dtype":
        header[first]["dtype"] = "F7"
    elif how == "forged-huge-shape":
        header[first]["shape"] = [2**40, 2**40]
    text = text or json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


CORRUPTION = {
    "truncated": "truncated safetensors file",
    "header-length-past-end": "past end of file",
    "invalid-header-json": "corrupt safetensors header",
    "offsets-out-of-range": "data_offsets out of range",
    "overlapping-offsets": "overlaps the tensor before it",
    "unknown-dtype": "unknown dtype 'F7'",
    "forged-huge-shape": "of shape [1099511627776, 1099511627776] needs 4835703278458516698824704 bytes",
}


def with_values(path: Path, name_part: str, values: dict[tuple[int, ...], float]) -> Path:
    """Set elements of the first tensor whose name holds `name_part` (safetensors' own writer, metadata kept)."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    name = next(n for n in sorted(tensors) if name_part in n)
    for index, value in values.items():
        tensors[name][index] = value
    save_file(tensors, path, metadata=metadata)
    return path


def written(path: Path, text: str) -> Path:
    """`path` rewritten with `text`; its folder."""
    path.write_text(text)
    return path.parent


def without(path: Path) -> Path:
    """`path` removed; its folder."""
    path.unlink()
    return path.parent


def empty_folder(i: Inputs) -> Path:
    folder = i.folder / "empty"
    folder.mkdir()
    return folder


def shard(folder: Path, i: int = 1) -> Path:
    return sorted(folder.glob("*.safetensors"))[i]


def edit_json(path: Path, **changes) -> Path:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def wrong_adapter(i: Inputs) -> Path:
    """An adapter whose q_proj lora_B has 96 output rows: built for a wider model."""
    adapter = i.adapter_copy()
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(weights) if k.endswith("q_proj.lora_B.weight"))
    weights[key] = torch.zeros(96, weights[key].shape[1])
    save_file(weights, adapter / "adapter_model.safetensors")
    return adapter


def no_weights(i: Inputs, with_bin: bool = False) -> Path:
    folder = i.folder / "model"
    folder.mkdir()
    shutil.copyfile(i.base / "config.json", folder / "config.json")
    if with_bin:
        torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    return folder


def adapter_with_config(i: Inputs, **changes) -> Path:
    return edit_json(i.adapter_copy() / "adapter_config.json", **changes).parent


def integer_weights(i: Inputs) -> Path:
    """The base with an adapted weight stored as int8 and another as bool (safetensors' own writer)."""
    base = i.copy(i.base, "int_base")
    for path in base.glob("*.safetensors"):
        tensors = load_file(path)
        for name in [n for n in tensors if n.startswith("model.layers.0.self_attn.") and n.endswith("proj.weight")]:
            tensors[name] = (tensors[name] * 1000).to(torch.int8) if "q_proj" in name else tensors[name] > 0
        save_file(tensors, path, metadata={"format": "pt"})
    return base


def merge(i: Inputs, base: Path | None = None, adapter: Path | None = None) -> list:
    return ["--base_model", base or i.base, "--lora_path", adapter or i.adapter, "--output_dir", i.out]


def extract(i: Inputs, base: Path | str | None = None, finetuned: Path | str | None = None) -> list:
    return ["--base_model", base or i.base, "--finetuned_model", finetuned or i.merged, "--output_dir", i.out]


def compare(i: Inputs, adapter: Path | str | None = None, tv: Path | None = None, base: Path | None = None) -> list:
    args = ["--lora_path", adapter or i.adapter, "--task_vector_path", tv or i.task_vector_file, "--output_dir", i.out]
    return args + (["--base_model", base] if base else [])


def analyze(i: Inputs, lora_file: Path | None = None, tv: Path | None = None, lora_path: Path | str | None = None):
    source = ["--lora_path", lora_path] if lora_path else ["--lora_file", lora_file or i.lora_deltas]
    return [*source, "--task_vector_file", tv or i.task_vector_file, "--output_dir", i.out]


# --- disks that fill up ------------------------------------------------------------------------------------


def on_small_filesystem(command: list[str], i: Inputs) -> list[str]:
    """Run in a mount namespace with a 200 kB tmpfs at i.folder/disk (a real ENOSPC); list what is left on it."""
    script = 'mount -t tmpfs -o size=200k tmpfs "$0" && "$@"; code=$?; echo "LEFT:$(ls -A "$0")"; exit $code'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(i.folder / "disk"), *command]


def with_file_size_limit(command: list[str], i: Inputs) -> list[str]:
    """RLIMIT_FSIZE of 100 kB: writing past it fails with EFBIG (Python ignores SIGXFSZ)."""
    return ["sh", "-c", 'ulimit -f 200 && exec "$@"', "sh", *command]


def namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"]
    return subprocess.run(command, capture_output=True).returncode == 0


def on_disk(i: Inputs) -> Path:
    (i.folder / "disk").mkdir()
    return i.folder / "disk" / "out"


# --- the table ---------------------------------------------------------------------------------------------

CUDA = "CUDA is not available"
CASES = [
    # paths
    Case(
        "missing-finetuned",
        EXTRACT,
        lambda i: extract(i, finetuned=i.folder / "nope"),
        lambda i: (str(i.folder / "nope"), "no such file or folder"),
    ),
    Case(
        "missing-lora-file",
        ANALYZE,
        lambda i: analyze(i, lora_file=i.folder / "nope.safetensors"),
        lambda i: (str(i.folder / "nope.safetensors"), "no such file or folder"),
    ),
    Case(
        "no-weights-base",
        MERGE,
        lambda i: merge(i, base=no_weights(i)),
        lambda i: (str(i.folder / "model"), "no weights"),
    ),
    Case(
        "bin-only-finetuned",
        EXTRACT,
        lambda i: extract(i, finetuned=no_weights(i, with_bin=True)),
        lambda i: (str(i.folder / "model"), "only .bin weights"),
    ),
    Case(
        "empty-task-vector-folder",
        COMPARE,
        lambda i: compare(i, tv=empty_folder(i)),
        lambda i: (str(i.folder / "empty"), "no weights"),
    ),
    Case(
        "hub-id-offline",
        EXTRACT,
        lambda i: extract(i, base="testorg/missing"),
        lambda i: ("base model testorg/missing", "not in the Hugging Face cache while offline"),
    ),
    Case(
        "hub-id-offline",
        COMPARE,
        lambda i: compare(i, adapter="testorg/missing"),
        lambda i: ("adapter testorg/missing", "offline"),
        process=True,
    ),
    Case(
        "hub-id-offline",
        ANALYZE,
        lambda i: analyze(i, lora_path="testorg/missing"),
        lambda i: ("adapter testorg/missing", "offline"),
        process=True,
    ),
    # adapters and configs
    Case(
        "no-adapter-config",
        COMPARE,
        lambda i: compare(i, adapter=without(i.adapter_copy() / "adapter_config.json")),
        lambda i: (str(i.folder / "adapter"), "no adapter_config.json"),
    ),
    Case(
        "invalid-adapter-config-json",
        MERGE,
        lambda i: merge(i, adapter=written(i.adapter_copy() / "adapter_config.json", "{")),
        lambda i: ("adapter_config.json", "invalid JSON"),
    ),
    Case(
        "invalid-config-json",
        EXTRACT,
        lambda i: extract(i, finetuned=written(i.copy(i.merged) / "config.json", '{"a": 1,}')),
        lambda i: ("merged_fp32/config.json", "invalid JSON"),
    ),
    Case(
        "unsupported-peft-type",
        COMPARE,
        lambda i: compare(i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", peft_type="IA3").parent),
        lambda i: ("adapter_config.json", "peft_type IA3 is not supported"),
    ),
    Case(
        "unsupported-lora-variant",
        MERGE,
        lambda i: merge(i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", use_qalora=True).parent),
        lambda i: ("adapter_config.json", "use_qalora is set: a LoRA variant this toolkit does not support"),
    ),
    Case(
        "unsupported-lora-variant",
        COMPARE,
        lambda i: compare(i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", use_bdlora=True).parent),
        lambda i: ("adapter_config.json", "use_bdlora is set: a LoRA variant this toolkit does not support"),
    ),
    Case(
        "target-parameters-without-base",
        COMPARE,
        lambda i: compare(
            i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", target_parameters=["mlp.w"]).parent
        ),
        lambda i: ("uses target_parameters", "pass --base_model"),
    ),
    Case(
        "unsupported-peft-type",
        ANALYZE,
        lambda i: analyze(i, lora_path=edit_json(i.adapter_copy() / "adapter_config.json", peft_type="LOHA").parent),
        lambda i: ("adapter_config.json", "peft_type LOHA is not supported"),
    ),
    Case(
        "lora-alpha-a-string",
        MERGE,
        lambda i: merge(i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", lora_alpha="16").parent),
        lambda i: ("adapter_config.json", "lora_alpha must be a finite number, not '16'"),
    ),
    Case(
        "rank-pattern-bad-regex",
        COMPARE,
        lambda i: compare(
            i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", rank_pattern={"q_proj(": 8}).parent
        ),
        lambda i: ("adapter_config.json", "rank_pattern must be"),
    ),
    Case(
        "adapter-of-another-model",
        COMPARE,
        lambda i: compare(i, adapter=wrong_adapter(i)),
        lambda i: ("task_vector.safetensors", "built for another model?", "q_proj.weight [64, 64] vs Δ [96, 64]"),
    ),
    Case(
        "adapter-of-another-model-with-base",
        COMPARE,
        lambda i: compare(i, adapter=wrong_adapter(i), base=i.base),
        lambda i: ("does not fit base model", "q_proj.weight [64, 64] vs [96, 64]"),
    ),
    # corrupt safetensors, one kind in each place a script reads one
    Case(
        "truncated",
        MERGE,
        lambda i: merge(i, base=corrupt(shard(i.copy(i.base)), "truncated").parent),
        lambda i: (str(shard(i.folder / "base_model")), CORRUPTION["truncated"]),
    ),
    Case(
        "header-length-past-end",
        MERGE,
        lambda i: merge(
            i, adapter=corrupt(i.adapter_copy() / "adapter_model.safetensors", "header-length-past-end").parent
        ),
        lambda i: ("adapter/adapter_model.safetensors", CORRUPTION["header-length-past-end"]),
    ),
    Case(
        "invalid-header-json",
        EXTRACT,
        lambda i: extract(i, base=corrupt(shard(i.copy(i.base), 2), "invalid-header-json").parent),
        lambda i: (str(shard(i.folder / "base_model", 2)), CORRUPTION["invalid-header-json"]),
    ),
    Case(
        "offsets-out-of-range",
        EXTRACT,
        lambda i: extract(i, finetuned=corrupt(shard(i.copy(i.merged), 0), "offsets-out-of-range").parent),
        lambda i: ("merged_fp32/model.safetensors", CORRUPTION["offsets-out-of-range"]),
    ),
    Case(
        "overlapping-offsets",
        COMPARE,
        lambda i: compare(
            i, adapter=corrupt(i.adapter_copy() / "adapter_model.safetensors", "overlapping-offsets").parent
        ),
        lambda i: ("adapter/adapter_model.safetensors", CORRUPTION["overlapping-offsets"]),
    ),
    Case(
        "unknown-dtype",
        COMPARE,
        lambda i: compare(i, tv=corrupt(i.copy(i.task_vector_file), "unknown-dtype")),
        lambda i: (str(i.folder / "task_vector.safetensors"), CORRUPTION["unknown-dtype"]),
    ),
    Case(
        "forged-huge-shape",
        COMPARE,
        lambda i: compare(i, base=corrupt(shard(i.copy(i.base), 3), "forged-huge-shape").parent),
        lambda i: (str(shard(i.folder / "base_model", 3)), CORRUPTION["forged-huge-shape"]),
    ),
    Case(
        "truncated",
        ANALYZE,
        lambda i: analyze(i, lora_file=corrupt(i.copy(i.lora_deltas), "truncated")),
        lambda i: ("lora_deltas.safetensors", CORRUPTION["truncated"]),
    ),
    Case(
        "invalid-header-json",
        ANALYZE,
        lambda i: analyze(i, tv=corrupt(i.copy(i.task_vector_file), "invalid-header-json")),
        lambda i: (str(i.folder / "task_vector.safetensors"), CORRUPTION["invalid-header-json"]),
    ),
    # NaN and Inf
    Case(
        "nan-inf-in-base",
        MERGE,
        lambda i: merge(
            i,
            base=with_values(
                shard(i.copy(i.base), 0),
                "embed_tokens",
                {(0, 0): float("nan"), (0, 1): float("nan"), (1, 0): float("inf")},
            ).parent,
        ),
        lambda i: (
            "non-finite values in 1 tensors",
            "the base tensor holds 2 NaN and 1 Inf values",
            "nothing was written",
        ),
        process=True,
    ),
    Case(
        "nan-in-adapter",
        MERGE,
        lambda i: merge(
            i,
            adapter=with_values(
                i.adapter_copy() / "adapter_model.safetensors", "q_proj.lora_B", {(0, 0): float("nan")}
            ).parent,
        ),
        lambda i: ("q_proj.lora_B.weight holds 1 NaN and 0 Inf values", "nothing was written"),
    ),
    Case(
        "nan-in-adapter",
        COMPARE,
        lambda i: compare(
            i,
            adapter=with_values(
                i.adapter_copy() / "adapter_model.safetensors", "q_proj.lora_B", {(0, 0): float("nan")}
            ).parent,
        ),
        lambda i: (
            "the LoRA delta of model.layers.0.self_attn.q_proj.weight holds 64 NaN",
            "lora_B.weight holds 1 NaN",
        ),
    ),
    Case(
        "nan-in-finetuned",
        EXTRACT,
        lambda i: extract(
            i,
            finetuned=with_values(
                shard(i.copy(i.merged), 0), "q_proj.weight", {(0, 0): float("nan"), (1, 1): float("-inf")}
            ).parent,
        ),
        lambda i: (
            "warning: τ of model.layers.0.self_attn.q_proj.weight is not finite:",
            "the finetuned model holds 1 NaN and 1 Inf values",
        ),
        succeeds=True,
    ),
    Case(
        "nan-in-task-vector",
        COMPARE,
        lambda i: compare(i, tv=with_values(i.copy(i.task_vector_file), "q_proj.weight", {(0, 0): float("nan")})),
        lambda i: (
            str(i.folder / "task_vector.safetensors"),
            "tensor model.layers.0.self_attn.q_proj.weight holds 1 NaN and 0 Inf values",
        ),
    ),
    Case(
        "inf-in-task-vector",
        ANALYZE,
        lambda i: analyze(i, tv=with_values(i.copy(i.task_vector_file), "v_proj.weight", {(2, 3): float("inf")})),
        lambda i: (str(i.folder / "task_vector.safetensors"), "v_proj.weight holds 0 NaN and 1 Inf values"),
    ),
    Case(
        "nan-in-lora-deltas",
        ANALYZE,
        lambda i: analyze(i, lora_file=with_values(i.copy(i.lora_deltas), "k_proj.weight", {(0, 0): float("nan")})),
        lambda i: ("lora_deltas.safetensors", "k_proj.weight holds 1 NaN"),
    ),
    # devices
    Case(
        "cuda-without-cuda", EXTRACT, lambda i: [*extract(i), "--device", "cuda:0"], lambda i: ("--device cuda:0", CUDA)
    ),
    Case("cuda-without-cuda", COMPARE, lambda i: [*compare(i), "--device", "cuda"], lambda i: ("--device cuda", CUDA)),
    Case(
        "cuda-without-cuda", ANALYZE, lambda i: [*analyze(i), "--device", "cuda:0"], lambda i: ("--device cuda:0", CUDA)
    ),
    # outputs
    Case(
        "output-is-an-input",
        EXTRACT,
        lambda i: [*extract(i, finetuned=i.copy(i.merged))[:-1], i.folder / "merged_fp32", "--overwrite"],
        lambda i: (f"--output_dir {i.folder / 'merged_fp32'}: overlaps the input",),
    ),
    Case(
        "output-holds-the-inputs",
        COMPARE,
        lambda i: [*compare(i, adapter=i.adapter_copy(), tv=i.copy(i.task_vector_file))[:-1], i.folder, "--overwrite"],
        lambda i: (f"--output_dir {i.folder}: overlaps the input {i.folder / 'adapter'}",),
    ),
    Case(
        "disk-full",
        MERGE,
        lambda i: [*merge(i)[:-1], on_disk(i)],
        lambda i: (
            "writing",
            "disk/out/model.safetensors",
            "No space left on device",
            "the unfinished output was removed",
        ),
        wrap=on_small_filesystem,
    ),
    Case(
        "file-size-limit",
        EXTRACT,
        lambda i: [*extract(i)[:-1], on_disk(i)],
        lambda i: (
            "writing",
            "disk/out/task_vector.safetensors",
            "File too large",
            "the unfinished output was removed",
        ),
        wrap=with_file_size_limit,
    ),
    Case(
        "peft-engine-disk-full",
        MERGE,
        lambda i: [*merge(i)[:-1], on_disk(i), "--engine", "peft"],
        lambda i: (
            "writing",
            "disk/out/model.safetensors",
            "No space left on device",
            "the unfinished output was removed",
        ),
        wrap=on_small_filesystem,
    ),
    Case(
        "peft-engine-target-modules-match-nothing",
        MERGE,
        lambda i: (
            merge(i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", target_modules=["nope"]).parent)
            + ["--engine", "peft"]
        ),
        lambda i: ('target_modules ["nope"] in adapter_config.json matches none of the', "peft refuses it too"),
    ),
    Case(
        "modules-to-save-without-copy",
        MERGE,
        lambda i: (
            merge(i, adapter=edit_json(i.adapter_copy() / "adapter_config.json", modules_to_save=["lm_head"]).parent)
            + ["--engine", "peft"]
        ),
        lambda i: ("modules_to_save lists lm_head, but the adapter's file holds no copy of lm_head",),
    ),
    Case(
        "int8-and-bool-adapted-weights",
        MERGE,
        lambda i: merge(i, base=integer_weights(i)),
        lambda i: ("q_proj.weight is stored as int8, and the adapter changes it", "only floating-point weights"),
    ),
]
IDS = [f"{case.script.split('_')[0]}-{case.id}" for case in CASES]
assert len(set(IDS)) == len(IDS), "two cases of the same script share an id"
# Each script's `__main__` runs in a subprocess at least once, namespaces or not.
assert {c.script for c in CASES if c.in_subprocess and c.wrap is not on_small_filesystem} == {
    MERGE,
    EXTRACT,
    COMPARE,
    ANALYZE,
}


def checksums(paths: list[Path]) -> dict[Path, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    inputs: Inputs
    before: dict[Path, str]
    after: dict[Path, str]


def prepare(case: Case, inputs: Inputs) -> tuple[list[str], list[Path], dict[Path, str]]:
    """The hostile input built; the arguments, the input files among them and their checksums."""
    inputs.folder.mkdir()
    args = [str(a) for a in case.build(inputs)]
    read = [REPO / a for a in args if (REPO / a).exists() and REPO / a != REPO]  # the scripts run from REPO
    return args, read, checksums(read)


def run_case_in_subprocess(case: Case, inputs: Inputs) -> Outcome:
    args, read, before = prepare(case, inputs)
    command = [sys.executable, str(REPO / case.script), *args]
    command = case.wrap(command, inputs) if case.wrap else command
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(inputs.folder / "hub_cache"), **case.env}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return Outcome(result, inputs, before, checksums(read))


def run_case_in_process(case: Case, inputs: Inputs) -> Outcome:
    """The script's main under `common.cli.run`, here; huggingface_hub pointed at the same (empty) cache and offline,
    as the subprocess's environment points it."""
    from huggingface_hub import constants

    args, read, before = prepare(case, inputs)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(inputs.folder / "hub_cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        result = run_main(case.script, *args)
    return Outcome(result, inputs, before, checksums(read))


@pytest.fixture(scope="module")
def outcomes(request, tiny, pipeline, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected case against its own copy of the hostile input: the subprocess cases concurrently (a few at a
    time), the others in this process meanwhile."""
    clean = pipeline("fp32")
    root = tmp_path_factory.mktemp("hostile")
    comparison = root / "comparison"
    args = ["--lora_path", tiny.adapter, "--task_vector_path", clean.task_vector_file, "--output_dir", comparison]
    result = run_main("compare_lora_task_vector.py", *args, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lora_deltas = comparison / "lora_deltas.safetensors"
    wanted = {
        item.callspec.id
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    }
    selected = {
        name: (case, Inputs(tiny.base, tiny.adapter, clean.merged, clean.task_vectors, lora_deltas, root / name))
        for name, case in zip(IDS, CASES, strict=True)
        if name in wanted and not (case.wrap is on_small_filesystem and not namespaces_work())
    }
    jobs = {}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for name, (case, inputs) in selected.items():
            if case.in_subprocess:
                jobs[name] = pool.submit(run_case_in_subprocess, case, inputs)
        # The in-process cases, one after the other in this thread, while the subprocesses run.
        done = {
            name: run_case_in_process(case, inputs)
            for name, (case, inputs) in selected.items()
            if not case.in_subprocess
        }
    return done | {name: job.result() for name, job in jobs.items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hostile_input_is_one_line_and_leaves_everything_as_it_was(outcomes, case, request):
    name = request.node.callspec.id
    if case.wrap is on_small_filesystem and name not in outcomes:
        pytest.skip("no user and mount namespaces here (unshare) for a small filesystem")
    if "cuda" in case.id and torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    outcome = outcomes[name]
    result, inputs = outcome.result, outcome.inputs
    fragments = case.says(inputs)
    if case.succeeds:
        assert result.returncode == 0 and not result.stderr and inputs.out.is_dir(), result.stderr
        for fragment in fragments:
            assert fragment in result.stdout, result.stdout
        for report in inputs.out.glob("*.json"):  # strict JSON, as jq reads it: no NaN or Infinity
            json.loads(report.read_text(), parse_constant=lambda name, file=report.name: pytest.fail(f"{file}: {name}"))
    else:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        assert not inputs.out.exists() and not (inputs.folder / "disk" / "out").exists()
    assert not list(inputs.folder.rglob(".out.*")), "a temporary output was left behind"
    if case.wrap is on_small_filesystem:
        assert "LEFT:\n" in result.stdout, result.stdout  # nothing on the full filesystem either
    assert outcome.after == outcome.before, "an input file changed"
    assert outcome.before, "no input file was checked"


def test_debug_shows_the_traceback_above_the_one_line(tiny, tmp_path):
    args = ["--base_model", tiny.base, "--lora_path", tmp_path / "nope", "--output_dir", tmp_path / "out", "--debug"]
    result = subprocess.run(
        [sys.executable, str(REPO / MERGE), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[0] == "Traceback (most recent call last):", result.stderr
    assert "raise UserError" in result.stderr and lines[-1].startswith("error: adapter ") and "nope" in lines[-1]
