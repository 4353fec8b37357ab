"""The per-user folder for local sockets: running transfers' control sockets
(engine/livecontrol.py) and shared SSH logins (transport/shared.py)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeRunDir(OSError):
    """The folder exists but another user could reach into it."""


def user_runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/slipstream-UID``, else the same name under the temporary folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(tempfile.gettempdir())
    return base / f"slipstream-{os.getuid()}"


def private_runtime_dir() -> Path:
    """:func:`user_runtime_dir`, created 0700 if missing and refused (UnsafeRunDir) unless
    it is a real folder of ours that no one else can enter: in a shared /tmp another user
    could have created the name first."""
    path = user_runtime_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UnsafeRunDir(f"{path} is not a folder owned by this user")
    if info.st_mode & 0o077:
        raise UnsafeRunDir(f"{path} is open to other users (mode {info.st_mode & 0o777:o})")
    return path
