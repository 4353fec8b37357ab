"""The REST API end to end over loopback: setup -> token -> transfer, refusals, browse, ops.

The server runs in-process (tests/server/conftest.py) with a password user ``alice`` and a
token-only transfer user ``xfer`` whom the API user ``webapp`` and the access key
``ak-projects`` (root ``/projects``) act for.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine.job import ClientOptions, transfer
from slipstream.errors import SlipstreamError, TokenError
from slipstream.server.tokens import claims_for_spec
from slipstream.spec import load_transfer_spec
from tests.server.conftest import KEY_SECRET, PASSWORD, Api, Stack


async def run(spec: dict[str, Any], cwd: Path, events: list[dict[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    sink = events if events is not None else []
    return await transfer(spec, sink.append, ClientOptions(cwd=cwd, udp_timeout=5))


# --- /info and authentication ---------------------------------------------------------------


async def test_info_reports_user_ports_and_capabilities(stack: Stack) -> None:
    status, body = await stack.api.call("GET", "/info")
    assert status == 200, body
    assert body["transfer_user"] == "xfer"
    assert body["ssh_port"] == stack.info["ssh_port"]
    assert body["fasp_port"] == stack.info["fasp_port"]
    assert body["https_fallback_port"] == stack.info["fallback_port"]
    assert body["capabilities"]["token_authentication"] is True
    assert "aes-128" in body["capabilities"]["ciphers"]
    # The plain HTTP port (allowed because the server listens on loopback) answers too.
    plain = Api(stack.info["api_http_url"], stack.info["api_fingerprint"])
    status, body = await plain.call("GET", "/info", user="ak-projects", password=KEY_SECRET)
    assert status == 200 and body["caller"] == {
        "name": "ak-projects",
        "kind": "access_key",
        "root": "/projects",
    }


@pytest.mark.parametrize(("user", "password"), [("webapp", "wrong"), ("nobody", "x"), ("", "")])
async def test_bad_api_credentials_are_401(stack: Stack, user: str, password: str) -> None:
    status, body = await stack.api.call("GET", "/info", user=user, password=password)
    assert status == 401 and body["error"]["code"] == 19


# --- browse -------------------------------------------------------------------------------------


async def test_browse_lists_and_pages_inside_the_docroot(stack: Stack) -> None:
    for name in ("b.txt", "a.txt", "c.txt"):
        (stack.web / name).write_text(name)
    status, body = await stack.api.call(
        "POST", "/files/browse", {"path": "/", "count": 2, "skip": 1}
    )
    assert status == 200, body
    assert body["total_count"] == 5  # a, b, c, private, projects
    names = [item["basename"] for item in body["items"]]
    assert names == ["b.txt", "c.txt"]
    assert body["items"][0] == {**body["items"][0], "path": "/b.txt", "type": "file", "size": 5}
    status, body = await stack.api.call("POST", "/files/browse", {"path": "/a.txt"})
    assert status == 200 and body["self"]["type"] == "file" and body["items"] == []


async def test_browse_is_confined(stack: Stack) -> None:
    (stack.web / "escape").symlink_to("/etc")
    (stack.web / "projects" / "up").symlink_to("../private")
    for path in ("/..", "../../etc", "/escape", "/escape/passwd"):
        status, body = await stack.api.call("POST", "/files/browse", {"path": path})
        assert status == 403 and body["error"]["code"] == 41, (path, body)
    status, body = await stack.api.call("POST", "/files/browse", {"path": "/missing"})
    assert status == 404 and body["error"]["code"] == 43
    # An access key sees its root only: its "/" is /projects, and nothing climbs out.
    key = {"user": "ak-projects", "password": KEY_SECRET}
    status, body = await stack.api.call("POST", "/files/browse", {"path": "/"}, **key)
    assert status == 200 and [i["path"] for i in body["items"]] == ["/p1", "/up"]
    for path in ("/../private", "/up", "/up/x"):
        status, body = await stack.api.call("POST", "/files/browse", {"path": path}, **key)
        assert status == 403 and body["error"]["code"] == 41, (path, body)


# --- setup -> token -> transfer -------------------------------------------------------------------


async def test_upload_with_a_token_end_to_end(stack: Stack, tmp_path: Path) -> None:
    (stack.web / "inbox").mkdir()
    local = tmp_path / "local"
    local.mkdir()
    (local / "report.pdf").write_bytes(os.urandom(300_000))
    spec = await stack.api.setup(
        "upload",
        destination_root="/inbox",
        paths=[{"source": "report.pdf"}],
        cookie="app-cookie-1",
    )
    assert spec["authentication"] == "token" and spec["remote_user"] == "xfer"
    assert "remote_password" not in spec and spec["token"].startswith("SLT1.")
    assert spec["target_rate_cap_kbps"] == 900_000  # the transfer user's cap
    events: list[dict[str, Any]] = []
    result = await run(spec, local, events)
    assert result.ok and result.transport == "fasp"
    assert (stack.web / "inbox" / "report.pdf").read_bytes() == (local / "report.pdf").read_bytes()
    xfer_id = spec["tags"]["aspera"]["xfer_id"]
    assert events[0]["type"] == "session_start" and events[0]["xfer_id"] == xfer_id
    status, record = await stack.api.call("GET", f"/ops/transfers/{xfer_id}")
    assert status == 200, record
    assert record["status"] == "completed" and record["kind"] == "upload"
    assert record["user"] == "xfer" and record["direction"] == "send"
    assert record["peer"].startswith("127.0.0.1:")
    assert record["cookie"] == "app-cookie-1" and record["transport"] == "fasp"
    assert record["bytes_transferred"] == 300_000
    assert record["file_counts"] == {"completed": 1, "skipped": 0, "failed": 0}
    assert record["files"][0]["path"] == "report.pdf"
    assert "token" not in record["spec"]


async def test_download_with_a_token_end_to_end(stack: Stack, tmp_path: Path) -> None:
    data = stack.web / "projects" / "p1"
    (data / "one.bin").write_bytes(os.urandom(200_000))
    (data / "two.txt").write_text("two")
    # Through the access key, whose paths are relative to its root (/projects).
    key = Api(stack.api.url, stack.api.fingerprint, "ak-projects", KEY_SECRET)
    spec = await key.setup(
        "download", source_root="/p1", paths=[{"source": "one.bin"}, {"source": "two.txt"}]
    )
    assert spec["source_root"] == "/projects/p1"
    out = tmp_path / "out"
    out.mkdir()
    result = await run({**spec, "destination_root": str(out)}, tmp_path)
    assert result.ok and result.totals.files_done == 2
    assert (out / "one.bin").read_bytes() == (data / "one.bin").read_bytes()
    assert (out / "two.txt").read_text() == "two"
    status, record = await key.call("GET", f"/ops/transfers/{spec['tags']['aspera']['xfer_id']}")
    assert record["status"] == "completed" and record["kind"] == "download"
    assert sorted(f["path"] for f in record["files"]) == ["one.bin", "two.txt"]


async def test_setup_refuses_paths_outside_the_root(stack: Stack) -> None:
    (stack.web / "private" / "secret.txt").write_text("no")
    key = Api(stack.api.url, stack.api.fingerprint, "ak-projects", KEY_SECRET)
    requests = [
        {"transfer_request": {"paths": [{"source": "../private/secret.txt"}]}},
        {"transfer_request": {"paths": [{"source": "/nope.txt"}]}},
        {"transfer_request": {"paths": [{"source": "p1"}]}},
    ]
    status, body = await key.call("POST", "/files/download_setup", {"transfer_requests": requests})
    assert status == 200
    first, second, third = body["transfer_specs"]
    assert first["error"]["code"] == 41 and second["error"]["code"] == 43
    assert "transfer_spec" in third  # one bad request does not spoil the others
    status, body = await key.call(
        "POST",
        "/files/upload_setup",
        {"transfer_requests": [{"transfer_request": {"destination_root": "/../private"}}]},
    )
    assert body["transfer_specs"][0]["error"]["code"] == 41


# --- every bad token is refused, before any file system access ---------------------------------


async def _refused(spec: dict[str, Any], cwd: Path) -> TokenError:
    with pytest.raises(TokenError) as info:
        await run(spec, cwd)
    error = info.value
    assert error.code == 37 and not error.retryable and error.origin == "remote"
    assert error.user_message.startswith("Token rejected")
    return error


async def test_bad_tokens_are_refused(stack: Stack, tmp_path: Path) -> None:
    (stack.web / "inbox").mkdir()
    (stack.web / "a.txt").write_text("a")
    (stack.web / "b.txt").write_text("b")
    (tmp_path / "f.txt").write_text("f")
    up = await stack.api.setup("upload", destination_root="/inbox", paths=[{"source": "f.txt"}])
    down = await stack.api.setup("download", paths=[{"source": "a.txt"}])
    token = up["token"]

    tampered = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    error = await _refused({**up, "token": tampered}, tmp_path)
    assert "altered" in error.user_message

    codec = stack.server.services.codec  # type: ignore[union-attr]
    old = claims_for_spec(load_transfer_spec(up), "xfer", life_seconds=60, now=time.time() - 3600)
    error = await _refused({**up, "token": codec.seal(old)}, tmp_path)
    assert "expired" in error.user_message

    # An upload token used for a download (of a file that exists), and the reverse.
    wrong_way = {**down, "token": token, "destination_root": str(tmp_path)}
    assert "uploads only" in (await _refused(wrong_way, tmp_path)).user_message
    back = {**up, "token": down["token"]}
    assert "downloads only" in (await _refused(back, tmp_path)).user_message

    # Another destination (with create_dir: it must not even be created), other sources.
    elsewhere = {**up, "destination_root": "/created-by-nobody", "create_dir": True}
    assert "not '/created-by-nobody'" in (await _refused(elsewhere, tmp_path)).user_message
    assert not (stack.web / "created-by-nobody").exists()
    other = {**down, "paths": [{"source": "b.txt"}], "destination_root": str(tmp_path)}
    assert "'/b.txt'" in (await _refused(other, tmp_path)).user_message
    assert not (tmp_path / "b.txt").exists()

    # A valid token presented for another user (who has a password) logs in as nobody.
    error = await _refused({**up, "remote_user": "alice"}, tmp_path)
    assert "not issued for user 'alice'" in error.user_message

    assert list((stack.web / "inbox").iterdir()) == []  # nothing was written anywhere
    # Refused sessions leave no ops record (no session was accepted).
    status, body = await stack.api.call("GET", "/ops/transfers")
    assert body["transfers"] == []


async def test_token_only_user_refuses_passwords(stack: Stack, tmp_path: Path) -> None:
    spec = {
        "direction": "receive",
        "remote_host": "127.0.0.1",
        "remote_user": "xfer",
        "remote_password": PASSWORD,
        "ssh_port": stack.info["ssh_port"],
        "sshfp": stack.info["sshfp"],
        "paths": [{"source": "x"}],
    }
    with pytest.raises(SlipstreamError) as info:
        await run(spec, tmp_path)
    assert info.value.code == 19


# --- ops -------------------------------------------------------------------------------------


async def test_ops_paging_with_iteration_tokens(stack: Stack, tmp_path: Path) -> None:
    (stack.web / "inbox").mkdir()
    for index in range(3):
        (tmp_path / f"f{index}").write_text(str(index))
        spec = await stack.api.setup(
            "upload", destination_root="/inbox", paths=[{"source": f"f{index}"}]
        )
        await run(spec, tmp_path)
    seen: list[str] = []
    token = 0
    for _ in range(5):
        status, body = await stack.api.call(
            "GET", f"/ops/transfers?count=2&iteration_token={token}"
        )
        assert status == 200, body
        seen += [t["files"][0]["path"] for t in body["transfers"]]
        token = body["iteration_token"]
        if not body["more"]:
            break
    assert seen == ["f0", "f1", "f2"]
    status, body = await stack.api.call("GET", f"/ops/transfers?iteration_token={token}")
    assert body["transfers"] == [] and body["iteration_token"] == token
    status, body = await stack.api.call("GET", "/ops/transfers/no-such-id")
    assert status == 404


async def test_server_initiated_transfer(stack: Stack) -> None:
    """POST /ops/transfers: the server uploads from its transfer user's root to alice."""
    (stack.web / "projects" / "p1" / "r.txt").write_text("report")
    spec = {
        "direction": "send",
        "remote_host": "127.0.0.1",
        "remote_user": "alice",
        "remote_password": PASSWORD,
        "ssh_port": stack.info["ssh_port"],
        "sshfp": stack.info["sshfp"],
        "paths": [{"source": "/projects/p1/r.txt"}],
        "destination_root": "/",
    }
    status, record = await stack.api.call("POST", "/ops/transfers", {"transfer_spec": spec})
    assert status == 200, record
    assert record["initiator"] == "server" and "remote_password" not in record["spec"]
    record = await _wait_done(stack.api, record["id"])
    assert record["status"] == "completed", record
    assert (stack.alice / "r.txt").read_text() == "report"
    # Local paths are confined to the caller's root too.
    bad = {**spec, "paths": [{"source": "/../../../../etc/hostname"}]}
    status, record = await stack.api.call("POST", "/ops/transfers", bad)
    record = await _wait_done(stack.api, record["id"])
    assert record["status"] == "failed" and record["errors"][-1]["code"] == 41


async def _wait_done(api: Api, xfer_id: str) -> dict[str, Any]:
    for _ in range(200):
        status, record = await api.call("GET", f"/ops/transfers/{xfer_id}")
        if record["status"] != "running":
            return dict(record)
        await asyncio.sleep(0.05)
    raise AssertionError(f"transfer {xfer_id} still running")
