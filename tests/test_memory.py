"""Peak memory of merge and extract does not grow with the model: 4× the layers, < 10 % more peak RSS.

Each measurement is a fresh interpreter of its own (its VmHWM), started ahead with torch imported as the script's
own import would (`conftest.FreshPythons`); the two model sizes are measured at the same time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import build_peft_adapter, run_main

# `python -c MEASURE script args…` runs the script's main and prints its peak RSS. VmHWM is the peak RSS of this
# process image alone; ru_maxrss would also count the parent's RSS at fork time.
RUN_MAIN = "import importlib, sys\nassert importlib.import_module(sys.argv[1]).main(sys.argv[2:]) == 0\n"
PEAK = "print('MAXRSS_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
MEASURE = RUN_MAIN + PEAK
# The control of the default run: the same script, args and measurement, in a process that first reads the whole
# base model with safetensors and holds it to the end, as a merge that is not streamed would.
MEASURE_HOLDING_THE_BASE = (
    "import pathlib, sys\nfrom safetensors.torch import load_file\n"
    "base = pathlib.Path(sys.argv[sys.argv.index('--base_model') + 1])\n"
    "held = [t.clone() for shard in sorted(base.glob('*.safetensors')) for t in load_file(shard).values()]\n"
    + RUN_MAIN
    + PEAK
)

# The processes started ahead for this module: two per test of the default run (the slow control starts its own).
FRESH_PYTHONS = 8


def peak_rss_kb(pythons, script: str, *args: object, program: str = MEASURE) -> int:
    """The peak RSS of `python -c program script args…` (MEASURE: the script alone): a fresh interpreter
    (`conftest.FreshPythons`)."""
    result = pythons.run(program, script, *args)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split("MAXRSS_KB")[-1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Bases with 2 and 8 layers of width 512 (12 MB of weights per layer), one DoRA + MLP adapter each."""
    from demo.tiny_models import build_base

    root = tmp_path_factory.mktemp("memory")
    built = {}
    for layers in (2, 8):
        base = build_base(root / f"base_{layers}", num_layers=layers, hidden_size=512)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]
        built[layers] = (base, build_peft_adapter(base, root / f"adapter_{layers}", r=8, target_modules=targets))
    return built


def peak_rss_kb_of_each(pythons, runs: dict[int, tuple], program: str = MEASURE) -> dict[int, int]:
    """peak_rss_kb of each (script, *args), the processes running at the same time."""
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        jobs = {key: pool.submit(peak_rss_kb, pythons, *run, program=program) for key, run in runs.items()}
    return {key: job.result() for key, job in jobs.items()}


def peak_growth(pythons, models, tmp_path, *extra: str, program: str = MEASURE) -> float:
    runs = {}
    for layers, (base, adapter) in models.items():
        args = ["--base_model", base, "--lora_path", adapter, "--output_dir", tmp_path / f"out_{layers}"]
        runs[layers] = ("merge_lora", *args, "--device", "cpu", "--overwrite", *extra)
    peaks = peak_rss_kb_of_each(pythons, runs, program)
    return peaks[8] / peaks[2]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_peak_memory_is_flat_in_model_size(models, fresh_python, tmp_path, precision):
    weights_mb = {n: sum(f.stat().st_size for f in b.glob("*.safetensors")) / 2**20 for n, (b, _) in models.items()}
    assert weights_mb[8] - weights_mb[2] > 60  # the larger model holds ~70 MB more weights
    growth = peak_growth(fresh_python, models, tmp_path, "--precision", precision)
    assert growth < 1.10, f"peak RSS grew {growth:.3f}x"


def test_the_measurement_sees_a_merge_that_holds_the_base_grow(models, fresh_python, tmp_path):
    """The control of the default run: the flat test's measurement, on the same merges, in processes that also hold
    the whole base model (read with safetensors before the merge runs), shows the growth (measured 1.27x): were the
    measurement blind to what the model's size adds (reading the peak before the run, or some other process's), the
    flat test would pass and this one would fail."""
    growth = peak_growth(fresh_python, models, tmp_path, "--precision", "fp32", program=MEASURE_HOLDING_THE_BASE)
    assert growth > 1.10, f"peak RSS grew only {growth:.3f}x"


@pytest.mark.slow  # ~10 s on 2 idle cores (two processes importing transformers and peft): a check of the method
def test_the_measurement_sees_a_whole_model_merge_grow(models, fresh_python, tmp_path):
    """The control with peft's own merge, which holds the model (measured 1.155x)."""
    assert peak_growth(fresh_python, models, tmp_path, "--precision", "fp32", "--engine", "peft") > 1.10


def test_extraction_peak_memory_is_flat_in_model_size(models, fresh_python, tmp_path):
    runs = {}
    for layers, (base, adapter) in models.items():
        merged = tmp_path / f"merged_{layers}"
        merge_args = ["--base_model", base, "--lora_path", adapter, "--output_dir", merged, "--precision", "bf16"]
        result = run_main("merge_lora.py", *merge_args, "--device", "cpu")  # the input, made here: not measured
        assert result.returncode == 0, result.stderr
        args = ["--base_model", base, "--finetuned_model", merged, "--output_dir", tmp_path / f"tv_{layers}"]
        runs[layers] = ("extract_task_vectors", *args, "--device", "cpu")
    peaks = peak_rss_kb_of_each(fresh_python, runs)
    growth = peaks[8] / peaks[2]
    assert growth < 1.10, f"peak RSS grew {growth:.3f}x"
