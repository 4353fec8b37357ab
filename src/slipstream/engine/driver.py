"""What the two data-phase drivers share: the core they feed, the watch on its events, the
tasks they start, and how a failure becomes a typed error.

:class:`~slipstream.engine.send_driver.SendDriver` and
:class:`~slipstream.engine.recv_driver.RecvDriver` both build on :class:`Driver`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from slipstream.engine.blockio import os_error_to_slipstream
from slipstream.errors import PeerAborted, SlipstreamError, TransferTimeout

__all__ = ["INLINE_HASH_LIMIT", "CoreWatch", "Driver", "Emit", "as_error", "until_done_or_failed"]

INLINE_HASH_LIMIT = 256 << 10  # smaller files are finished on the event loop, no thread hop

Emit = Callable[[dict[str, Any]], None]


class CoreWatch:
    """Turns core events into a failure future the drivers can wait on."""

    def __init__(self) -> None:
        self.failed: asyncio.Future[SlipstreamError] = asyncio.get_running_loop().create_future()
        self.handshake: asyncio.Event = asyncio.Event()

    def on_event(self, event: Any) -> None:
        name = type(event).__name__
        if name == "HandshakeComplete":
            self.handshake.set()
        elif name == "Timeout":
            self.fail(TransferTimeout("No data from the peer: the transfer timed out"))
        elif name == "PeerClosed" and getattr(event, "code", None):
            self.fail(PeerAborted(f"The peer closed the session (code {event.code})"))
        elif name == "PathMtuFailed":
            from slipstream.errors import PathMtuError

            self.fail(PathMtuError(internal_message=f"{event.dgram_size}-byte datagrams lost"))

    def fail(self, error: SlipstreamError) -> None:
        if not self.failed.done():
            self.failed.set_result(error)


async def until_done_or_failed(work: Coroutine[Any, Any, None], watch: CoreWatch) -> None:
    """Run ``work`` until it ends, or until the core fails first (then raise its error)."""
    task = asyncio.ensure_future(work)
    waiting: set[asyncio.Future[Any]] = {task, watch.failed}
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise watch.failed.result()


def as_error(exc: BaseException, path: Path, action: str) -> SlipstreamError:
    """``exc`` as a typed error: ours unchanged, an OSError by its errno, anything else wrapped."""
    if isinstance(exc, SlipstreamError):
        return exc
    if isinstance(exc, OSError):
        error = os_error_to_slipstream(exc, path, action)
        if isinstance(error, SlipstreamError):
            return error
    return SlipstreamError(f"{action} {path.name}: {exc}")


class Driver:
    """What both drivers share: the core they feed, the endpoint step that sends, and the
    tasks they start (cancelled when the session ends)."""

    _core: Any
    _step: Callable[[], None]
    _watch: CoreWatch
    _tasks: set[asyncio.Task[None]]

    def attach(self, core: Any, step: Callable[[], None], watch: CoreWatch) -> None:
        self._core = core
        self._step = step
        self._watch = watch

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
