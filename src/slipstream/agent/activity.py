"""The activity page: every transfer of every page, live, with stop / resume / remove.

It is for the person at this computer, so unlike the Connect API it is same-origin only:
its API answers only requests whose Host is the agent's own loopback address (no DNS
rebinding) and that carry the key embedded in the page (no cross-site requests).
"""

from __future__ import annotations

import json
import secrets
from importlib import resources
from typing import Any

from aiohttp import web

from slipstream.agent.errors import http_status
from slipstream.agent.manager import TransferManager
from slipstream.errors import SlipstreamError, UsageError

KEY_HEADER = "X-Slipstream-Key"
STATIC = ("activity.js", "activity.css")


def _static(name: str) -> str:
    return resources.files("slipstream.agent").joinpath("static", name).read_text("utf-8")


class ActivityPage:
    def __init__(self, manager: TransferManager) -> None:
        self.manager = manager
        self.key = secrets.token_urlsafe(24)
        self.port = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        for name in STATIC:
            app.router.add_get(f"/{name}", self.asset)
        app.router.add_get("/activity/api/transfers", self.transfers)
        app.router.add_post("/activity/api/transfers/{uuid}/{action}", self.action)

    def _same_origin(self, request: web.Request) -> bool:
        hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        origin = request.headers.get("Origin")
        return request.host in hosts and (
            origin is None or origin in {f"http://{h}" for h in hosts}
        )

    def _answer(self, request: web.Request, body: Any, status: int = 200) -> web.Response:
        headers = {"Access-Control-Allow-Origin": f"http://{request.host}", "Vary": "Origin"}
        return web.json_response(body, status=status, headers=headers)

    def _check(self, request: web.Request, *, keyed: bool) -> web.Response | None:
        if not self._same_origin(request):
            return self._refuse(request, "This page is served on the agent's own address only")
        if keyed and not secrets.compare_digest(request.headers.get(KEY_HEADER, ""), self.key):
            return self._refuse(request, "Missing or wrong activity key")
        return None

    def _refuse(self, request: web.Request, why: str) -> web.Response:
        body = {"error": {"code": 403, "internal_message": why, "user_message": why}}
        return self._answer(request, body, 403)

    async def page(self, request: web.Request) -> web.Response:
        refused = self._check(request, keyed=False)
        if refused is not None:
            return refused
        html = _static("activity.html").replace("__ACTIVITY_KEY__", json.dumps(self.key))
        return web.Response(text=html, content_type="text/html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(text=_static(name), content_type=kind)

    async def transfers(self, request: web.Request) -> web.Response:
        refused = self._check(request, keyed=True)
        if refused is not None:
            return refused
        try:
            token = int(request.query.get("iteration_token", "0"))
        except ValueError:
            token = 0
        body = self.manager.activity(None, token)
        for info, record in zip(body["transfers"], self._records(body), strict=True):
            info["app_id"] = record
        return self._answer(request, body)

    def _records(self, body: dict[str, Any]) -> list[str]:
        return [self.manager.records[t["uuid"]].app_id for t in body["transfers"]]

    async def action(self, request: web.Request) -> web.Response:
        refused = self._check(request, keyed=True)
        if refused is not None:
            return refused
        try:
            record = self.manager.get(None, request.match_info["uuid"])
            action = request.match_info["action"]
            if action == "stop":
                self.manager.stop(record)
            elif action == "resume":
                self.manager.resume(record, {})
            elif action == "remove":
                self.manager.remove(record)
            elif action == "modify":
                self.manager.modify(record, await request.json())
            else:
                raise UsageError(f"Unknown action {action!r}")
        except SlipstreamError as exc:
            return self._answer(request, exc.to_connect(), http_status(exc))
        return self._answer(request, {"transfer_info": record.to_info()})
