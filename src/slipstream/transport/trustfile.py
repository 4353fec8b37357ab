"""Where Slipstream keeps the host keys it trusts (transport/ssh.py checks them).

Its own file, not ``~/.ssh/known_hosts``: Slipstream's trust decisions never edit the
user's OpenSSH files. A module of its own so that finding the file does not load asyncssh.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["KNOWN_HOSTS_ENV", "default_known_hosts_path"]

KNOWN_HOSTS_ENV = "SLIPSTREAM_KNOWN_HOSTS"


def default_known_hosts_path() -> Path:
    """``$SLIPSTREAM_KNOWN_HOSTS``, else ``<user config dir>/slipstream/known_hosts``."""
    env = os.environ.get(KNOWN_HOSTS_ENV)
    if env:
        return Path(env).expanduser()
    return platformdirs.user_config_path("slipstream") / "known_hosts"
