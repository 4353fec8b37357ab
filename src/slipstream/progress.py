"""A rich progress bar fed by transfer events (bytes, rate, ETA, files)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)


class TerminalProgress:
    """Context manager: shows one bar for the session, updated from events."""

    def __init__(self) -> None:
        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[files]} files"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        self._task = self._progress.add_task("transfer", total=None, rate="", files=0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def on_event(self, event: dict[str, Any]) -> None:
        assert self._task is not None
        kind = event.get("type")
        if kind == "session_start":
            verb = "upload" if event.get("direction") == "send" else "download"
            self._progress.update(self._task, description=f"{verb} {event.get('host')}")
        elif kind == "progress":
            self._progress.update(
                self._task,
                completed=event["bytes"],
                total=event.get("bytes_expected") or None,
                rate=f"{event['rate_bps'] / 1e6:.1f} Mbit/s",
                files=event["files_done"],
            )
        elif kind == "file_error":
            error = event.get("error", {})
            self._console.print(
                f"[red]failed[/red] {event.get('path')}: {error.get('user_message', error)}"
            )
        elif kind == "session_done":
            self._progress.update(
                self._task,
                completed=event["bytes"],
                total=event["bytes"],
                files=event["files_done"],
            )
