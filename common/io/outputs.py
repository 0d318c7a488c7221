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
import threading
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError
from common.io.safetensors_io import check_inputs_unchanged

log = logging.getLogger("lora_tv")
# Errors that say the disk, not the program, could not take the output.
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# What a file system that cannot fsync a folder answers (the folder's entries are then left to the system).
REFUSALS = ("EINVAL", "EBADF", "EACCES", "ENOTSUP", "EOPNOTSUPP")
FOLDER_SYNC_REFUSED = {getattr(errno, name) for name in REFUSALS if hasattr(errno, name)}


MARKER = ".lora_tv_output"  # written into every output folder: --overwrite replaces only folders that hold it
MARKER_TEXT = "written by lora-task-vectors: --overwrite may replace this folder\n"  # the same in every output


def check_output_dir(output_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that holds an input, or lies inside an input folder, or is full without --overwrite,
    or with --overwrite is not an output of this toolkit (it holds no MARKER).

    The output folder is replaced as a whole, so it must never contain anything we read: inputs count as their
    folders and as the files their symbolic links point to (a hub cache snapshot's shards are links into blobs/).
    """
    target = output_dir.resolve()
    for source, path in input_paths(inputs):
        if target == path or target in path.parents or (path.is_dir() and path in target.parents):
            raise UserError(f"--output_dir {output_dir}: overlaps the input {source}; choose another folder")
    if target.is_file():
        raise UserError(f"--output_dir {output_dir}: is a file")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise UserError(f"--output_dir {output_dir}: exists and is not empty (pass --overwrite to replace it)")
        require_own_output(output_dir)


def require_own_output(output_dir: Path) -> None:
    """--overwrite removes only a folder this toolkit wrote (one holding MARKER), never a user's own files."""
    if not (output_dir / MARKER).is_file():
        raise UserError(
            f"--output_dir {output_dir}: holds files this toolkit did not write (no {MARKER} in it), and --overwrite "
            "replaces only the toolkit's own outputs: choose another folder, or empty this one yourself"
        )


def input_paths(inputs: list[Path]) -> Iterator[tuple[Path, Path]]:
    """(input, path) for each input's resolved path and for the resolved target of every symbolic link inside an
    input folder (not followed into linked folders)."""
    for source in inputs:
        source = Path(source)
        yield source, source.resolve()
        if not source.is_dir():
            continue
        for folder, dirs, files in os.walk(source):
            for name in dirs + files:
                entry = Path(folder) / name
                if entry.is_symlink():
                    yield entry, entry.resolve()


@contextlib.contextmanager
def staged_output_dir(output_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir`; on success it replaces `output_dir`, else it is removed.

    Whatever ends the run early (an error, Ctrl-C, SIGTERM: see cli.run) removes the temporary folder; a
    disk that is full (or read-only, or a file over the size limit) becomes one line naming the output.
    Only SIGKILL, which no program can catch, leaves the temporary folder behind; the next run says so.
    Publication is exclusive: an output another run published meanwhile is replaced only with `overwrite` (and
    then said), never otherwise.
    """
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    report_leftovers(output_dir)
    found_at_start = identity(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        (staging / MARKER).write_text(MARKER_TEXT)
        yield staging
        check_inputs_unchanged()
        with signals_held():
            publish(staging, output_dir, overwrite, found_at_start)
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


def identity(path: Path) -> tuple[int, int] | None:
    """What tells one folder from another that replaced it: (device, inode); None when absent."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def publish(staging: Path, output_dir: Path, overwrite: bool, found_at_start: tuple[int, int] | None) -> None:
    """Put the finished folder at `output_dir` (move_into_place). Without `overwrite` the rename itself refuses an
    output that appeared meanwhile (rename never replaces a non-empty folder, and outputs are never empty); with it,
    an output another run published meanwhile is replaced, and the user told so."""
    current = identity(output_dir)
    if overwrite and current is not None:
        require_own_output(output_dir)
        if current != found_at_start:
            log.warning(f"note: another run published {output_dir} while this one ran; this run's output replaces it")
    try:
        move_into_place(staging, output_dir, replace=overwrite)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise UserError(
            f"--output_dir {output_dir}: another run (or you) put something there while this one ran; this run's "
            "output was not published (pass --overwrite to replace it)"
        ) from None


def move_into_place(staging: Path, output_dir: Path, replace: bool = True) -> None:
    """Rename the finished folder to `output_dir`. An old output (`replace`) is first renamed aside and removed
    after, so at every instant `output_dir` is either absent or a complete output, never a mix. The files are on
    disk before the rename and the rename is before the function returns (fsync), so a power loss leaves the old
    output or the new one too."""
    sync_tree(staging)
    if not (replace and output_dir.exists()):
        rename_onto_empty(staging, output_dir)
    else:
        replaced = staging.with_name(staging.name.replace(".partial-", ".replaced-", 1))
        output_dir.rename(replaced)
        staging.rename(output_dir)
        remove_replaced(replaced, output_dir)
    sync_path(output_dir.parent)


def rename_onto_empty(staging: Path, output_dir: Path) -> None:
    """Rename `staging` to `output_dir`, which is absent or an empty folder: POSIX's rename replaces an empty folder,
    Windows' refuses any existing one (the empty folder is then removed first); a non-empty one is always refused."""
    try:
        staging.rename(output_dir)
    except FileExistsError:
        if not output_dir.is_dir() or output_dir.is_symlink() or any(output_dir.iterdir()):
            raise
        output_dir.rmdir()
        staging.rename(output_dir)


def remove_replaced(replaced: Path, output_dir: Path) -> None:
    """Remove the old output once the new one is in place; what cannot be removed is said, with full paths (the
    new output is complete whatever happens here)."""
    try:
        shutil.rmtree(replaced)
    except OSError as e:
        where = f"{Path(e.filename).resolve()}: {e.strerror}" if e.filename else str(e)
        log.warning(
            f"note: {output_dir} is complete; the output it replaced, moved to {replaced}, could not be removed "
            f"entirely ({where}): remove it yourself"
        )


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
    """Flush a file's data, or a folder's entries, to the disk. Where a folder cannot be opened or synced (Windows
    opens no folder; some file systems refuse fsync on one), its entries are left to the system."""
    folder = path.is_dir()
    # Windows flushes only what it may write (FlushFileBuffers); elsewhere read-only is enough, for read-only files too.
    flags = os.O_RDONLY if folder or os.name != "nt" else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (folder and e.errno in FOLDER_SYNC_REFUSED):
            raise
    finally:
        os.close(fd)


HELD_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # SIGHUP: not on Windows


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait while a finished output is swapped in (they act right after it), so the
    old output is never left half-removed. SIGKILL cannot wait: the rename order covers it.

    Blocked with `pthread_sigmask` where the system has it; elsewhere (Windows) their Python handlers are replaced
    for the while by ones that note the signal, which is raised again right after."""
    held = {getattr(signal, name) for name in HELD_SIGNALS if hasattr(signal, name)}
    if hasattr(signal, "pthread_sigmask"):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    else:
        with _signals_deferred(held):
            yield


@contextlib.contextmanager
def _signals_deferred(held: set[signal.Signals]) -> Iterator[None]:
    """The held signals noted while the block runs and raised again after it, in order (only the main thread can
    set handlers: elsewhere they are not held)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: a handler not set by Python
        for signum in noted:
            signal.raise_signal(signum)


def report_leftovers(output_dir: Path) -> None:
    """Temporary folders a killed run (SIGKILL, power loss) left beside the output: named, not removed, since
    another run may be writing them."""
    stem = f".{glob.escape(output_dir.name)}"
    leftovers = [p for kind in ("partial", "replaced") for p in sorted(output_dir.parent.glob(f"{stem}.{kind}-*"))]
    if leftovers:
        names = ", ".join(str(p) for p in leftovers[:3]) + (" ..." if len(leftovers) > 3 else "")
        log.warning(f"note: an interrupted run left {names}; remove it when no run is writing there")
