"""Where the official Connect SDK bundle (npm ``@ibm-aspera/connect-sdk-js``) is found.

It is never committed: ``.ci/run`` installs it into ``web/node_modules`` from the committed
``web/package.json``; the demo otherwise installs it with npm into the user's cache folder.
``SLIPSTREAM_CONNECT_SDK`` may point at the bundle (``connect-sdk.js``) or a folder holding
``node_modules``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import platformdirs

from slipstream.errors import ConfigError

SDK_PACKAGE = "@ibm-aspera/connect-sdk-js"
SDK_VERSION = "5.0.3"
BUNDLE = Path("node_modules", "@ibm-aspera", "connect-sdk-js", "dist", "js", "connect-sdk.js")
REPO_WEB = Path(__file__).resolve().parents[3] / "web"


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("slipstream", appauthor=False)) / "connect-sdk"


def candidates() -> list[Path]:
    found: list[Path] = []
    env = os.environ.get("SLIPSTREAM_CONNECT_SDK")
    if env:
        path = Path(env)
        found.append(path if path.suffix == ".js" else path / BUNDLE)
    return [*found, REPO_WEB / BUNDLE, cache_dir() / BUNDLE]


def find_sdk() -> Path | None:
    return next((path for path in candidates() if path.is_file()), None)


def install_sdk(folder: Path | None = None) -> Path:
    """``npm install`` the pinned SDK into ``folder`` (default: the cache); the bundle path."""
    folder = folder or cache_dir()
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError("npm is needed to install the Connect SDK (apt-get install npm)")
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        npm,
        "install",
        "--prefix",
        str(folder),
        "--no-package-lock",
        "--no-audit",
        "--no-fund",
        f"{SDK_PACKAGE}@{SDK_VERSION}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not (folder / BUNDLE).is_file():
        raise ConfigError(f"npm could not install {SDK_PACKAGE}: {done.stderr[-800:]}")
    return folder / BUNDLE


def ensure_sdk() -> Path:
    return find_sdk() or install_sdk()
