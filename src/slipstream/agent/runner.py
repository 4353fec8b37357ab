"""Runs one engine transfer on a thread of its own, so the agent's HTTP API stays responsive.

The engine is asyncio code; each run gets a private event loop on a worker thread. Events
come back to the agent's loop in order (``call_soon_threadsafe``), and so does the result.
``cancel`` and ``set_rate`` are marshalled the other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from slipstream.engine.job import ClientOptions, TransferResult, transfer
from slipstream.engine.livecontrol import RateControl
from slipstream.errors import SlipstreamError

OnEvent = Callable[[dict[str, Any]], None]
RATE_RETRY = 0.1  # seconds between tries to apply a change made before the data phase
log = logging.getLogger("slipstream.agent")


class TransferThread:
    def __init__(self, spec: dict[str, Any], on_event: OnEvent, options: ClientOptions) -> None:
        self._spec = spec
        self._on_event = on_event
        self._options = options
        self._control = RateControl()
        options.rate_control = self._control
        self._parent = asyncio.get_running_loop()
        self._outcome: asyncio.Future[TransferResult] = self._parent.create_future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[TransferResult] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="slipstream-transfer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def wait(self) -> TransferResult:
        """The result; raises the engine's error, or CancelledError after :meth:`cancel`."""
        return await asyncio.shield(self._outcome)

    def cancel(self) -> None:
        self._call(lambda: self._task.cancel() if self._task else None)

    def set_rate(self, change: dict[str, Any]) -> None:
        self._call(lambda: self._apply_rate(change))

    async def join(self) -> None:
        await asyncio.to_thread(self._thread.join)

    def _call(self, action: Callable[[], object]) -> None:
        self._started.wait()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to do
                self._loop.call_soon_threadsafe(action)

    # --- on the worker thread --------------------------------------------------------

    def _apply_rate(self, change: dict[str, Any]) -> None:
        """Apply now, or once the data phase starts (the handle is inactive before it)."""
        if self._task is None or self._task.done() or self._loop is None:
            return
        try:
            if not self._control.set_rate(**change):
                self._loop.call_later(RATE_RETRY, self._apply_rate, change)
        except SlipstreamError as exc:  # the agent checked first; the engine's word is final
            log.warning("live rate change refused: %s", exc)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(transfer(self._spec, self._emit, self._options))
            self._started.set()
            result = loop.run_until_complete(self._task)
            self._deliver(lambda: self._outcome.set_result(result))
        except asyncio.CancelledError:
            self._deliver(self._outcome.cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the agent's loop as is
            error = exc
            self._deliver(lambda: self._outcome.set_exception(error))
        finally:
            self._started.set()
            self._loop = None
            _close_loop(loop)

    def _emit(self, event: dict[str, Any]) -> None:
        self._deliver(lambda: self._on_event(dict(event)))

    def _deliver(self, action: Callable[[], object]) -> None:
        def guarded() -> None:
            with contextlib.suppress(asyncio.InvalidStateError):
                action()

        with contextlib.suppress(RuntimeError):  # the agent is shutting down
            self._parent.call_soon_threadsafe(guarded)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
