"""Atomic file writes: a reader (or a crash) only ever sees the old or the new complete file.

A full disk or a read-only folder is the user's to fix, so it is a one-line DetfitError naming
the file (and, for a full disk, how much room the file needs), not a library's traceback: torch's
zip writer, for one, reports ENOSPC as "unexpected pos ...".
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from detfit.errors import DetfitError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
# What atomic_write leaves behind when killed: ".NAME." + mkstemp's 8 random characters + ".tmp"
STALE_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Recorder:
    """A file wrapper that remembers the OS error of a write, whatever the writer turns it into."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class _Counter:
    """A sink that only counts bytes: how large the file would have been."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def _megabytes(size: int) -> int:
    return max(1, math.ceil(size / 2**20))


def _user_error(
    exc: OSError, path: Path, write: Callable[[BinaryIO], object] | None
) -> DetfitError | None:
    """The one-line error for a full disk or an unwritable folder, or None (not the user's)."""
    if exc.errno in NO_SPACE:
        needed = ""
        if write is not None:
            counter = _Counter()
            try:
                write(counter)  # type: ignore[arg-type]
                needed = f"; {_megabytes(counter.size)} MB needed"
            except Exception:  # the size is a courtesy; the message stands without it
                pass
        try:
            free = f", {shutil.disk_usage(path.parent).free / 2**20:.0f} MB free"
        except OSError:
            free = ""
        return DetfitError(f"no space left on device writing {path}{needed}{free}")
    if exc.errno in NOT_WRITABLE:
        return DetfitError(f"cannot write {path}: {exc.strerror} (is {path.parent} read-only?)")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder should be
        return DetfitError(f"cannot write {path}: a file stands where a folder is needed")
    return None


def disk_error(exc: OSError, path: Path) -> DetfitError | None:
    """The one-line error for a full disk or an unwritable folder met writing ``path`` by other
    means than :func:`atomic_write` (a video encoder, say); None when it is neither."""
    return _user_error(exc, Path(path), None)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        error = _user_error(exc, path, None)
        if error is None:
            raise
        raise error from None
    recorder = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            write(recorder)  # type: ignore[arg-type]
            recorder.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else recorder.error if recorder else None
        error = _user_error(cause, path, write) if cause is not None else None
        if error is None:
            raise
        raise error from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.XXXXXXXX.tmp`` files an interrupted :func:`atomic_write` left in
    ``folder`` (a kill during a checkpoint save leaves one as large as the checkpoint); returns
    them. Call it before writing into the folder, not while another process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if STALE_TEMP.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return sorted(removed)


def remove_leftovers_of(target: str | Path, partials: tuple[str, ...] = ()) -> list[Path]:
    """Delete what a killed write of ``target`` left beside it: the files named ``partials`` in
    its folder (a stopped export's ``.NAME.partial.onnx``) and the ``.NAME.XXXXXXXX.tmp`` files
    of :func:`atomic_write` for ``target`` and for each of them; returns what was removed. Only
    that target's leftovers: another process may be writing other files in the folder. Call it
    when the command starts writing ``target``, not before its checks (a refused command
    changes nothing)."""
    target = Path(target)
    folder = target.parent
    if not folder.is_dir():
        return []
    names = (target.name, *partials)
    removed = []
    for entry in folder.iterdir():
        ours = entry.name in partials or any(
            entry.name.startswith(f".{name}.") and STALE_TEMP.match(entry.name) for name in names
        )
        if ours and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return sorted(removed)
