"""Shared fixtures: a tiny real StarCoder2 base, LoRA adapters trained with peft, and pipeline outputs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Every LoRA variant real adapters carry, on the tiny StarCoder2 (merged in test_merge_variants, compared in
# test_compare_variants: the `variant_adapters` fixture builds them once for both).
STARCODER2_VARIANTS = {
    "dora": {"r": 4, "target_modules": ["q_proj", "v_proj", "c_fc"], "use_dora": True},
    "lora_bias": {"r": 4, "target_modules": ["q_proj", "v_proj"], "lora_bias": True},
    "bias_lora_only": {"r": 4, "target_modules": ["q_proj", "o_proj"], "bias": "lora_only"},
    "bias_all": {"r": 4, "target_modules": ["q_proj"], "bias": "all"},
    "modules_to_save_norms": {"r": 4, "target_modules": ["k_proj"], "modules_to_save": ["norm"]},
    "trainable_tokens": {"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": [3, 7, 100]},
    "embedding_lora": {"r": 4, "target_modules": ["embed_tokens", "q_proj"]},
    "modules_to_save_lm_head": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


def run_script(script: str, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the four scripts as a user would, from the repo root."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _fresh_interpreter_warning_filters() -> None:
    """The warning filters CPython starts a script with (no -W, no PYTHONWARNINGS), not pytest's."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category, append=True)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [h for lg in loggers for h in getattr(lg, "handlers", []) if isinstance(h, logging.StreamHandler)]


@contextlib.contextmanager
def _output_to(out: io.StringIO, err: io.StringIO) -> Iterator[None]:
    """sys.stdout and sys.stderr write to out and err for the duration, and so do the logging handlers that took
    them when they were made (transformers' and huggingface_hub's write warnings to stderr that way)."""
    previous = {id(sys.stdout): (sys.stdout, out), id(sys.stderr): (sys.stderr, err)}
    swapped = [(h, h.stream) for h in _stream_handlers() if id(h.stream) in previous]
    for handler, stream in swapped:
        handler.setStream(previous[id(stream)][1])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)
        # Handlers made during the run (a library imported for the first time) took out or err: give them back.
        back = {id(captured): original for original, captured in previous.values()}
        for handler in _stream_handlers():
            if id(handler.stream) in back:
                handler.setStream(back[id(handler.stream)])


def run_in_process(main, *args: object) -> tuple[int, str, str]:
    """A script's main run as its `__main__` runs it (`common.cli.run`: user errors become one line on stderr and
    exit code 2), in this process, from the repo root as `run_script` runs it: (exit code, stdout, stderr).

    stderr holds what the process would print there: the script's own lines, logging handlers' output and Python
    warnings under a fresh interpreter's filters (added at the end). What a run may change in the process is put
    back afterwards: the signal handlers it installs, the logging set-up (`setup_logging` replaces the root
    logger's handlers), the environment, the current folder and torch's RNG."""
    from common.cli import run

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    environ, cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(REPO)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught, _output_to(out, err):
            _fresh_interpreter_warning_filters()
            try:
                run(main, [str(a) for a in args])
                code = 0  # not reached: run always exits
            except SystemExit as e:  # as the interpreter ends on it: None is 0, a message is printed with 1
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:  # what escapes run ends a process with its traceback and exit code 1
                traceback.print_exc()
                code = 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return code, out.getvalue(), err.getvalue()


def run_main(script: str, *args: object) -> subprocess.CompletedProcess:
    """`run_script`'s twin in this process (`run_in_process` on the script's main): the same arguments, the same
    exit code, stdout and stderr, without paying for a fresh interpreter's imports. For what a process is needed
    for (signals, peak memory, the environment read at import, `python script.py` itself) use `run_script`."""
    import importlib

    main = importlib.import_module(script.removesuffix(".py")).main
    code, out, err = run_in_process(main, *args)
    return subprocess.CompletedProcess([script, *map(str, args)], code, out, err)


def run_merge(base: Path, adapter: Path, out: Path, *extra: object) -> subprocess.CompletedProcess:
    """merge_lora.py as the README runs it (its main, in this process), asserting success."""
    result = run_main("merge_lora.py", "--base_model", base, "--lora_path", adapter, "--output_dir", out, *extra)
    assert result.returncode == 0, result.stderr
    return result


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, exactly one line on stderr mentioning every fragment, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@dataclass
class Tiny:
    base: Path
    adapter: Path  # a Trainer-style checkpoint-5/ folder
    other_adapter: Path  # the same recipe, another seed: a wrong adapter for compare
    root: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from demo.tiny_models import build_adapter, build_base

    root = tmp_path_factory.mktemp("tiny")
    base = build_base(root / "base_model")
    adapter = build_adapter(base, root / "checkpoint-5", seed=0)
    other = build_adapter(base, root / "other" / "checkpoint-5", seed=1)
    return Tiny(base=base, adapter=adapter, other_adapter=other, root=root)


@dataclass
class Pipeline:
    merged: Path
    task_vectors: Path

    @property
    def task_vector_file(self) -> Path:
        return self.task_vectors / "task_vector.safetensors"


@pytest.fixture(scope="session")
def pipeline(tiny: Tiny):
    """Merged model and task vector at a precision, built once per session through the scripts' mains."""
    import extract_task_vectors
    import merge_lora

    built: dict[str, Pipeline] = {}

    def get(precision: str) -> Pipeline:
        if precision not in built:
            merged = tiny.root / f"merged_{precision}"
            tvs = tiny.root / f"task_vectors_{precision}"
            merge_args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", merged]
            assert merge_lora.main([*map(str, merge_args), "--precision", precision, "--device", "cpu"]) == 0
            extract_args = ["--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", tvs]
            assert extract_task_vectors.main([*map(str, extract_args), "--device", "cpu"]) == 0
            built[precision] = Pipeline(merged=merged, task_vectors=tvs)
        return built[precision]

    return get


@pytest.fixture(scope="session")
def qlora_merges(tiny, tmp_path_factory, pipeline):
    """The tiny adapter merged into the bf16 base (a: the streaming merge) and into the dequantized 4-bit base (c:
    transformers' dequantize, then peft's merge_and_unload, as a user does it), each with its τ."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("qlora")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.bfloat16, quantization_config=quant)
    merged = PeftModel.from_pretrained(model.dequantize(), tiny.adapter).merge_and_unload()  # no forward before
    merged.save_pretrained(root / "merged_c")
    shutil.copy(tiny.base / "tokenizer.json", root / "merged_c")
    vectors = {"a": pipeline("bf16").task_vector_file}
    args = ["--base_model", tiny.base, "--finetuned_model", root / "merged_c", "--output_dir", root / "tv_c"]
    assert run_main("extract_task_vectors.py", *args, "--device", "cpu").returncode == 0
    return vectors | {"c": root / "tv_c" / "task_vector.safetensors"}


def peft_merged_state_dict(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference: transformers load at `dtype`, peft load, merge_and_unload, on CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, through safetensors' own reader."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


# A fresh interpreter, started ahead of need: torch imported (what every script imports first), then it waits for
# its program and arguments on stdin and runs them as `python -c PROGRAM ARGS…` would. It runs at a lower priority
# (nice 10) so that starting it ahead never takes a core from the tests running meanwhile.
_BOOT = """
import json, os, sys
os.nice(10)
import torch
print("READY", flush=True)
job = json.loads(sys.stdin.readline())
sys.argv = ["-c", *job["argv"]]
del json, os, torch
exec(compile(job["program"], "<string>", "exec"))
"""


class FreshPythons:
    """Real, fresh `python -c` processes for what needs a process of its own (signals and kills, peak memory), started
    ahead, one at a time, in a background thread while other tests run (on the core they leave idle): a test gets one
    whose imports are paid for.

    `popen(program, *args)` is `subprocess.Popen([sys.executable, "-c", program, *args], cwd=REPO, stdout=PIPE,
    stderr=PIPE, text=True)` with HF_HUB_OFFLINE=1, but for the seconds `import torch` takes. Each process runs one
    program and is never reused."""

    MOST_WAITING = 12  # at most this many wait at a time (~150 MB each)

    def __init__(self, count: int):
        import queue
        import threading

        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.ready: queue.Queue[subprocess.Popen] = queue.Queue()
        self.slots = threading.Semaphore(self.MOST_WAITING)
        self.started: list[subprocess.Popen] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._start_ahead, args=(count,), daemon=True)
        self.thread.start()

    def _start_one(self) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started.append(process)
        line = process.stdout.readline()
        assert line == "READY\n", line + process.stderr.read()
        return process

    def _start_ahead(self, count: int) -> None:
        for _ in range(count):
            while not self.slots.acquire(timeout=0.5):
                if self.stop.is_set():
                    return
            if self.stop.is_set():
                return
            self.ready.put(self._start_one())

    def popen(self, program: str, *args: object) -> subprocess.Popen:
        import queue

        while True:  # the next one started ahead (already on its way); when none is coming, one started now
            try:
                process = self.ready.get(timeout=1)
                self.slots.release()
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    process = self._start_one()
                    break
        process.stdin.write(json.dumps({"program": program, "argv": [str(a) for a in args]}) + "\n")
        process.stdin.close()
        process.stdin = None  # nothing more to send: communicate() must not touch it
        return process

    def run(self, program: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
        process = self.popen(program, *args)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        return subprocess.CompletedProcess([sys.executable, "-c", program, *args], process.returncode, stdout, stderr)

    def close(self) -> None:
        """End the ones started ahead and never used (and any a test left running)."""
        self.stop.set()
        self.thread.join()
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


# Scripts' mains run one after the other by `run_main` in a fresh interpreter: the jobs in argv[1], the results on
# stdout (the scripts' own output is in the results).
_MAINS = """
import json, sys
sys.path.insert(0, "tests")
from conftest import run_main
results = [run_main(*job) for job in json.loads(sys.argv[1])]
print(json.dumps([[r.returncode, r.stdout, r.stderr] for r in results]))
"""


def run_mains_aside(pythons: FreshPythons, jobs: list[list]) -> Callable[[], list[subprocess.CompletedProcess]]:
    """`run_main(*job)` for each job, one after the other, in a fresh interpreter beside this one (the second core),
    started now; the function returned waits for them and gives what `run_main` gave for each."""
    jobs = [[str(a) for a in job] for job in jobs]
    process = pythons.popen(_MAINS, json.dumps(jobs))

    def results() -> list[subprocess.CompletedProcess]:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        return [subprocess.CompletedProcess(job, *result) for job, result in zip(jobs, json.loads(stdout), strict=True)]

    return results


@pytest.fixture(scope="session")
def fresh_python(request: pytest.FixtureRequest) -> Iterator[FreshPythons]:
    """The session's FreshPythons: as many started ahead as the selected test modules declare (FRESH_PYTHONS)."""
    modules = {item.module for item in request.session.items if item.module is not None}
    pythons = FreshPythons(sum(getattr(module, "FRESH_PYTHONS", 0) for module in modules))
    yield pythons
    pythons.close()


@pytest.fixture(scope="session", autouse=True)
def _fresh_pythons_start_early(request: pytest.FixtureRequest) -> None:
    """Start the fresh interpreters with the first test, not with the first test that uses them."""
    if any("fresh_python" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("fresh_python")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (Conv1D layers, tied wte / lm_head), every tensor perturbed, saved as safetensors in fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def build_peft_adapter(base: Path, out: Path, seed: int = 3, **lora_config) -> Path:
    """An adapter saved by peft itself, every trainable tensor (B, magnitudes, copies, token rows) randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_config),
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param) * (param.abs().mean() + 0.1))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory: pytest.TempPathFactory):
    """`build_peft_adapter(base, seed=…, **config)`, built once per session for each base, seed and config: tests
    that ask for the same adapter share it (and only read it)."""
    root = tmp_path_factory.mktemp("peft_adapters")
    built: dict[tuple, Path] = {}

    def get(base: Path, seed: int = 3, **lora_config) -> Path:
        key = (str(base), seed, json.dumps(lora_config, sort_keys=True))
        if key not in built:
            built[key] = build_peft_adapter(base, root / f"adapter_{len(built)}", seed, **lora_config)
        return built[key]

    return get


@pytest.fixture(scope="session")
def variant_adapters(tiny: Tiny, peft_adapters) -> dict[str, Path]:
    """One peft-saved adapter per STARCODER2_VARIANTS entry on the tiny base."""
    return {name: peft_adapters(tiny.base, **config) for name, config in STARCODER2_VARIANTS.items()}
