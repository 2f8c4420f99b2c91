"""Crash-safe file writes: a file is replaced whole or not at all.

Each file is written to a temporary sibling, flushed to disk (``fsync``), renamed over the
target (atomic on POSIX), and the directory is flushed so the rename itself survives a power
loss. The temporary file is created with mode ``0666 & ~umask``, exactly as ``open(path, "w")``
would create the target, so another user (a serving process) can read what was saved.
Temporaries of writers that died (``kill -9``) are removed by the next write in that folder.
"""

from __future__ import annotations

import os
import uuid

_TMP_MARK = ".lora_ext-tmp-"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms/filesystems cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str) -> None:
    """Delete temporaries left in ``folder`` by writers that no longer run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if _TMP_MARK not in name:
            continue
        try:
            pid = int(name.split(_TMP_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data``: after a crash at any moment ``path`` holds either its old
    content or ``data``, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
