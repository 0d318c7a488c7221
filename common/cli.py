"""What every script shares at its boundary: --device, --config, logging, and the exit-code contract.

Exit codes: 0 success, 1 a negative verdict (compare), 2 a user error (one line on stderr),
130 Ctrl-C, 143 SIGTERM (129 SIGHUP): unfinished output is removed in all of these.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from tqdm import tqdm

from common.errors import UserError

log = logging.getLogger("lora_tv")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in one line (exit code 2) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and states every flag's default value (not an absent one or `off`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def base_parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--device",
        default=None,
        help="where the arithmetic runs: cuda:0 when CUDA is available, else cpu (default); any torch device",
    )
    add_switch(parser, "--verbose", "print a line per tensor")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    return parser


def boolean(text: str) -> bool:
    """A flag's optional value: true/false, yes/no, 1/0 (so `--trust_remote_code false` reads as meant)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def byte_size(text: str) -> int:
    """A size like 5GB, 500MB, 2GiB or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GB or 500MB)")
    unit = match[2].upper().rstrip("B").rstrip("I")
    base = 1024 if "I" in match[2].upper() else 1000
    size = int(float(match[1]) * base ** "_KMGT".index(unit or "_"))
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def folder_path(text: str) -> Path:
    """An output folder: never empty (an unset shell variable would make it the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?)")
    return Path(text)


def tolerance(text: str) -> float:
    """An absolute tolerance: a finite number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, not {text!r}")
    return value


def count_or_zero(text: str) -> int:
    """A count that may be 0 (off): an integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """A rank, a count: a positive integer."""
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return rank


def rank_or_auto(text: str) -> int | str:
    """A rank (a positive integer), or `auto`."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def regex(text: str) -> str:
    """A regular expression, compiled once to say at once when it is not one."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None
    return text


def finite_weight(text: str) -> float:
    """A weight: a finite number (negative ones subtract)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a weight must be a finite number, not {text!r}")
    return value


def fraction(text: str) -> float:
    """A share, such as of ‖τ‖²_F to keep: in (0, 1]."""
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], not {text!r}")
    return fraction


def add_switch(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A flag that is off by default and may be given alone (on) or with a value (`--flag false`); every on/off
    flag of the four scripts is one (but --debug, which is read before the flags are parsed)."""
    parser.add_argument(name, type=boolean, nargs="?", const=True, default=False, metavar="true|false", help=help)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    add_switch(parser, "--overwrite", "replace an existing, non-empty --output_dir")


def add_residual_base(parser: argparse.ArgumentParser) -> None:
    add_switch(
        parser,
        "--residual_base",
        "the base model is the residual model a PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA initialisation saved: merge the "
        "adapter into it as a plain LoRA instead of redoing (or refusing) the initialisation",
    )


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program stands so that cleanups (staged outputs) run as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise Terminated(signum)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a script's main: user errors (and failures of the OS: a missing file, a full disk) become one line
    on stderr and exit code 2, never a traceback; SIGTERM and SIGHUP clean up as Ctrl-C does."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch backs CPU tensors of 2 MB and more with transparent huge pages (read at its first such allocation; an
    # explicit value wins): on 4 KB pages, page faults dominate the element-wise work (docs/streaming.md)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    for signum in (signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])):  # no SIGHUP on Windows
        if signal.getsignal(signum) == signal.SIG_DFL:  # not when ignored, as under nohup
            signal.signal(signum, _terminate)
    try:
        code = main(argv)
    except (UserError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: any unfinished output was removed", file=sys.stderr)
        code = 130
    except Terminated as e:
        print(f"interrupted by {signal.Signals(e.signum).name}: any unfinished output was removed", file=sys.stderr)
        code = 128 + e.signum
    sys.exit(code)


def one_line(error: Exception) -> str:
    """A user error's message; an OS error as `path: reason`."""
    if isinstance(error, OSError) and error.strerror:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        text = f"{paths}: {error.strerror}" if paths else error.strerror
    else:
        text = str(error)
    return " ".join(text.split())


def setup_logging(verbose: bool, to_stderr: bool = False) -> None:
    """Messages on stdout (stderr when stdout carries machine-readable output), per tensor with --verbose."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr if to_stderr else sys.stdout, force=True)
    # bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel package is missing: not ours.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def resolve_device(requested: str | None):
    """cuda:0 when CUDA is available, else cpu (said once); a named device that does not exist is an error."""
    import torch

    if requested is None:
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            log.info("device: CUDA is not available, computing on cpu")
        return device
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested}: not a device name (try cpu or cuda:0)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {requested}: only cpu and cuda devices are supported")
    return device


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse flags, with `--config FILE` (YAML) supplying defaults that command-line flags override."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file of flag values (see the example)")
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**load_config(first.config, parser))
    return parser.parse_args(argv)


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    """A YAML mapping of flag names to values (yaml.safe_load only), checked against the parser."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        config = yaml.safe_load(text)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    config = config or {}
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    for key, value in config.items():
        if key not in actions:
            raise UserError(f"--config {path}: unknown key {key!r} (known: {', '.join(sorted(actions))})")
        if value is None:
            raise UserError(f"--config {path}: {key} is empty (give it a value, or leave the key out)")
        _check_config_type(path, key, value, actions[key])
    # As text, a value goes through the flag's own type when argparse applies the defaults: one validation for
    # flags and YAML alike (a rank of -5, a tolerance of nan or an empty output path are refused either way).
    return {k: v if isinstance(v, bool) else str(v) for k, v in config.items()}


def _check_config_type(path: Path, key: str, value: object, action: argparse.Action) -> None:
    flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.type is boolean
    if value is None:
        return
    if flag and not isinstance(value, bool):
        raise UserError(f"--config {path}: {key} must be true or false, not {value!r}")
    if not flag and isinstance(value, (dict, list, bool)):
        raise UserError(f"--config {path}: {key} must be a single value, not {value!r}")
    if action.choices and value not in action.choices:
        raise UserError(f"--config {path}: {key} must be one of {', '.join(action.choices)}, not {value!r}")
    if action.type in (int, float, Path, byte_size) and not flag:
        try:
            action.type(str(value) if action.type is byte_size else value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(f"--config {path}: {key} must be a {action.type.__name__}, not {value!r}") from None


def require(args: argparse.Namespace, *names: str) -> None:
    """Flags that must come from the command line or the config file."""
    missing = [f"--{n}" for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (give it on the command line or in --config)")


def at_most_one(args: argparse.Namespace, *names: str, required: bool = False) -> None:
    """Flags that exclude each other (from the command line and the config file together); with `required`, one of
    them must be given."""
    given = [f"--{n}" for n in names if getattr(args, n) not in (None, "")]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} exclude each other: give one")
    if required and not given:
        flags = " or ".join(f"--{n}" for n in names)
        raise UserError(f"missing {flags} (give it on the command line or in --config)")


@contextlib.contextmanager
def tensor_progress(total: int, desc: str, verbose: bool, unit: str = "tensor") -> Iterator[Callable[..., None]]:
    """A callback per tensor, `step(line, amount=1)`: a progress bar, or with --verbose the line itself."""
    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    bar = tqdm(
        total=total, desc=desc, unit=unit, disable=True if verbose or total == 0 else None, file=sys.stderr, **scale
    )

    def step(line: str, amount: int = 1) -> None:
        bar.update(amount)
        if verbose:
            log.debug(f"  {line}")

    try:
        yield step
    finally:
        bar.close()


def peak_memory_gb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS); NaN where the platform
    has no `resource` module (Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2
