"""Atomic writes: a hidden temporary directory beside the target, renamed onto it only
when complete, and the clean-up of what a killed writer left."""

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import FlashError


@contextlib.contextmanager
def _staged(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `target`, renamed onto it only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FlashError("the output appeared while converting", target)
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(target: Path) -> None:
    """Remove what a killed conversion into `target` left: temporary directories
    whose process no longer runs (their names end with its pid)."""
    for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*"):
        for tmp in target.parent.glob(pattern):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
