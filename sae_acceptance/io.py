"""Files: atomic writes, JSON, and locks that give up with a clear error.

Every report, baseline and cache entry is written to a temporary file in the
same directory and renamed over the target, so an interrupted or concurrent
run never leaves half a file. Locks (for files several processes update, such
as a JSON report merged by pytest-xdist workers) time out with one line naming
the path. A lock file is removed by the run's last writer (`remove_lock`), never
on release: a waiting process may already hold a descriptor to it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import stat
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from filelock import FileLock, Timeout

from sae_acceptance.errors import SAEAcceptanceError

LOCK_TIMEOUT_S = 120.0
# The most a file read as configuration (thresholds.toml, cfg.json, a checkpoint's config.json)
# or as a report or baseline may hold: refused unread above this, whatever is in it.
CONFIG_LIMIT = 64 << 20
REPORT_LIMIT = 1 << 30


class OutputError(SAEAcceptanceError):
    """A report, baseline or cache file cannot be written where asked."""


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them: an interrupt between
    creating a temporary file and naming it for cleanup, or between the two files of a
    baseline, would leave a file behind or a pair torn. Blocks nest (the outer one delivers);
    only the main thread can do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append((signum, frame))) for sig in HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in caught[:1]:
            handler = previous[signal.Signals(signum)]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stdin_empty() -> Iterator[None]:
    """Standard input reads as empty (end of file) while the block runs, for Python code and for
    any child process alike: nothing the tool calls can prompt (transformers asks there before
    running a checkpoint's code) or wait on a terminal."""
    saved, saved_fd = sys.stdin, None
    with open(os.devnull) as empty:
        try:
            saved_fd = os.dup(0)
            os.dup2(empty.fileno(), 0)
        except OSError:  # no descriptor 0 to replace: nothing can read it either
            saved_fd = None
        sys.stdin = empty
        try:
            yield
        finally:
            sys.stdin = saved
            if saved_fd is not None:
                os.dup2(saved_fd, 0)
                os.close(saved_fd)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` in one step (text or bytes); a write the system refuses (a full
    disk, a read-only folder) is one `OutputError` naming the file, and leaves nothing behind."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file path")
    with signals_held():
        return _write_replacing(path, data)


def _write_replacing(path: Path, data: str | bytes) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"{path}: cannot write there ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a normal file, not mkstemp's private 0600
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: a non-finite number is written as null."""
    return float(x) if math.isfinite(x) else None


def to_json(payload: Any, indent: int | None = 2) -> str:
    """JSON with NaN refused (a report holds null for a non-finite number, never NaN)."""
    return json.dumps(payload, indent=indent, allow_nan=False, default=str) + "\n"


def write_json(path: str | Path, payload: Any, indent: int | None = 2) -> Path:
    """Write `payload` as JSON (`to_json`: NaN refused) to `path`, atomically."""
    return write_atomic(path, to_json(payload, indent))


def regular_file(path: str | Path, what: str, error: type[SAEAcceptanceError] = OutputError) -> os.stat_result:
    """The status of `path`, which must be a regular file (a symlink to one is fine): a FIFO
    would hang a reader and a device (`/dev/zero`) never ends, so neither is opened."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such file, expected {what}") from None
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(status.st_mode):
        kind = "a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file (a pipe, socket or device)"
        raise error(f"{path}: {kind}, expected {what}")
    return status


def read_text(
    path: str | Path, what: str, limit: int = CONFIG_LIMIT, error: type[SAEAcceptanceError] = OutputError
) -> str:
    """A regular file of at most `limit` bytes, as UTF-8 text; anything else is one `error` naming
    the file and what it should have been."""
    path = Path(path)
    size = regular_file(path, what, error).st_size
    if size > limit:
        raise error(f"{path}: {size:,} bytes, above the {limit:,}-byte limit for {what}; refused unread")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}), expected {what}") from None


def read_json(
    path: str | Path, what: str, limit: int = CONFIG_LIMIT, error: type[SAEAcceptanceError] = OutputError
) -> Any:
    """Parse a JSON file, or one error naming the file, the line and `what` it should be."""
    text = read_text(path, what, limit, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: not valid JSON, expected {what} ({err.msg})") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to read as {what}; refused") from None


def npz_within(
    path: str | Path, what: str, limit: int = REPORT_LIMIT, error: type[SAEAcceptanceError] = OutputError
) -> None:
    """Refuse, before numpy unpacks it, an .npz whose members add up to more than `limit` bytes:
    a compressed member's size is whatever its header says, a few bytes can claim gigabytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):  # the reader says what is wrong with it
        return
    if total > limit:
        raise error(f"{path}: its arrays unpack to {total:,} bytes, above the {limit:,}-byte limit for {what}; refused")


def ignored_fields_note(path: str | Path, unknown: list[str]) -> str:
    """The note for fields a reader skipped: written by a newer version, most likely."""
    shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
    return f"{path}: ignored fields this version does not read ({shown}); written by a newer version?"


@contextlib.contextmanager
def locked(path: str | Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold `<path>.lock` while the block runs; give up after `timeout` seconds with one line."""
    lock_path = Path(str(Path(path).expanduser()) + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{lock_path.parent}: cannot create the folder ({err.strerror})") from None
    try:  # a path that cannot hold a lock file fails now, not after `timeout` of retries
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666))
    except OSError as err:
        raise OutputError(f"{lock_path}: cannot create a lock file there ({err.strerror})") from None
    lock = FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(f"{lock_path}: still locked after {timeout:.0f} s (another run holds it?)") from None
    except OSError as err:
        raise OutputError(f"{lock_path}: cannot lock ({err.strerror})") from None
    try:
        yield
    finally:
        lock.release()


def remove_lock(path: str | Path) -> None:
    """Remove `<path>.lock` once no other process of this run can still want it."""
    with contextlib.suppress(OSError):
        Path(str(Path(path).expanduser()) + ".lock").unlink()


def workspace_path(path: str | Path) -> str:
    """A path as CI systems name files (GitHub's annotations): relative to the working directory
    when inside it, else absolute."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()
