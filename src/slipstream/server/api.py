"""The server's REST API (a subset of the Aspera Node API), for web application backends.

A web application never holds transfer passwords: its backend logs in here (an API user
or an access key, HTTP basic auth), asks ``/files/upload_setup`` or ``/files/download_setup``
for a transfer spec carrying a token bound to exactly that transfer, and hands the spec to
the browser's agent. Endpoints:

* ``GET /info``: version, transfer user, ports, capabilities;
* ``POST /files/browse`` ``{path, count, skip}``: a folder listing inside the caller's root;
* ``POST /files/upload_setup`` / ``download_setup``: transfer specs with tokens;
* ``GET /ops/transfers`` (``?iteration_token=N&count=M``), ``GET /ops/transfers/{id}``: the
  server's records; ``POST /ops/transfers``: a transfer the server itself runs.

An API user acts for a transfer user (its docroot); an access key for a folder below it.
Every path in a request is relative to that root and confined to it, symbolic links
included, before anything is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from slipstream import __version__
from slipstream.engine.paths import resolve_in_docroot
from slipstream.errors import (
    AuthenticationError,
    DocrootViolation,
    PermissionDenied,
    SlipstreamError,
    SourceNotFound,
    UsageError,
)
from slipstream.protocol.crypto import cipher_names
from slipstream.protocol.rate import rate_controller_names
from slipstream.server.config import UserConfig
from slipstream.server.http_common import (
    basic_credentials,
    error_middleware,
    json_body,
    start_sites,
)
from slipstream.server.ops import Tracked
from slipstream.server.passwords import verify_password
from slipstream.server.services import ServerServices
from slipstream.spec import TransferSpec, load_transfer_spec

log = logging.getLogger("slipstream.server.api")

AUTH_CACHE_SECONDS = 300.0  # a verified login is remembered: scrypt costs ~50 ms a check
MAX_BROWSE_COUNT = 1000
MAX_OPS_COUNT = 1000
# Spec fields the server decides: a setup request cannot choose whom or how to log in.
_SERVER_FIELDS = frozenset(
    {
        "direction",
        "remote_host",
        "remote_user",
        "remote_password",
        "authentication",
        "token",
        "ssh_port",
        "fasp_port",
        "sshfp",
        "ssh_private_key",
        "ssh_private_key_path",
        "ssh_private_key_passphrase",
        "https_fallback_fingerprint",
    }
)
_REQUEST_ONLY = frozenset({"token_life_seconds"})


@dataclass(frozen=True)
class Principal:
    """Who called: an API user or an access key, acting for ``user`` below ``root``."""

    name: str
    kind: str  # "api_user" | "access_key"
    user: UserConfig
    root: str  # docroot-relative, "/" for the whole docroot

    @property
    def root_path(self) -> Path:
        return resolve_in_docroot(self.user.docroot, self.root, must_exist=True)

    def join(self, path: str) -> str:
        """``path`` (relative to the root) as a path relative to the transfer user's docroot.
        ``..`` may not climb out of the root, even lexically."""
        parts: list[str] = [p for p in self.root.split("/") if p not in ("", ".")]
        floor = len(parts)
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part != "..":
                parts.append(part)
            elif len(parts) > floor:
                parts.pop()
            else:
                raise DocrootViolation(f"Path {path!r} leads outside your root folder")
        return "/" + "/".join(parts)

    def shown(self, docroot_path: str) -> str:
        """A docroot-relative path as the caller sees it (relative to its root)."""
        root = self.root.rstrip("/")
        rest = docroot_path[len(root) :] if root and docroot_path.startswith(root) else docroot_path
        return rest or "/"


class RestApi:
    def __init__(self, services: ServerServices) -> None:
        self.services = services
        self.config = services.config
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        self._slots = asyncio.Semaphore(2)
        self._jobs: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        app.add_routes(
            [
                web.get("/info", self.info),
                web.post("/files/browse", self.browse),
                web.post("/files/upload_setup", self.upload_setup),
                web.post("/files/download_setup", self.download_setup),
                web.get("/ops/transfers", self.list_transfers),
                web.post("/ops/transfers", self.start_transfer),
                web.get("/ops/transfers/{id}", self.get_transfer),
            ]
        )
        app.on_cleanup.append(self._cancel_jobs)
        return app

    # --- authentication ------------------------------------------------------------------

    async def principal(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        key = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        credentials = basic_credentials(header)
        if credentials is None:
            raise AuthenticationError("This API needs basic authentication (API user or key)")
        principal = await self._check(*credentials)
        if principal is None:
            raise AuthenticationError("Authentication failed: check the API user or access key")
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[key] = (principal, time.monotonic() + AUTH_CACHE_SECONDS)
        return principal

    async def _check(self, name: str, secret: str) -> Principal | None:
        found = next((u for u in self.config.api_users if u.name == name), None)
        if found is not None:
            if await self._verify(secret, found.password_hash):
                return Principal(name, "api_user", self._user(found.transfer_user), "/")
            return None
        key = next((k for k in self.config.access_keys if k.id == name), None)
        if key is not None and await self._verify(secret, key.secret_hash):
            root = "/" + "/".join(p for p in key.root.split("/") if p not in ("", "."))
            return Principal(name, "access_key", self._user(key.transfer_user), root)
        return None

    async def _verify(self, secret: str, stored: str) -> bool:
        async with self._slots:  # scrypt is memory-hungry: a few at a time
            return await asyncio.to_thread(verify_password, secret, stored)

    def _user(self, name: str) -> UserConfig:
        user = self.config.user(name)
        if user is None:  # the config loader checks this; a reload race is the only way
            raise AuthenticationError(f"Transfer user {name!r} no longer exists")
        return user

    # --- /info -------------------------------------------------------------------------------

    async def info(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        services, user = self.services, who.user
        tls = services.tls
        return web.json_response(
            {
                "server": "slipstream",
                "version": __version__,
                "current_time": _iso(time.time()),
                "transfer_user": user.name,
                "caller": {"name": who.name, "kind": who.kind, "root": who.root},
                "ssh_port": services.ports.get("ssh_port"),
                "fasp_port": services.ports.get("fasp_port"),
                "sshfp": services.sshfp,
                "https_fallback_port": services.fallback_port,
                "https_fallback_fingerprint": tls.fingerprint if tls else None,
                "capabilities": {
                    "upload": user.write,
                    "download": user.read,
                    "browse": user.browse,
                    "token_authentication": True,
                    "http_fallback": services.fallback_port is not None,
                    "ops_transfers": True,
                    "ciphers": cipher_names(),
                    "rate_policies": rate_controller_names(),
                },
                "settings": {"token_life_seconds": services.codec.life_seconds},
            }
        )

    # --- /files/browse ------------------------------------------------------------------------

    async def browse(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        if not who.user.browse:
            raise PermissionDenied(f"User {who.user.name} may not browse")
        body = await json_body(request)
        path = str(body.get("path") or "/")
        count = _int(body, "count", 100, 1, MAX_BROWSE_COUNT)
        skip = _int(body, "skip", 0, 0, 1 << 31)
        target = resolve_in_docroot(who.root_path, path, must_exist=True)
        return web.json_response(await asyncio.to_thread(_listing, who, target, count, skip))

    # --- setup --------------------------------------------------------------------------------

    async def upload_setup(self, request: web.Request) -> web.Response:
        return await self._setup(request, "send")

    async def download_setup(self, request: web.Request) -> web.Response:
        return await self._setup(request, "receive")

    async def _setup(self, request: web.Request, direction: str) -> web.Response:
        who = await self.principal(request)
        body = await json_body(request)
        requests = body.get("transfer_requests")
        if not isinstance(requests, list) or not requests:
            raise UsageError("transfer_requests: a non-empty list is required")
        host = self.config.api.public_host or request.url.host or self.config.listen
        answers = []
        for item in requests:
            try:
                spec = self._spec_for(who, item, direction, host)
                answers.append({"transfer_spec": spec})
            except SlipstreamError as exc:
                answers.append({"error": {**exc.to_dict(), "reason": exc.user_message}})
        return web.json_response({"transfer_specs": answers})

    def _spec_for(self, who: Principal, item: Any, direction: str, host: str) -> dict[str, Any]:
        req = item.get("transfer_request", item) if isinstance(item, dict) else None
        if not isinstance(req, dict):
            raise UsageError("Each transfer_requests entry is {transfer_request: {...}}")
        user = who.user
        if direction == "send" and not user.write:
            raise PermissionDenied(f"User {user.name} may not upload")
        if direction == "receive" and not user.read:
            raise PermissionDenied(f"User {user.name} may not download")
        body = {k: v for k, v in req.items() if k not in _SERVER_FIELDS | _REQUEST_ONLY}
        body.update(self._server_fields(who, direction, host, req))
        if direction == "send":
            dest = str(req.get("destination_root") or "/")
            resolve_in_docroot(who.root_path, dest)  # containment, links included
            body["destination_root"] = who.join(dest)
        else:
            self._check_sources(who, req)
            if req.get("source_root") or who.root != "/":
                body["source_root"] = who.join(str(req.get("source_root") or "/"))
        # An upload's files are the browser's, chosen later: the agent fills in `paths`.
        placeholder = direction == "send" and not body.get("paths")
        spec = load_transfer_spec({**body, "paths": [{"source": "."}]} if placeholder else body)
        life = _int(req, "token_life_seconds", self.services.codec.life_seconds, 60, None)
        life = min(life, self.services.codec.life_seconds)
        token = self.services.codec.issue_for_spec(
            spec, user.name, life_seconds=life, issuer=f"{who.kind}:{who.name}"
        )
        answer = spec.to_json_dict()
        if placeholder:
            del answer["paths"]
        return {**answer, "token": token}

    def _server_fields(
        self, who: Principal, direction: str, host: str, req: dict[str, Any]
    ) -> dict[str, Any]:
        services = self.services
        tags = dict(req.get("tags") or {}) if isinstance(req.get("tags"), dict) else {}
        aspera = dict(tags.get("aspera") or {}) if isinstance(tags.get("aspera"), dict) else {}
        # The record id of the transfer-to-be, so the application can follow it in /ops.
        aspera["xfer_id"] = str(uuid.uuid4())
        tags["aspera"] = aspera
        fields: dict[str, Any] = {
            "direction": direction,
            "remote_host": host,
            "remote_user": who.user.name,
            "authentication": "token",
            "ssh_port": services.ports.get("ssh_port"),
            "fasp_port": services.ports.get("fasp_port"),
            "sshfp": services.sshfp,
            "tags": tags,
        }
        fields.update(_rate_fields(who.user, req))
        if services.fallback_port is not None and services.tls is not None:
            fields["http_fallback"] = req.get("http_fallback", True)
            fields["https_fallback_port"] = services.fallback_port
            fields["https_fallback_fingerprint"] = services.tls.fingerprint
        return fields

    def _check_sources(self, who: Principal, req: dict[str, Any]) -> None:
        paths = req.get("paths")
        if not isinstance(paths, list) or not paths:
            raise UsageError("paths: a download needs at least one source")
        root = str(req.get("source_root") or "")
        for item in paths:
            source = item.get("source") if isinstance(item, dict) else item
            if not isinstance(source, str) or not source:
                raise UsageError("paths: every entry needs a source")
            full = f"{root}/{source}" if root else source
            who.join(full)  # no climbing out of the root, even lexically
            resolve_in_docroot(who.root_path, full, must_exist=True)

    # --- /ops/transfers -------------------------------------------------------------------------

    async def list_transfers(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        after = _int(dict(request.query), "iteration_token", 0, 0, None)
        count = _int(dict(request.query), "count", 100, 1, MAX_OPS_COUNT)
        records, token, more = self.services.ops.list(after=after, count=count, user=who.user.name)
        headers = {"X-Aspera-Next-Iteration-Token": str(token)} if more else {}
        return web.json_response(
            {
                "transfers": [r.to_json() for r in records],
                "iteration_token": token,
                "result_count": len(records),
                "more": more,
            },
            headers=headers,
        )

    async def get_transfer(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        record = self.services.ops.get(request.match_info["id"])
        if record is None or record.user != who.user.name:
            raise SourceNotFound("No such transfer")
        return web.json_response(record.to_json())

    async def start_transfer(self, request: web.Request) -> web.Response:
        """A transfer this server runs as a client, its local side in the caller's root."""
        who = await self.principal(request)
        body = await json_body(request)
        spec = load_transfer_spec(body.get("transfer_spec", body))
        if not spec.remote_host:
            raise UsageError("remote_host: the server to transfer with is required")
        if spec.direction == "send" and not who.user.read:
            raise PermissionDenied(f"User {who.user.name} may not read files to send")
        if spec.direction == "receive" and not who.user.write:
            raise PermissionDenied(f"User {who.user.name} may not write received files")
        root = who.root_path
        tracked = self.services.ops.start(
            user=who.user.name,
            peer=f"{spec.remote_host}:{spec.ssh_port}",
            spec=spec,
            transport="fasp",
            initiator="server",
        )
        task = asyncio.get_running_loop().create_task(self._run_job(spec, root, tracked))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return web.json_response(tracked.record.to_json(), status=200)

    async def _run_job(self, spec: TransferSpec, root: Path, tracked: Tracked) -> None:
        from slipstream.engine.job import ClientOptions, transfer

        def on_event(event: dict[str, Any]) -> None:
            if event.get("type") == "session_start" and event.get("transport"):
                tracked.session.transport = tracked.record.transport = str(event["transport"])
            tracked.file_event(event)

        options = ClientOptions(
            cwd=root,
            docroot=root,
            known_hosts=self.config.state_dir / "known_hosts",
        )
        try:
            await transfer(spec, on_event, options)
        except SlipstreamError as exc:
            tracked.finish(exc)
            return
        except Exception as exc:
            log.exception("server-initiated transfer %s failed", tracked.id)
            tracked.finish(SlipstreamError(f"Internal error: {type(exc).__name__}"))
            return
        tracked.finish(None)

    async def _cancel_jobs(self, _app: web.Application) -> None:
        for task in list(self._jobs):
            task.cancel()


# --- helpers ----------------------------------------------------------------------------------


def _rate_fields(user: UserConfig, req: dict[str, Any]) -> dict[str, Any]:
    """The transfer user's rate caps (server/rate_policy.py), as the spec tells the client;
    the server enforces them whatever the client sends."""
    rate = getattr(user, "rate", None)
    fields: dict[str, Any] = {}
    if rate is None:
        return fields
    if rate.target_rate_cap_kbps:
        fields["target_rate_cap_kbps"] = rate.target_rate_cap_kbps
    if rate.min_rate_cap_kbps is not None:
        fields["min_rate_cap_kbps"] = rate.min_rate_cap_kbps
    if rate.target_rate_default_kbps and "target_rate_kbps" not in req:
        fields["target_rate_kbps"] = rate.target_rate_default_kbps
    return fields


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _int(body: dict[str, Any], key: str, default: int, low: int, high: int | None) -> int:
    value = body.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}: must be an integer, got {value!r}") from None
    if isinstance(value, bool) or number < low or (high is not None and number > high):
        top = f"..{high}" if high is not None else " or more"
        raise UsageError(f"{key}: must be {low}{top}, got {value!r}")
    return number


def _listing(who: Principal, target: Path, count: int, skip: int) -> dict[str, Any]:
    """A Node-API-like listing: ``self`` and one page of ``items``, sorted by name."""
    root = who.root_path
    info = _item(root, target, os.stat(target))
    if info["type"] != "directory":
        return {"self": info, "items": [], "item_count": 0, "total_count": 0}
    with os.scandir(target) as it:
        entries = sorted(it, key=lambda e: e.name)
    page = []
    for entry in entries[skip : skip + count]:
        try:
            page.append(_item(root, Path(entry.path), entry.stat(follow_symlinks=False)))
        except OSError:
            continue  # vanished while listing
    return {"self": info, "items": page, "item_count": len(page), "total_count": len(entries)}


def _item(root: Path, path: Path, st: os.stat_result) -> dict[str, Any]:
    rel = os.path.relpath(path, root)
    kind = (
        "directory"
        if stat.S_ISDIR(st.st_mode)
        else "file"
        if stat.S_ISREG(st.st_mode)
        else "symbolic_link"
        if stat.S_ISLNK(st.st_mode)
        else "other"
    )
    return {
        "path": "/" if rel == "." else "/" + rel,
        "basename": "" if rel == "." else path.name,
        "type": kind,
        "size": st.st_size if kind == "file" else 0,
        "mtime": _iso(st.st_mtime),
        "permissions": oct(stat.S_IMODE(st.st_mode))[2:],
    }


# --- starting --------------------------------------------------------------------------------


async def start_http_services(
    services: ServerServices,
) -> tuple[list[web.AppRunner], dict[str, Any]]:
    """Start the HTTPS fallback and the REST API as configured; returns their runners and
    what ``slipstream serve`` prints about them."""
    from slipstream.server.fallback import FallbackServer

    config, tls = services.config, services.tls
    runners: list[web.AppRunner] = []
    info: dict[str, Any] = {}
    try:
        if config.http_fallback.enabled and tls is not None:
            runner, ports = await start_sites(
                FallbackServer(services).app(),
                config.listen,
                [(config.http_fallback.port, tls.context)],
            )
            runners.append(runner)
            services.ports["fallback_port"] = ports[0]
            info.update(fallback_port=ports[0], https_fallback_fingerprint=tls.fingerprint)
        if config.api.enabled and tls is not None:
            sites: list[tuple[int, ssl.SSLContext | None]] = [(config.api.https_port, tls.context)]
            if config.api.http_port is not None:
                sites.append((config.api.http_port, None))
            runner, ports = await start_sites(RestApi(services).app(), config.listen, sites)
            runners.append(runner)
            host = _url_host(_client_host(config.listen))
            info.update(api_port=ports[0], api_url=f"https://{host}:{ports[0]}")
            info["api_fingerprint"] = tls.fingerprint
            if len(ports) > 1:
                info["api_http_url"] = f"http://{host}:{ports[1]}"
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners, info


def _client_host(listen: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen, listen)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
