"""One run at a time in a run folder (train.py's LOG_PATH, pretrain.py's DET_LOG_PATH).

A run owns its folder through ``run.lock`` in it, a JSON record of the owner: pid, host, start time
and command line. The file is created exclusively, so of two runs started into one folder at the
same moment one gets it and the other stops, naming the owner. A lock whose owner is a process of
this host that no longer exists (a run killed with SIGKILL, a machine that lost power) is stale: it
is taken over, with a message. A lock from another host cannot be checked and is left to the user.
Under torchrun only rank 0 takes the lock. The owner removes it when the run ends, however it ends.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from .config import ConfigError

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_owner(path: str) -> dict | None:
    """The record in lock file ``path``; None while it is being written, or when it is damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _describe(owner: dict) -> str:
    return (f"pid {owner['pid']} on host {owner.get('host', '?')}, started {owner.get('started', '?')}: "
            f"{owner.get('command', '?')}")


class RunLock:
    """The lock on ``folder`` (config key ``key``), taken by :meth:`acquire` and given back by
    :meth:`release` or on leaving a ``with`` block."""

    def __init__(self, folder: str, key: str):
        self.folder, self.key = folder, key
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False

    def acquire(self) -> "RunLock":
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise ConfigError(f"{self.key} {self.folder}: could not take {self.path}, other runs keep taking it; "
                          f"give this run another {self.key}")

    def _clear_stale(self) -> None:
        """Remove the lock file when its owner is gone; otherwise stop, naming the owner."""
        owner = _read_owner(self.path)
        if owner is None:  # perhaps being written this instant
            time.sleep(0.5)
            owner = _read_owner(self.path)
        if owner is None:
            if not os.path.exists(self.path):
                return
            raise ConfigError(f"{self.key} {self.folder} holds an unreadable lock file {self.path}; if no run is "
                              "writing into that folder, delete the file and start again")
        if owner.get("host") != socket.gethostname() or _alive(owner["pid"]):
            raise ConfigError(f"{self.key} {self.folder} is in use by another run ({_describe(owner)}); wait for "
                              f"it to end, or give this run another {self.key}. If that run is no longer running, "
                              f"delete {self.path}")
        print(f"warning: taking over {self.path}, left by a run that is no longer running ({_describe(owner)})",
              file=sys.stderr)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = _read_owner(self.path)
        if owner is not None and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
            os.remove(self.path)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
