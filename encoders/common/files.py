"""Atomic writes: a file (or folder) appears under its name only once it is complete.

Every writer of the project goes through here: the content is written to a hidden temporary sibling
(`.NAME.tmp-XXXX`) and renamed into place, so an interrupted job never leaves a half-written file
that looks finished, and readers never see one. The result gets the permissions a plain `open()`
would have given it (0666 / 0777 minus the umask): temporary files are created private (0600), and
outputs that stayed that way could not be read by colleagues on a shared cluster.

    atomic_write_json(out / "settings.json", settings)
    atomic_write(out / "image.png", lambda tmp: image.save(tmp, format="PNG"))
    with atomic_directory(export_dir / "global_mapping") as tmp:
        model.save_pretrained(tmp)              # renamed to global_mapping/ when the block ends
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def _publish_permissions(path: Path) -> None:
    """Give a finished temporary file or folder tree the permissions an ordinary write would have."""
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            os.chmod(root, DIR_MODE)
            for name in files:
                os.chmod(os.path.join(root, name), FILE_MODE)
    else:
        os.chmod(path, FILE_MODE)


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_DISK_WORDS = (
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
    "Read-only file system",
    "ReadOnlyFilesystem",
)


def describe_write_error(err: BaseException) -> str | None:
    """ "no space left on device" (or the like) when `err` is a failed write of the disk's making, else None.

    Libraries report it in their own words (safetensors: "IoError(Os { code: 28, kind: StorageFull ..."),
    PIL and torch as OSError; all of them are recognised here so every command can say it in one line.
    """
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        return err.strerror or os.strerror(err.errno)
    text = str(err)
    for word in _DISK_WORDS:
        if word in text:
            return {"StorageFull": "No space left on device", "ReadOnlyFilesystem": "Read-only file system"}.get(
                word, word
            )
    cause = err.__cause__ or err.__context__
    return describe_write_error(cause) if cause is not None and cause is not err else None


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks (shard manifests, shipped model files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it to `path`; returns `path`.

    A full disk (or a folder that turned read-only) raises `OutputPathError` naming `path`; the
    temporary file is removed, and an older `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as err:
        raise OutputPathError(f"cannot write {path}: {describe_write_error(err) or err}") from err
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _publish_permissions(tmp)
        os.replace(tmp, path)
    except Exception as err:
        reason = describe_write_error(err)
        if reason is None:
            raise
        raise OutputPathError(f"cannot write {path}: {reason}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """JSON with a final newline; non-JSON values (paths, numpy scalars) become strings.

    Non-finite floats are refused (`allow_nan=False`): a bare `NaN` is not JSON and breaks readers.
    """
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=str, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `target`; when the block ends without error it replaces `target`.

    A folder that already exists at `target` is removed only once the new one is complete.
    On error the temporary folder is deleted and `target` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise OutputPathError(f"cannot write {target}: {describe_write_error(err) or err}") from err
    try:
        try:
            yield tmp
        except Exception as err:
            reason = describe_write_error(err)
            if reason is None:
                raise
            raise OutputPathError(f"cannot write {target}: {reason}") from err
        _publish_permissions(tmp)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names it and says why."""


def check_writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` (and its parents) if needed and prove a file can be written there, before any work.

    Raises `OutputPathError` naming `what` and the path when it is a file, read-only, or cannot be made.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputPathError(f"{what} {path} cannot be written: {err.strerror or err}") from err
    return path


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """`path` can be written as a file: not a folder, and its folder writable (made if needed)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder, not a file name")
    check_writable_folder(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    return path


class FolderLockedError(RuntimeError):
    """Another process holds the lock of an output folder; the message names the folder and the holder."""


@contextmanager
def folder_lock(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock file for as long as the block runs (released when the process dies).

    The file is opened without following links and must be a plain file: a lock name that a link
    points elsewhere would otherwise be truncated and overwritten. `what` names the job in the error
    that a second process gets (e.g. "a training run in runs/ti").
    """
    import fcntl
    import socket
    import stat
    import time

    lock_path = Path(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    except OSError as err:
        if os.path.islink(lock_path):
            raise OutputPathError(
                f"lock file {lock_path} is a symbolic link; remove it (it is not used for anything else)"
            ) from None
        raise OutputPathError(f"lock file {lock_path} cannot be opened: {err.strerror or err}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputPathError(f"lock file {lock_path} is not a plain file; remove it")
    handle = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = handle.read().strip() or "another process"
            raise FolderLockedError(
                f"{what} is already running ({holder}); wait for it to finish or use another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()
