"""The agent's transfers: queue, retries, stop / resume / remove / modify, and history.

Every change to a transfer bumps the store's iteration token, stamps the transfer with it
and saves it, so ``activity(token)`` can answer with only what changed. Status flow::

    initiating -> running -> completed | failed | willretry -> (queued) -> initiating ...
    queued (no free slot)      cancelled (stop)      removed (remove)

At most ``max_concurrent`` transfers run; a retryable failure waits ``retry_interval`` and
tries again, up to ``retry_attempts`` times. Transfers that were active when the agent
stopped are queued again when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid as uuidlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from slipstream.agent.config import AgentConfig
from slipstream.agent.consent import scan_size
from slipstream.agent.errors import InvalidState, TransferNotFound
from slipstream.agent.rates import plan_modify
from slipstream.agent.record import ACTIVE, FINISHED, WAITING, TransferRecord, split_secrets
from slipstream.agent.runner import TransferThread
from slipstream.agent.store import AgentStore
from slipstream.engine.job import ClientOptions, TransferResult
from slipstream.errors import SlipstreamError, UsageError
from slipstream.spec import TRANSFER_STATUS as ST
from slipstream.spec import load_transfer_spec

log = logging.getLogger("slipstream.agent")

RESUME_FIELDS = (
    "token",
    "cookie",
    "authentication",
    "remote_user",
    "remote_password",
    "content_protection_passphrase",
)
PasswordPrompt = Callable[[TransferRecord], Awaitable[str | None]]
# Once a transfer can no longer run, its credentials are dropped (failed and cancelled ones
# keep them: the page or the activity window may resume them).
FORGET_SECRETS = {ST.COMPLETED, ST.REMOVED}


class TransferManager:
    def __init__(self, config: AgentConfig, store: AgentStore) -> None:
        self.config = config
        self.store = store
        self.records: dict[str, TransferRecord] = {}
        self.password_prompt: PasswordPrompt | None = None
        self.passphrase_prompt: PasswordPrompt | None = None
        self._runs: dict[str, _Run] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._queue: deque[str] = deque()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closing = False

    # --- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Load the history; queue again whatever was active when the agent stopped."""
        legacy = False
        for row in self.store.load_all():
            record = TransferRecord.from_row(row)
            self.records[record.uuid] = record
            if split_secrets(row.get("spec") or {})[1]:  # written in clear by an old agent
                self.store.save(record.to_row())
                legacy = True
            if record.status in ACTIVE | WAITING:
                log.info("resuming interrupted transfer %s", record.uuid)
                self._queue.append(record.uuid)
        if legacy:
            self.store.compact()  # no clear copy left in free pages or the log
        self._pump()

    async def close(self) -> None:
        """Stop running work without changing its recorded state (it resumes next time)."""
        self._closing = True
        for handle in self._timers.values():
            handle.cancel()
        runs = list(self._runs.values())
        for run in runs:
            run.cancel()
        for run in runs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.join(), 10)
        for task in list(self._watchers):
            task.cancel()

    # --- queries -----------------------------------------------------------------------

    def get(self, app_id: str | None, uuid: str) -> TransferRecord:
        record = self.records.get(uuid)
        if record is None or (app_id is not None and record.app_id != app_id):
            raise TransferNotFound(f"No transfer {uuid!r} for this application")
        return record

    def activity(self, app_id: str | None, token: int) -> dict[str, Any]:
        """Transfers changed since ``token`` (all but removed ones for token 0)."""
        found = [
            record.to_info()
            for record in self.records.values()
            if (app_id is None or record.app_id == app_id)
            and record.token > token
            and (token > 0 or record.status != ST.REMOVED)
        ]
        return {"iteration_token": self.store.token, "result_count": len(found), "transfers": found}

    # --- commands --------------------------------------------------------------------

    def add(
        self,
        app_id: str,
        spec: dict[str, Any],
        settings: dict[str, Any],
        explorer_path: str,
        scan: list[str] | None = None,
    ) -> TransferRecord:
        public, hidden = split_secrets(spec)
        record = TransferRecord(
            uuid=str(uuidlib.uuid4()),
            app_id=app_id,
            seq=self.store.next_seq(),
            spec=public,
            secrets=hidden,
            connect_settings=settings,
            explorer_path=explorer_path,
        )
        self.records[record.uuid] = record
        self._save(record)
        self._queue.append(record.uuid)
        self._pump()
        if scan:
            self._spawn(self._scan(record, scan))
        return record

    def stop(self, record: TransferRecord) -> None:
        if record.status == ST.REMOVED:
            raise InvalidState("The transfer was removed")
        if record.status in FINISHED:
            return
        self._halt(record)
        self._set(record, ST.CANCELLED)

    def resume(self, record: TransferRecord, changes: dict[str, Any]) -> None:
        if record.status in (ST.REMOVED, ST.COMPLETED):
            raise InvalidState(f"A {record.status} transfer cannot be resumed")
        given = {k: changes[k] for k in RESUME_FIELDS if changes.get(k) is not None}
        if given:
            # Checked like a new spec (a wrong type is a 400 now, not a failed run later).
            checked = load_transfer_spec({**record.engine_spec(), **given}).to_json_dict()
            public, hidden = split_secrets({k: checked[k] for k in given if k in checked})
            record.spec.update(public)
            record.secrets.update(hidden)
        if record.status in ACTIVE:
            self._save(record)
            return
        self._halt(record)
        record.attempts = 0
        record.error = None
        self._set(record, ST.QUEUED)
        self._queue.append(record.uuid)
        self._pump()

    def remove(self, record: TransferRecord) -> None:
        self._halt(record)
        self._set(record, ST.REMOVED)

    def modify(self, record: TransferRecord, body: dict[str, Any]) -> None:
        if record.status in FINISHED:
            raise InvalidState(f"A {record.status} transfer cannot be modified")
        updates, live = plan_modify(record.spec, body, self.config.max_target_rate_kbps)
        record.spec.update(updates)
        run = self._runs.get(record.uuid)
        if run is not None and live:
            run.set_rate(live)
        self._save(record)

    # --- scheduling ------------------------------------------------------------------

    def _pump(self) -> None:
        if self._closing:
            return
        while self._queue and len(self._runs) < self.config.max_concurrent:
            record = self.records[self._queue.popleft()]
            if record.status not in FINISHED:
                self._launch(record)
        for uuid in self._queue:
            record = self.records[uuid]
            if record.status != ST.QUEUED:
                self._set(record, ST.QUEUED)

    def _launch(self, record: TransferRecord) -> None:
        record.attempts += 1
        record.reset_progress()
        self._set(record, ST.INITIATING)
        options = ClientOptions(
            progress_interval=self.config.progress_interval,
            known_hosts=self.config.known_hosts,
            accept_new_host=self.config.accept_new_host_keys,
        )
        self._runs[record.uuid] = run = _PendingRun()
        self._spawn(self._run(record, options, run))

    async def _run(self, record: TransferRecord, options: ClientOptions, slot: _PendingRun) -> None:
        current: _Run = slot
        try:
            spec = await self._credentials(record)
            if slot.cancelled:
                return
            thread = TransferThread(spec, lambda e: self._on_event(record, e), options)
            self._runs[record.uuid] = current = thread
            thread.start()
            result = await thread.wait()
        except asyncio.CancelledError:
            if self._closing:
                raise
        except SlipstreamError as exc:
            self._on_failure(record, exc)
        except Exception as exc:  # a bug: report it on the transfer, keep the agent alive
            log.exception("transfer %s crashed", record.uuid)
            self._on_failure(record, SlipstreamError(internal_message=repr(exc)))
        else:
            self._on_result(record, result)
        finally:
            if self._runs.get(record.uuid) is current:
                del self._runs[record.uuid]
            self._pump()

    async def _credentials(self, record: TransferRecord) -> dict[str, Any]:
        """The engine's spec; what the page left out is asked for in a dialog (as Connect
        does), used for this attempt only: a wrong answer is asked again on resume."""
        spec = record.engine_spec()
        needs = spec.get("authentication") != "token" and not any(
            spec.get(k) for k in ("remote_password", "ssh_private_key", "ssh_private_key_path")
        )
        allowed = record.connect_settings.get("allow_dialogs", True)
        if needs and allowed and self.password_prompt is not None:
            password = await self.password_prompt(record)
            if password:
                spec["remote_password"] = password
        if spec.get("content_protection") and not spec.get("content_protection_passphrase"):
            asked = self.passphrase_prompt if allowed else None
            passphrase = await asked(record) if asked is not None else None
            if not passphrase:
                raise UsageError(
                    f"content_protection {spec['content_protection']!r} needs "
                    "content_protection_passphrase, and none was given"
                )
            spec["content_protection_passphrase"] = passphrase
        return spec

    def _halt(self, record: TransferRecord) -> None:
        run = self._runs.get(record.uuid)
        if run is not None:
            run.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(record.uuid)
        timer = self._timers.pop(record.uuid, None)
        if timer is not None:
            timer.cancel()

    def _retry(self, uuid: str) -> None:
        self._timers.pop(uuid, None)
        record = self.records[uuid]
        if record.status == ST.WILLRETRY:
            self._queue.append(uuid)
            self._pump()

    # --- outcomes --------------------------------------------------------------------

    def _on_event(self, record: TransferRecord, event: dict[str, Any]) -> None:
        if record.status not in (ST.INITIATING, ST.RUNNING) or self._closing:
            return
        if event.get("type") == "session_start":
            record.set_status(ST.RUNNING)
        record.apply_event(event)
        if event.get("type") != "error":
            self._save(record)

    def _on_result(self, record: TransferRecord, result: TransferResult) -> None:
        if record.status not in (ST.INITIATING, ST.RUNNING):
            return
        record.bytes_written = max(record.bytes_written, result.totals.bytes_files)
        record.bytes_expected = max(record.bytes_expected, record.bytes_written)
        record.transport = result.transport
        if result.ok:
            self._set(record, ST.COMPLETED)
            return
        errors = result.totals.errors
        record.error = dict(errors[0]) if errors else {"code": 1}
        record.error["user_message"] = (
            f"{result.totals.files_failed} file(s) failed: "
            f"{record.error.get('user_message', 'see the transfer log')}"
        )
        self._set(record, ST.FAILED)

    def _on_failure(self, record: TransferRecord, error: SlipstreamError) -> None:
        if record.status not in (ST.INITIATING, ST.RUNNING):
            return
        record.error = error.to_dict()
        log.info("transfer %s attempt %d failed: %s", record.uuid, record.attempts, error)
        if error.retryable and record.attempts <= self.config.retry_attempts:
            self._set(record, ST.WILLRETRY)
            loop = asyncio.get_running_loop()
            self._timers[record.uuid] = loop.call_later(
                self.config.retry_interval, self._retry, record.uuid
            )
            return
        self._set(record, ST.FAILED)

    async def _scan(self, record: TransferRecord, paths: list[str]) -> None:
        size = await asyncio.to_thread(scan_size, paths)
        if size > record.bytes_expected and record.status != ST.REMOVED:
            record.bytes_expected = size
            self._save(record)

    # --- bookkeeping -----------------------------------------------------------------

    def _set(self, record: TransferRecord, status: str) -> None:
        record.set_status(status)
        if status in FORGET_SECRETS:
            record.secrets.clear()
        self._save(record)

    def _save(self, record: TransferRecord) -> None:
        record.touch()
        record.token = self.store.next_token()
        self.store.save(record.to_row())

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)


class _Run(Protocol):
    def cancel(self) -> None: ...
    def set_rate(self, change: dict[str, Any]) -> None: ...
    async def join(self) -> None: ...


class _PendingRun:
    """Holds a slot while credentials are being asked for; stop() can still cancel it."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def set_rate(self, change: dict[str, Any]) -> None:
        """Nothing runs yet: the spec already carries the change."""

    async def join(self) -> None:
        return None
