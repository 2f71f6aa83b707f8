"""One writer per output folder: an exclusive lock file with its owner's pid and host.

`RunLock(out)` creates `out/.lock` atomically (O_CREAT | O_EXCL) holding {"pid", "host", "started",
"command"}. A second run on the same folder is refused with a ConfigError that names the owner. A lock
left by a dead process on this host (its pid no longer exists) is stale: it is moved aside and taken
over. A lock from another host cannot be checked from here: the message says how to remove it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from spd_jax.config import ConfigError

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.held = False

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}  # being written right now, or damaged

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released between our two looks: try again
                if not owner:  # unreadable: give its writer a moment
                    time.sleep(0.05)
                    owner = self._owner()
                    if owner is None:
                        continue
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    try:  # stale: move it aside (only one contender's rename succeeds), then try again
                        os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{pid}"))
                        print(f"note: removed the stale lock of dead process {pid} on {self.dir}", file=sys.stderr)
                    except FileNotFoundError:
                        pass
                    continue
                where = "this host" if host == me["host"] else f"host {host!r}"
                raise ConfigError(
                    f"{self.dir} is in use by another run (pid {pid} on {where}, started {owner.get('started')}: "
                    f"{owner.get('command', '?')}); wait for it, choose another --out, or, if that run is dead, "
                    f"delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"could not take the lock {self.path}: it changes hands too often")

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
