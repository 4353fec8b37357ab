"""The agent's settings: where its history and downloads live, queue, retries, consent.

Defaults follow Aspera Connect's preferences (3 concurrent transfers, 3 retries 30 s apart,
downloads into the user's Downloads folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import platformdirs

PORT_FIRST = 33003
PORT_LAST = 33022
AGENT_VERSION = "4.2.12.780"  # what info/version reports: a Connect 4.2 the SDK accepts

DialogMode = Literal["auto", "tk", "headless"]


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("slipstream-agent", appauthor=False))


def default_download_dir() -> Path:
    downloads = Path.home() / "Downloads"
    return downloads if downloads.is_dir() else Path.home()


@dataclass
class AgentConfig:
    """Everything the agent can be told; the CLI maps its options onto these fields."""

    data_dir: Path = field(default_factory=default_data_dir)
    download_dir: Path = field(default_factory=default_download_dir)
    host: str = "127.0.0.1"
    ports: tuple[int, int] = (PORT_FIRST, PORT_LAST)
    max_concurrent: int = 3
    retry_attempts: int = 3
    retry_interval: float = 30.0
    progress_interval: float = 0.5
    # Consent: folders any page may upload from without a dialog (an administrator's
    # choice), and, with no display, the folder the headless "dialogs" pick from.
    trusted_folders: list[Path] = field(default_factory=list)
    dialogs: DialogMode = "auto"
    headless_folder: Path | None = None
    drop_folders: list[Path] = field(default_factory=list)
    # Web pages allowed to use the Connect API (None: any origin, as Connect).
    allowed_origins: list[str] | None = None
    max_target_rate_kbps: int | None = None
    known_hosts: Path | None = None
    accept_new_host_keys: bool = True
    open_windows: bool | None = None  # None: only when a display is available
    read_limit: int = 64 << 20  # largest read-as-array-buffer answer, bytes

    @property
    def db_path(self) -> Path:
        return self.data_dir / "agent.sqlite3"

    def display_available(self) -> bool:
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))

    def uses_tk(self) -> bool:
        if self.dialogs == "headless":
            return False
        return self.dialogs == "tk" or self.display_available()

    def windows_enabled(self) -> bool:
        return self.display_available() if self.open_windows is None else self.open_windows
