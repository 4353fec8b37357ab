"""The Connect HTTP API (``/v5/connect/...``) the official SDK speaks, on aiohttp.

Every answer is JSON and carries CORS headers, errors included, because the SDK reads only
the status and the body and treats anything it cannot read as "Connect is not there".
Bodies are JSON whatever the Content-Type (the SDK sends ``text/plain``). Paths are also
accepted without the ``/v5`` prefix and with ``/v6``, with or without a trailing slash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from slipstream.agent.config import AGENT_VERSION, AgentConfig
from slipstream.agent.consent import Consent, prepare_spec
from slipstream.agent.dialogs import Dialogs, describe
from slipstream.agent.errors import MissingAppId, OriginRefused, http_status
from slipstream.agent.files import FileService
from slipstream.agent.manager import TransferManager
from slipstream.agent.record import TransferRecord
from slipstream.agent.windows import Windows
from slipstream.engine.semantics import check_file_semantics
from slipstream.errors import ConnectError, SlipstreamError, UsageError
from slipstream.spec import ConnectSpec, TransferSpec, load_model, load_transfer_spec

log = logging.getLogger("slipstream.agent")

Handler = Callable[["Request"], Awaitable[Any]]
CONNECT_PATH = re.compile(r"^/(?:v[56]/)?connect/(?P<rest>.*?)/?$")


@dataclass
class Request:
    """What a handler needs from one call: its body, its page's app_id, the path's id."""

    body: dict[str, Any]
    match: dict[str, str]

    @property
    def app_id(self) -> str:
        settings = self.body.get("aspera_connect_settings")
        app_id = settings.get("app_id") if isinstance(settings, dict) else None
        if not app_id or not isinstance(app_id, str):
            raise MissingAppId()
        return app_id


def cors_headers(request: web.Request) -> dict[str, str]:
    headers = {
        "Access-Control-Allow-Origin": request.headers.get("Origin") or "*",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }
    if request.headers.get("Access-Control-Request-Private-Network") == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return headers


def json_response(request: web.Request, body: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body),
        status=status,
        content_type="application/json",
        headers=cors_headers(request),
    )


def error_response(request: web.Request, error: SlipstreamError) -> web.Response:
    return json_response(request, error.to_connect(), http_status(error))


class ConnectApi:
    def __init__(
        self,
        config: AgentConfig,
        manager: TransferManager,
        consent: Consent,
        dialogs: Dialogs,
        windows: Windows,
    ) -> None:
        self.config = config
        self.manager = manager
        self.consent = consent
        self.dialogs = dialogs
        self.windows = windows
        self.files = FileService(config, consent, dialogs)
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = [
            (method, re.compile(pattern + "$"), handler)
            for method, pattern, handler in self._table()
        ]

    def _table(self) -> list[tuple[str, str, Handler]]:
        uid = r"(?P<id>[^/]+)"
        return [
            ("GET", "info/ping", self.ping),
            ("GET", "info/version", self.version),
            ("POST", "update/require", self.update_require),
            ("POST", "transfers/start", self.start),
            ("POST", "transfers/activity", self.activity),
            ("POST", f"transfers/info/{uid}", self.info),
            ("POST", f"transfers/stop/{uid}", self.stop),
            ("POST", f"transfers/resume/{uid}", self.resume),
            ("POST", f"transfers/remove/{uid}", self.remove),
            ("POST", f"transfers/modify/{uid}", self.modify),
            ("POST", "info/authenticate", self.authenticate),
            ("POST", "info/ports", self.ports),
            ("POST", "windows/select-open-file-dialog", self.open_file_dialog),
            ("POST", "windows/select-open-folder-dialog", self.open_folder_dialog),
            ("POST", "windows/select-save-file-dialog", self.save_file_dialog),
            ("GET", "windows/about", self.show_about),
            ("GET", "windows/preferences", self.show_preferences),
            ("GET", r"windows/preferences/(?P<page>[^/]+)", self.show_preferences),
            ("GET", "windows/transfer-manager", self.show_manager),
            ("GET", f"windows/transfer-monitor/{uid}", self.show_monitor),
            ("GET", f"windows/finder/{uid}", self.show_finder),
            ("POST", "file/read-as-array-buffer", self.read_file),
            ("POST", "file/read-chunk-as-array-buffer", self.read_chunk),
            ("POST", "file/checksum", self.checksum),
            ("GET", "file/initialize-drag-drop", self.init_drag_drop),
            ("POST", "file/dropped-files", self.dropped_files),
        ]

    # --- dispatch --------------------------------------------------------------------

    def origin_allowed(self, request: web.Request) -> bool:
        allowed = self.config.allowed_origins
        origin = request.headers.get("Origin")
        return allowed is None or origin is None or origin in allowed

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            return json_response(request, {})
        try:
            if not self.origin_allowed(request):
                raise OriginRefused(f"Origin {request.headers.get('Origin')} is not allowed")
            handler, match = self._route(request)
            body = await _read_body(request) if request.method == "POST" else {}
            return json_response(request, await handler(Request(body, match)))
        except SlipstreamError as exc:
            return error_response(request, exc)
        except web.HTTPException as exc:
            return json_response(request, _plain_error(exc.reason, exc.status), exc.status)
        except Exception:
            log.exception("agent request %s %s failed", request.method, request.path)
            return error_response(request, SlipstreamError("Internal error in the agent"))

    def _route(self, request: web.Request) -> tuple[Handler, dict[str, str]]:
        found = CONNECT_PATH.match(request.path)
        rest = found.group("rest") if found else ""
        for method, pattern, handler in self.routes:
            match = pattern.match(rest)
            if match is None:
                continue
            if method != request.method:
                raise web.HTTPMethodNotAllowed(request.method, [method])
            return handler, match.groupdict()
        raise web.HTTPNotFound(reason=f"Unknown endpoint {request.path}")

    # --- info ------------------------------------------------------------------------

    async def ping(self, _req: Request) -> dict[str, Any]:
        return {}

    async def version(self, _req: Request) -> dict[str, Any]:
        return {"version": AGENT_VERSION, "system_wide": False}

    async def update_require(self, _req: Request) -> dict[str, Any]:
        return {}

    async def authenticate(self, req: Request) -> dict[str, Any]:
        from slipstream.transport.ssh import open_control_channel

        body = req.body
        if not body.get("remote_host"):
            raise UsageError("remote_host is required")
        channel = await open_control_channel(
            str(body["remote_host"]),
            int(body.get("ssh_port") or 33001),
            str(body.get("remote_user") or ""),
            password=body.get("remote_password"),
            known_hosts=self.config.known_hosts,
            sshfp=body.get("sshfp"),
            accept_new_host=self.config.accept_new_host_keys,
        )
        await channel.close()
        return {}

    async def ports(self, req: Request) -> dict[str, Any]:
        host = str(req.body.get("remote_host") or "")
        port = int(req.body.get("ssh_port") or 33001)
        timeout = float(req.body.get("timeout_sec") or 3)
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"Cannot reach {host} port {port}: {exc or 'timed out'}") from None
        writer.close()
        return {}

    # --- transfers -------------------------------------------------------------------

    async def start(self, req: Request) -> dict[str, Any]:
        app_id = req.app_id
        entries = req.body.get("transfer_specs")
        if not isinstance(entries, list) or not entries:
            raise UsageError("transfer_specs must be a non-empty list")
        prepared = [self._prepare(app_id, entry) for entry in entries]  # all or nothing
        out = []
        for spec, settings, explorer, scan in prepared:
            record = self.manager.add(app_id, spec, settings, explorer, scan)
            out.append(_start_output(record))
        return {"transfer_specs": out}

    def _prepare(
        self, app_id: str, entry: object
    ) -> tuple[dict[str, Any], dict[str, Any], str, list[str] | None]:
        if not isinstance(entry, dict) or not isinstance(entry.get("transfer_spec"), dict):
            raise UsageError("each element of transfer_specs needs a transfer_spec object")
        spec = load_transfer_spec(_connect_values(entry["transfer_spec"]))
        raw_settings = entry.get("aspera_connect_settings") or {}
        connect = load_model(ConnectSpec, raw_settings)
        settings = {**connect.to_json_dict(), **raw_settings, "app_id": app_id}
        if not spec.remote_host or not spec.paths:
            raise UsageError("transfer_spec needs remote_host and paths")
        _check_fields(spec, connect)
        body, explorer, sources = prepare_spec(self.consent, app_id, spec, connect)
        return body, settings, explorer, sources

    async def activity(self, req: Request) -> dict[str, Any]:
        token = req.body.get("iteration_token") or 0
        if isinstance(token, bool) or not isinstance(token, int | float):
            raise UsageError("iteration_token must be a number")
        return self.manager.activity(req.app_id, int(token))

    def _record(self, req: Request) -> TransferRecord:
        return self.manager.get(req.app_id, req.match["id"])

    async def info(self, req: Request) -> dict[str, Any]:
        return {"transfer_info": self._record(req).to_info()}

    async def stop(self, req: Request) -> dict[str, Any]:
        self.manager.stop(self._record(req))
        return {}

    async def resume(self, req: Request) -> dict[str, Any]:
        record = self._record(req)
        self.manager.resume(record, req.body)
        return {"transfer_spec": _start_output(record)}

    async def remove(self, req: Request) -> dict[str, Any]:
        record = self._record(req)
        self.manager.remove(record)
        return record.public_spec()

    async def modify(self, req: Request) -> dict[str, Any]:
        record = self._record(req)
        self.manager.modify(record, req.body)
        return record.public_spec()

    # --- dialogs ---------------------------------------------------------------------

    async def _dialog(self, req: Request, request: dict[str, Any], kind: str) -> dict[str, Any]:
        app_id = req.app_id
        paths = await self.dialogs.pick(request)
        for path in paths:
            self.consent.grant(app_id, path, kind)
        files = [describe(p, exists=kind != "save") for p in paths]
        return {"dataTransfer": {"files": files}}

    async def open_file_dialog(self, req: Request) -> dict[str, Any]:
        request = {
            "kind": "open-file",
            "title": req.body.get("title") or "Select files",
            "multiple": req.body.get("allowMultipleSelection", True),
            "filters": req.body.get("allowedFileTypes"),
        }
        return await self._dialog(req, request, "file")

    async def open_folder_dialog(self, req: Request) -> dict[str, Any]:
        request = {
            "kind": "open-folder",
            "title": req.body.get("title") or "Select a folder",
            "multiple": req.body.get("allowMultipleSelection", True),
        }
        return await self._dialog(req, request, "folder")

    async def save_file_dialog(self, req: Request) -> dict[str, Any]:
        request = {
            "kind": "save",
            "title": req.body.get("title") or "Save as",
            "suggested": req.body.get("suggestedName") or "",
            "filters": req.body.get("allowedFileTypes"),
        }
        return await self._dialog(req, request, "save")

    # --- windows ---------------------------------------------------------------------

    async def show_about(self, _req: Request) -> dict[str, Any]:
        self.windows.open_page("about")
        return {}

    async def show_preferences(self, req: Request) -> dict[str, Any]:
        self.windows.open_page(f"preferences/{req.match.get('page') or 'general'}")
        return {}

    async def show_manager(self, _req: Request) -> dict[str, Any]:
        self.windows.open_page("")
        return {}

    async def show_monitor(self, req: Request) -> dict[str, Any]:
        record = self.manager.get(None, req.match["id"])
        self.windows.open_page(f"transfer/{record.uuid}")
        return {}

    async def show_finder(self, req: Request) -> dict[str, Any]:
        record = self.manager.get(None, req.match["id"])
        self.windows.open_folder(record.explorer_path)
        return {}

    # --- files -----------------------------------------------------------------------

    async def read_file(self, req: Request) -> dict[str, Any]:
        return await self.files.read(req.app_id, req.body, chunk=False)

    async def read_chunk(self, req: Request) -> dict[str, Any]:
        return await self.files.read(req.app_id, req.body, chunk=True)

    async def checksum(self, req: Request) -> dict[str, Any]:
        return await self.files.checksum(req.app_id, req.body)

    async def init_drag_drop(self, _req: Request) -> dict[str, Any]:
        return {}

    async def dropped_files(self, req: Request) -> dict[str, Any]:
        return await self.files.dropped(req.app_id, req.body)


def _start_output(record: TransferRecord) -> dict[str, Any]:
    spec = record.public_spec()
    return {
        "transfer_spec": spec,
        "aspera_connect_settings": dict(record.connect_settings),
        "uuid": record.uuid,
        "tags": spec["tags"],
    }


def _connect_values(raw: dict[str, Any]) -> dict[str, Any]:
    """Connect's spellings the shared spec model does not know: the SDK's TypeScript types
    declare ``content_protection`` a boolean, meaning "encrypt" for an upload and "decrypt"
    for a download."""
    value = raw.get("content_protection")
    if not isinstance(value, bool):
        return raw
    spec = {k: v for k, v in raw.items() if k != "content_protection"}
    if value:
        upload = str(raw.get("direction", "")).strip().lower() == "send"
        spec["content_protection"] = "encrypt" if upload else "decrypt"
    return spec


def _check_fields(spec: TransferSpec, connect: ConnectSpec) -> None:
    """What the engine would refuse only once running, refused now: the page gets a
    Connect error object (400) instead of a transfer that fails."""
    check_file_semantics(spec, client=False)
    asks = connect.allow_dialogs  # else the agent asks the user when the transfer starts
    if spec.content_protection and not spec.content_protection_passphrase and not asks:
        raise UsageError(
            f"content_protection {spec.content_protection!r} needs "
            "content_protection_passphrase (allow_dialogs is false: the agent cannot ask)"
        )


def _plain_error(reason: str, status: int) -> dict[str, Any]:
    return {"error": {"code": status, "internal_message": reason, "user_message": reason}}


async def _read_body(request: web.Request) -> dict[str, Any]:
    text = await request.text()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"Invalid request: the body is not JSON ({exc.msg})") from None
    if not isinstance(body, dict):
        raise UsageError("Invalid request: the body must be a JSON object")
    return body
