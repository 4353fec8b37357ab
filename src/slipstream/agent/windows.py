"""The agent's "windows": its activity page in the user's browser, and a file manager.

Only with a display (or when configured); otherwise the window endpoints just answer.
"""

from __future__ import annotations

import logging
import os
import subprocess
import webbrowser

from slipstream.agent.config import AgentConfig

log = logging.getLogger("slipstream.agent")


class Windows:
    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self.base_url = ""
        self.opened: list[str] = []  # what was asked for, newest last (tests and logs)

    def open_page(self, fragment: str) -> None:
        url = f"{self.base_url}/#{fragment}" if fragment else f"{self.base_url}/"
        self.opened.append(url)
        if self._config.windows_enabled():
            webbrowser.open(url)

    def open_folder(self, path: str) -> None:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        self.opened.append(folder)
        if self._config.windows_enabled() and folder:
            try:
                subprocess.Popen(["xdg-open", folder], stdin=subprocess.DEVNULL)
            except OSError as exc:
                log.info("cannot open %s: %s", folder, exc)
