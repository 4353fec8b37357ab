"""The browser demo's web application: a page that loads the official Connect SDK and a
small backend that asks the server's REST API for transfer specs with tokens.

This is what a real web application does: the browser never sees a password, only a spec
whose token allows exactly one upload (into a folder) or one download (of named files).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from slipstream.errors import ConfigError, SlipstreamError


class ServerApi:
    """The server's REST API, over HTTPS pinned to its certificate's fingerprint."""

    def __init__(self, info: dict[str, Any]) -> None:
        from slipstream.server.tls import fingerprint_digest

        if not info.get("api_url") or not info.get("api_user"):
            raise ConfigError("the demo server has no REST API (api_url / api_user)")
        self.url = str(info["api_url"])
        self.auth = aiohttp.BasicAuth(str(info["api_user"]), str(info["api_password"]))
        self.ssl = aiohttp.Fingerprint(fingerprint_digest(str(info["api_fingerprint"])))

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(auth=self.auth) as session,
            session.post(self.url + path, json=body, ssl=self.ssl) as response,
        ):
            answer: dict[str, Any] = await response.json(content_type=None)
            return answer


def _static(name: str) -> str:
    return resources.files("slipstream.webdemo").joinpath("static", name).read_text("utf-8")


class DemoApp:
    def __init__(self, api: ServerApi, sdk_bundle: Path, agent_url: str) -> None:
        self.api = api
        self.sdk_bundle = sdk_bundle
        self.agent_url = agent_url

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/connect-sdk.js", self.sdk)
        app.router.add_get("/demo.js", self.asset)
        app.router.add_get("/demo.css", self.asset)
        app.router.add_get("/api/files", self.files)
        app.router.add_post("/api/upload_setup", self.upload_setup)
        app.router.add_post("/api/download_setup", self.download_setup)
        return app

    async def index(self, _request: web.Request) -> web.Response:
        html = _static("index.html").replace("__AGENT_URL__", self.agent_url)
        return web.Response(text=html, content_type="text/html")

    async def sdk(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.sdk_bundle, headers={"Content-Type": "text/javascript"})

    async def asset(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(text=_static(name), content_type=kind)

    async def files(self, _request: web.Request) -> web.Response:
        return await self._relay("/files/browse", {"path": "/", "count": 200})

    async def upload_setup(self, request: web.Request) -> web.Response:
        body = await request.json()
        wanted = {"destination_root": str(body.get("destination_root") or "/")}
        return await self._relay("/files/upload_setup", _requests(wanted))

    async def download_setup(self, request: web.Request) -> web.Response:
        body = await request.json()
        paths = [{"source": str(p)} for p in body.get("paths") or []]
        return await self._relay("/files/download_setup", _requests({"paths": paths}))

    async def _relay(self, path: str, body: dict[str, Any]) -> web.Response:
        try:
            return web.json_response(await self.api.post(path, body))
        except (aiohttp.ClientError, SlipstreamError) as exc:
            error = {"code": 12, "user_message": f"the server API is unreachable: {exc}"}
            return web.json_response({"error": error}, status=502)


def _requests(request: dict[str, Any]) -> dict[str, Any]:
    return {"transfer_requests": [{"transfer_request": request}]}
