"""Output folders that appear only when complete, and never inside an input."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError


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
    """Yield a temporary folder beside `output_dir`; on success it replaces `output_dir`, else it is removed."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
