"""Small helpers shared across samunet: atomic writes, JSON, hashing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


class SamunetError(RuntimeError):
    """An error caused by the user's data or arguments; its message says what and where."""


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# temporary files are named ``.<name>.<pid>-<random>@<host>.tmp``: unique per writer, so two processes writing the
# same file never share one, and a sweep can tell a dead writer's leftovers from a running writer's file
_TEMP_RE = re.compile(r"^\..+\.(\d+)-[A-Za-z0-9_]+@(.+)\.tmp$")
STALE_FOREIGN_TEMP_S = 24 * 3600


def _temp_parts(name: str) -> tuple[str, str]:
    return f".{name}.{os.getpid()}-", f"@{socket.gethostname()}.tmp"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh, unique temporary name beside ``path`` (the file is not created)."""
    path = Path(path)
    prefix, suffix = _temp_parts(path.name)
    return path.with_name(f"{prefix}{os.urandom(4).hex()}{suffix}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike) -> int:
    """Remove temporary files left by writers that died (this host: the process is gone; another host: a day old).
    Files of running writers are kept. Returns the number removed."""
    removed = 0
    for p in Path(folder).glob(".*.tmp"):
        m = _TEMP_RE.match(p.name)
        try:
            if m and m.group(2) == socket.gethostname():
                stale = not process_alive(int(m.group(1)))
            else:  # another host, or a name from an older samunet
                stale = time.time() - p.stat().st_mtime > (STALE_FOREIGN_TEMP_S if m else 3600)
            if stale:
                p.unlink()
                removed += 1
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            pass
    return removed


def check_writable_folder(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, a folder that cannot be created or written (nothing is created here)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" ({probe} is a file)"
        raise SamunetError(f"{path}: {what} must be a folder, but it is or lies under a regular file{where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SamunetError(f"{path}: {what} cannot be written (no write permission on {probe})")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Open a temporary file beside ``path`` for binary writing; on success it is synced and renamed to ``path``,
    on failure removed. Readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_parts(path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; results get the usual mode, as open() would give
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def save_json(obj: Any, path: str | os.PathLike, sort_keys: bool = False) -> None:
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SamunetError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SamunetError(f"{path}: not valid JSON ({e})") from None


def json_matches(path: str | os.PathLike, obj: Any) -> bool:
    """Whether ``path`` holds exactly ``obj`` as JSON; a missing, unreadable or half-written file does not."""
    try:
        return Path(path).is_file() and load_json(path) == obj
    except (OSError, ValueError, SamunetError):
        return False


@contextlib.contextmanager
def atomic_memmap(path: str | os.PathLike, shape: tuple, dtype=np.float16):
    """A ``.npy`` array of ``shape`` memory-mapped under a temporary name beside ``path``, to be filled in place; on
    success it is flushed and renamed to ``path``, on failure removed. A large array never has to fit in RAM, and
    two writers of the same file never write into one."""
    tmp = temp_path(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        yield out
        out.flush()  # on disk before the rename (a mapped file may be renamed on POSIX; the caller's map stays valid)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash of a JSON-serialisable object that does not depend on dict ordering."""
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def single_threaded_worker() -> None:
    """Initializer for worker processes: one thread each, so N workers do not oversubscribe N cores."""
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
