"""`slipstream demo`: the server, the agent and the demo page, used as a person would, with
transfer specs carrying tokens from the server's REST API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.agent.conftest import ARTIFACTS


def start_demo(root: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "slipstream", "demo", "--dir", str(root), "--size", "3M"]
    process = subprocess.Popen(
        [*command, "--exit-after", "240"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"open (http://127\.0\.0\.1:\d+/) in a browser", line)
        if found:
            return process, found.group(1)
    process.wait(timeout=30)
    raise AssertionError("the demo printed no URL:\n" + "".join(lines))


def test_the_browser_demo_uploads_and_downloads_with_tokens(browser: Any, tmp_path: Path) -> None:
    process, url = start_demo(tmp_path / "demo")
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('status').textContent === 'RUNNING'")
        page.click("#pick")  # headless here: the agent's dialog picks the sample folder's files
        page.wait_for_selector("#picked li")
        page.click("#upload")
        page.wait_for_selector("#transfers tr.completed", timeout=60_000)
        uploaded = tmp_path / "demo" / "server" / "docroot" / "big.bin"
        original = tmp_path / "demo" / "samples" / "big.bin"
        assert uploaded.read_bytes() == original.read_bytes()
        page.click("#refresh")
        page.click("button[data-path='/big.bin']")
        page.wait_for_function("document.querySelectorAll('#transfers tr.completed').length == 2")
        assert (tmp_path / "demo" / "downloads" / "big.bin").read_bytes() == original.read_bytes()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo-page.png"))
        # The page never saw a password: only the server's tokens.
        state = page.evaluate("document.body.innerText")
        assert "password" not in state.lower()
    finally:
        context.close()
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode is not None


def test_demo_exits_after_the_given_time_and_the_cli_round_trip_remains(tmp_path: Path) -> None:
    from tests.conftest import cli

    web = cli("demo", "--dir", str(tmp_path / "web"), "--size", "1M", "--exit-after", "1")
    assert web.returncode == 0, web.stdout + web.stderr
    assert re.search(r"open http://127\.0\.0\.1:\d+/ in a browser", web.stdout)
    round_trip = cli("demo", "--cli", "--dir", str(tmp_path / "cli"), "--size", "1M")
    assert round_trip.returncode == 0, round_trip.stdout + round_trip.stderr
    assert "byte-identical" in round_trip.stdout
