"""The official Connect SDK 5.0.3, unmodified, in headless chromium, driving the agent."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import ARTIFACTS, AgentHandle, WebOrigin, server_spec
from tests.conftest import ServerHandle

WAIT = 60.0


@pytest.fixture
def open_page(browser: Any, web_origin: WebOrigin, agent: AgentHandle) -> Iterator[Any]:
    contexts = []

    def open_(app_id: str) -> Any:
        context = browser.new_context()  # a fresh profile: no stale localStorage
        contexts.append(context)
        page = context.new_page()
        page.goto(web_origin.page_url(app_id))
        page.evaluate("whenRunning()")
        return page

    yield open_
    for context in contexts:
        context.close()


def call(page: Any, expression: str) -> dict[str, Any]:
    """Run ``expression`` (using ``cb``: SDK callbacks) and wait for its {ok} or {err}."""
    result: dict[str, Any] = page.evaluate(
        f"async () => {{ const [done, cb] = callbacks(); {expression}; return await done; }}"
    )
    return result


def ok(result: dict[str, Any]) -> Any:
    assert "ok" in result, result
    return result["ok"]


def start(page: Any, spec: dict[str, Any], connect_spec: dict[str, Any] | None = None) -> str:
    result = ok(call(page, f"connect.startTransfer({_js(spec)}, {_js(connect_spec or {})}, cb)"))
    return str(result["transfer_specs"][0]["uuid"])


def _js(value: Any) -> str:
    import json

    return json.dumps(value)


def info(page: Any, uuid: str) -> dict[str, Any]:
    result: dict[str, Any] = ok(call(page, f"connect.getTransfer({_js(uuid)}, cb)"))[
        "transfer_info"
    ]
    return result


def wait_status(page: Any, uuid: str, wanted: str, timeout: float = WAIT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = info(page, uuid)
        if current["status"] == wanted:
            return current
        assert current["status"] != "failed" or wanted == "failed", current
        time.sleep(0.1)
    raise AssertionError(f"{uuid} never reached {wanted}: {info(page, uuid)}")


def seen_by_listener(page: Any, uuid: str, last: str) -> list[dict[str, Any]]:
    """What the page's transfer listener got for ``uuid``, once it got ``last``."""
    deadline = time.monotonic() + 10
    while True:
        seen = [t for e in page.evaluate("events") for t in e["transfers"] if t["uuid"] == uuid]
        if (seen and seen[-1]["status"] == last) or time.monotonic() > deadline:
            assert seen and seen[-1]["status"] == last, seen[-1:] or "nothing"
            return seen
        time.sleep(0.1)


def pick_files(page: Any) -> list[str]:
    files = ok(call(page, "connect.showSelectFileDialog(cb)"))["dataTransfer"]["files"]
    return [f["name"] for f in files]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_sdk_reaches_running_and_reads_the_version(open_page: Any) -> None:
    page = open_page("app-status")
    statuses = page.evaluate("statuses")
    assert statuses[0] == "INITIALIZING" and "RUNNING" in statuses
    assert ok(call(page, "connect.version(cb)"))["version"].startswith("4.")


def test_upload_and_download_are_byte_identical(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    page = open_page("app-roundtrip")
    original = agent.picks / "roundtrip.bin"
    original.write_bytes(os.urandom(6 << 20))
    picked = [p for p in pick_files(page) if p.endswith("roundtrip.bin")]
    assert picked == [str(original)]
    up = start(
        page,
        server_spec(
            qs_server,
            "send",
            paths=[{"source": picked[0]}],
            destination_root="/web",
            create_dir=True,
            target_rate_kbps=20000,
        ),
    )
    done = wait_status(page, up, "completed")
    assert done["bytes_written"] == done["bytes_expected"] == original.stat().st_size
    assert done["percentage"] == 1 and done["file_counts"]["completed"] == 1
    assert md5(qs_server.docroot / "web" / "roundtrip.bin") == md5(original)
    # The transfer listener saw it run with progress, then complete.
    seen = seen_by_listener(page, up, "completed")
    assert any(t["status"] == "running" and 0 < t["percentage"] < 1 for t in seen), seen

    down = start(
        page,
        server_spec(qs_server, "receive", paths=[{"source": "/web/roundtrip.bin"}]),
    )
    done = wait_status(page, down, "completed")
    landed = agent.downloads / "roundtrip.bin"
    assert md5(landed) == md5(original)
    assert done["explorer_path"] == str(agent.downloads)
    assert done["files"][0]["file"] == str(landed)


def test_file_fields_reach_the_page(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    """overwrite "none" skips (and says so), file_checksum is reported per file."""
    page = open_page("app-fields")
    original = agent.picks / "fields.bin"
    original.write_bytes(os.urandom(100_000))
    assert str(original) in pick_files(page)
    spec = server_spec(
        qs_server,
        "send",
        paths=[{"source": str(original)}],
        destination_root="/fields",
        create_dir=True,
        file_checksum="sha256",
    )
    first = wait_status(page, start(page, spec), "completed")
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    assert first["files"][0]["checksum"] == digest, first["files"]
    landed = qs_server.docroot / "fields" / "fields.bin"
    original.write_bytes(os.urandom(100_000))  # changed: "none" must still keep the server's
    again = wait_status(page, start(page, {**spec, "overwrite": "none"}), "completed")
    assert hashlib.sha256(landed.read_bytes()).hexdigest() == digest
    assert again["file_counts"]["skipped"] == 1 and again["files"][0]["status"] == "skipped"


def slow_upload(
    page: Any, agent: AgentHandle, server: ServerHandle, name: str, **extra: Any
) -> str:
    source = agent.picks / name
    source.write_bytes(os.urandom(3 << 20))
    assert str(source) in pick_files(page)
    spec = server_spec(
        server,
        "send",
        paths=[{"source": str(source)}],
        destination_root="/slow",
        create_dir=True,
        overwrite="always",
        target_rate_kbps=2000,  # 3 MiB would take ~13 s
        **extra,
    )
    return start(page, spec)


def wait_bytes(page: Any, uuid: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        current = info(page, uuid)
        if current["status"] == "running" and current["bytes_written"] > 0:
            return current
        time.sleep(0.1)
    raise AssertionError(f"no progress: {info(page, uuid)}")


def test_stop_resume_modify_remove(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    page = open_page("app-control")
    uuid = slow_upload(
        page, agent, qs_server, "control.bin", target_rate_cap_kbps=500000, lock_min_rate=True
    )
    running = wait_bytes(page, uuid)
    assert 0 < running["percentage"] < 1 and running["remaining_usec"] > 0
    # Refused: a locked field, and a target above the cap.
    locked = call(page, f"connect.modifyTransfer({_js(uuid)}, {{min_rate_kbps: 10}}, cb)")
    assert locked["err"]["error"]["code"] == 55, locked
    capped = call(page, f"connect.modifyTransfer({_js(uuid)}, {{target_rate_kbps: 900000}}, cb)")
    assert capped["err"]["error"]["code"] == 55, capped

    ok(call(page, f"connect.stopTransfer({_js(uuid)}, cb)"))
    stopped = wait_status(page, uuid, "cancelled")
    assert stopped["previous_status"] == "running" and stopped["end_time"]

    ok(call(page, f"connect.resumeTransfer({_js(uuid)}, {{}}, cb)"))
    wait_bytes(page, uuid)
    began = time.monotonic()
    changed = call(page, f"connect.modifyTransfer({_js(uuid)}, {{target_rate_kbps: 400000}}, cb)")
    assert ok(changed)["target_rate_kbps"] == 400000
    wait_status(page, uuid, "completed", timeout=30)
    assert time.monotonic() - began < 8, "the new rate did not reach the running transfer"
    assert md5(qs_server.docroot / "slow" / "control.bin") == md5(agent.picks / "control.bin")

    ok(call(page, f"connect.removeTransfer({_js(uuid)}, cb)"))
    assert info(page, uuid)["status"] == "removed"
    listing = ok(call(page, "connect.getAllTransfers(cb, 0)"))
    assert uuid not in [t["uuid"] for t in listing["transfers"]]


def test_modify_reaches_the_server_sender_of_a_download(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    page = open_page("app-download-rate")
    (qs_server.docroot / "big-down.bin").write_bytes(os.urandom(3 << 20))
    spec = server_spec(
        qs_server,
        "receive",
        paths=[{"source": "/big-down.bin"}],
        target_rate_kbps=2000,
        overwrite="always",
    )
    uuid = start(page, spec)
    wait_bytes(page, uuid)
    began = time.monotonic()
    ok(call(page, f"connect.modifyTransfer({_js(uuid)}, {{target_rate_kbps: 400000}}, cb)"))
    wait_status(page, uuid, "completed", timeout=30)
    assert time.monotonic() - began < 8, "the server's sender kept the old rate"
    assert md5(agent.downloads / "big-down.bin") == md5(qs_server.docroot / "big-down.bin")


def test_iteration_token_returns_only_changes(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    page = open_page("app-tokens")
    (agent.picks / "token.txt").write_text("tokens\n")
    pick_files(page)
    first = start(
        page, server_spec(qs_server, "send", paths=[{"source": str(agent.picks / "token.txt")}])
    )
    wait_status(page, first, "completed")
    everything = ok(call(page, "connect.getAllTransfers(cb, 0)"))
    assert [t["uuid"] for t in everything["transfers"]] == [first]
    token = everything["iteration_token"]
    assert (
        everything["result_count"] == 1
        and token >= everything["transfers"][0]["transfer_iteration_token"]
    )
    quiet = ok(call(page, f"connect.getAllTransfers(cb, {token})"))
    assert quiet["transfers"] == [] and quiet["result_count"] == 0
    second = start(
        page, server_spec(qs_server, "send", paths=[{"source": str(agent.picks / "token.txt")}])
    )
    wait_status(page, second, "completed")
    changes = ok(call(page, f"connect.getAllTransfers(cb, {token})"))
    assert [t["uuid"] for t in changes["transfers"]] == [second]
    assert changes["iteration_token"] > token


def test_a_second_app_id_sees_nothing_of_the_first(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    first = open_page("app-first")
    (agent.picks / "mine.txt").write_text("first app\n")
    pick_files(first)
    uuid = start(
        first, server_spec(qs_server, "send", paths=[{"source": str(agent.picks / "mine.txt")}])
    )
    wait_status(first, uuid, "completed")
    other = open_page("app-second")
    assert ok(call(other, "connect.getAllTransfers(cb, 0)"))["transfers"] == []
    for method in ("getTransfer", "stopTransfer", "removeTransfer"):
        refused = call(other, f"connect.{method}({_js(uuid)}, cb)")
        assert refused["err"]["error"]["code"] == 71, (method, refused)
    # Nor may it upload what the first page's user picked.
    spec = server_spec(qs_server, "send", paths=[{"source": str(agent.picks / "mine.txt")}])
    refused = call(other, f"connect.startTransfer({_js(spec)}, {{}}, cb)")
    assert refused["err"]["error"]["code"] == 70
    assert info(first, uuid)["status"] == "completed"


def test_an_unpicked_path_is_refused_and_nothing_is_sent(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle, tmp_path: Path
) -> None:
    page = open_page("app-unpicked")
    secret = tmp_path / "secret.txt"
    secret.write_text("never leaves\n")
    spec = server_spec(qs_server, "send", paths=[{"source": str(secret)}], destination_root="/")
    refused = call(page, f"connect.startTransfer({_js(spec)}, {{}}, cb)")
    error = refused["err"]["error"]
    assert error["code"] == 70 and "not selected by the user" in error["user_message"]
    dotdot = dict(spec, paths=[{"source": f"{agent.picks}/../{secret.name}"}])
    assert call(page, f"connect.startTransfer({_js(dotdot)}, {{}}, cb)")["err"]
    assert ok(call(page, "connect.getAllTransfers(cb, 0)"))["transfers"] == []
    assert not (qs_server.docroot / "secret.txt").exists()
    checksum = call(page, f"connect.getChecksum({{path: {_js(str(secret))}}}, cb)")
    assert checksum["err"]["error"]["code"] == 70


def test_drop_checksum_and_read(open_page: Any, agent: AgentHandle) -> None:
    page = open_page("app-drop")
    dropped = agent.picks / "dropped.txt"
    dropped.write_text("dropped on the page\n")
    assert page.evaluate("armDrop()") is None
    # A real drop event on the SDK's drop target, carrying a File of the same name and size.
    page.evaluate(
        """() => {
          const data = new DataTransfer();
          data.items.add(new File(["dropped on the page\\n"], "dropped.txt", {type: "text/plain"}));
          const target = document.querySelector("#drop");
          target.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        }"""
    )
    page.wait_for_function("drops.length > 0")
    files = page.evaluate("drops[0]")["dataTransfer"]["files"]
    assert [f["name"] for f in files] == [str(dropped)]
    digest = ok(call(page, f"connect.getChecksum({{path: {_js(str(dropped))}}}, cb)"))
    assert digest == {"checksumMethod": "md5", "checksum": md5(dropped)}
    sha = ok(
        call(
            page,
            f"connect.getChecksum({{path: {_js(str(dropped))}, checksumMethod: 'sha256',"
            " offset: 8, chunkSize: 3}, cb)",
        )
    )
    assert sha["checksum"] == hashlib.sha256(dropped.read_bytes()[8:11]).hexdigest()
    chunk = ok(
        call(
            page,
            f"connect.readChunkAsArrayBuffer({{path: {_js(str(dropped))}, offset: 0,"
            " chunkSize: 7}, cb)",
        )
    )
    assert chunk["type"] == "text/plain"
    whole = ok(call(page, f"connect.readAsArrayBuffer({{path: {_js(str(dropped))}}}, cb)"))
    import base64

    assert base64.b64decode(whole["data"]) == dropped.read_bytes()
    assert base64.b64decode(chunk["data"]) == b"dropped"


def test_dialogs_windows_ports_and_authenticate(
    open_page: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    page = open_page("app-windows")
    folder = ok(call(page, "connect.showSelectFolderDialog(cb)"))["dataTransfer"]["files"]
    assert [f["name"] for f in folder] == [str(agent.picks)]
    save = ok(call(page, "connect.showSaveFileDialog(cb, {suggestedName: 'report.pdf'})"))
    assert save["dataTransfer"]["files"][0]["name"] == str(agent.picks / "report.pdf")
    for expression in (
        "connect.showAbout(cb)",
        "connect.showPreferences(cb)",
        "connect.showPreferencesPage({page: 'network'}, cb)",
        "connect.showTransferManager(cb)",
    ):
        assert ok(call(page, expression)) == {}, expression
    info_ = qs_server.info
    ports = {"remote_host": info_["host"], "ssh_port": info_["ssh_port"]}
    assert ok(call(page, f"connect.testSshPorts({_js(ports)}, cb)")) == {}
    closed = call(page, f"connect.testSshPorts({_js({**ports, 'ssh_port': 1})}, cb)")
    assert closed["err"]["error"]["code"] == 13
    auth = {**ports, "remote_user": info_["user"], "sshfp": info_["sshfp"]}
    good = call(
        page, f"connect.authenticate({_js({**auth, 'remote_password': info_['password']})}, cb)"
    )
    assert ok(good) == {}
    bad = call(page, f"connect.authenticate({_js({**auth, 'remote_password': 'wrong'})}, cb)")
    assert bad["err"]["error"]["code"] == 19


def test_activity_page_shows_the_transfer(
    open_page: Any, browser: Any, agent: AgentHandle, qs_server: ServerHandle
) -> None:
    page = open_page("app-activity")
    uuid = slow_upload(page, agent, qs_server, "activity.bin")
    wait_bytes(page, uuid)
    monitor = call(page, f"connect.showTransferMonitor({_js(uuid)}, cb)")
    assert ok(monitor) == {}
    assert ok(call(page, f"connect.showDirectory({_js(uuid)}, cb)")) == {}
    context = browser.new_context(viewport={"width": 1200, "height": 420})
    try:
        activity = context.new_page()
        activity.goto(agent.url + "/")
        row = activity.locator(f"tr[data-uuid='{uuid}']")
        row.wait_for()
        progress = f"tr[data-uuid='{uuid}'] .pct"
        activity.wait_for_function(
            f"document.querySelector({_js(progress)}).textContent.match(/[1-9]\\d*%/)"
        )
        text = row.inner_text().lower()
        assert "activity.bin" in text and "running" in text and "stop" in text
        ARTIFACTS.mkdir(exist_ok=True)
        activity.screenshot(path=str(ARTIFACTS / "agent-activity.png"))
        row.locator("button[data-action=stop]").click()
        wait_status(page, uuid, "cancelled")
        row.locator("button[data-action=resume]").wait_for()
        row.locator("button[data-action=remove]").click()
        wait_status(page, uuid, "removed")
    finally:
        context.close()
