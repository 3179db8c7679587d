"""Small helpers shared across samunet: atomic writes, JSON, hashing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Open a temporary file beside ``path`` for binary writing; on success it is synced and renamed to ``path``,
    on failure removed. Readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
