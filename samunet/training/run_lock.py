"""One training run per fold at a time.

``RunLock(fold_folder)`` holds an exclusive ``fcntl`` lock on ``fold_folder/.run.lock`` while a run trains. The
file records who holds it (pid, host, start time, command), so a second run of the same fold is refused with a
message naming the running one. The operating system drops the lock when its process ends, however it ends, so a
lock left behind by a killed run never blocks the next one.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from samunet.utils import SamunetError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".run.lock"


def _describe(info: dict) -> str:
    if not info:
        return "another process (its lock file holds no details yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (f"pid {info.get('pid')} on host {info.get('host')}, started {started}"
            + (f" ({info['command']})" if info.get("command") else ""))


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class RunLock:
    def __init__(self, folder: str | os.PathLike, what: str = "training run"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SamunetError(f"{self.folder}: cannot create the run folder ({e.strerror or e})") from None
        if fcntl is None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise SamunetError(f"{self.path}: cannot create the lock file ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SamunetError(f"{self.folder}: another {self.what} of this fold is running: "
                                   f"{_describe(_read_info(self.path))}; wait for it to finish or stop it "
                                   f"(its lock is released when that process ends)") from None
            # the holder before us may have removed the file after we opened it: lock the file that is there now
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
