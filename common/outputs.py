"""Output folders that appear only when complete, and never inside an input."""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError

log = logging.getLogger("lora_tv")
# Errors that say the disk, not the program, could not take the output.
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_output_dir(output_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that holds an input, or lies inside an input folder, or is full without --overwrite.

    The output folder is replaced as a whole, so it must never contain anything we read.
    """
    target = output_dir.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or target in source.parents or (source.is_dir() and source in target.parents):
            raise UserError(f"--output_dir {output_dir}: overlaps the input {source}; choose another folder")
    if target.is_file():
        raise UserError(f"--output_dir {output_dir}: is a file")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output_dir}: exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_output_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir`; on success it replaces `output_dir`, else it is removed.

    Whatever ends the run early (an error, Ctrl-C, SIGTERM: see cli.run) removes the temporary folder; a
    disk that is full (or read-only, or a file over the size limit) becomes one line naming the output.
    Only SIGKILL, which no program can catch, leaves the temporary folder behind; the next run says so.
    """
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    report_leftovers(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        with signals_held():
            move_into_place(staging, output_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno not in WRITE_FAILURES:
            raise
        where = output_dir
        with contextlib.suppress(TypeError, ValueError):
            where = output_dir / Path(e.filename).relative_to(staging)
        raise UserError(f"writing {where}: {e.strerror}; the unfinished output was removed") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished folder to `output_dir`. An old output (--overwrite) is first renamed aside and removed
    after, so at every instant `output_dir` is either absent or a complete output, never a mix. The files are on
    disk before the rename and the rename is before the function returns (fsync), so a power loss leaves the old
    output or the new one too."""
    sync_tree(staging)
    if not output_dir.exists():
        staging.rename(output_dir)
    else:
        replaced = staging.with_name(staging.name.replace(".partial-", ".replaced-", 1))
        output_dir.rename(replaced)
        staging.rename(output_dir)
        shutil.rmtree(replaced)
    sync_path(output_dir.parent)


def sync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then every folder (their entries), deepest first."""
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in paths:
        if path.is_file() and not path.is_symlink():
            sync_path(path)
    for path in [*paths, folder]:
        if path.is_dir() and not path.is_symlink():
            sync_path(path)


def sync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait while a finished output is swapped in (they act right after it), so the
    old output is never left half-removed. SIGKILL cannot wait: the rename order covers it."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def report_leftovers(output_dir: Path) -> None:
    """Temporary folders a killed run (SIGKILL, power loss) left beside the output: named, not removed, since
    another run may be writing them."""
    stem = f".{glob.escape(output_dir.name)}"
    leftovers = [p for kind in ("partial", "replaced") for p in sorted(output_dir.parent.glob(f"{stem}.{kind}-*"))]
    if leftovers:
        names = ", ".join(str(p) for p in leftovers[:3]) + (" ..." if len(leftovers) > 3 else "")
        log.warning(f"note: an interrupted run left {names}; remove it when no run is writing there")
