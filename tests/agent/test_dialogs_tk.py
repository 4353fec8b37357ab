"""The native Tk dialogs, on a real X server (Xvfb), answered by a simulated user (xdotool)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from slipstream.agent.app import Agent
from tests.agent.test_agent import make_config


@pytest.fixture
def display(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    number = next(n for n in range(91, 140) if not Path(f"/tmp/.X{n}-lock").exists())
    name = f":{number}"
    xvfb = subprocess.Popen(
        ["Xvfb", name, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert time.monotonic() < deadline and xvfb.poll() is None, "Xvfb did not start"
        time.sleep(0.05)
    monkeypatch.setenv("DISPLAY", name)
    try:
        yield name
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=10)


def answer_dialog(title: str, text: str) -> None:
    """Wait for the dialog window, type ``text`` into it and press Return, as a user would."""
    deadline = time.monotonic() + 20
    while True:
        found = subprocess.run(
            ["xdotool", "search", "--name", title], capture_output=True, text=True
        )
        if found.stdout.strip():
            break
        assert time.monotonic() < deadline, f"no window titled {title!r}"
        time.sleep(0.1)
    window = found.stdout.split()[0]
    time.sleep(0.3)  # let Tk finish laying the dialog out before typing into it
    subprocess.run(["xdotool", "windowfocus", "--sync", window], check=True)
    subprocess.run(["xdotool", "type", "--delay", "5", text], check=True)
    subprocess.run(["xdotool", "key", "Return"], check=True)


async def test_the_file_dialog_is_a_native_tk_dialog(display: str, tmp_path: Path) -> None:
    chosen = tmp_path / "chosen-file.txt"  # Tk reads a multi-selection entry as a list
    chosen.write_text("picked by a person\n")
    agent = Agent(make_config(tmp_path / "agent", dialogs="tk", headless_folder=None))
    assert agent.config.uses_tk() and os.environ["DISPLAY"] == display
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session:
            body = {
                "title": "Pick for the Slipstream test",
                "allowMultipleSelection": True,
                "aspera_connect_settings": {"app_id": "tk-app"},
            }
            url = f"{agent.url}/v5/connect/windows/select-open-file-dialog/"
            request = asyncio.ensure_future(session.post(url, data=json.dumps(body)))
            await asyncio.to_thread(answer_dialog, "Pick for the Slipstream test", str(chosen))
            async with await asyncio.wait_for(request, 30) as response:
                answer = json.loads(await response.text())
        files = answer["dataTransfer"]["files"]
        assert [f["name"] for f in files] == [str(chosen)]
        assert files[0]["size"] == chosen.stat().st_size and files[0]["type"] == "text/plain"
        assert agent.consent.may_read("tk-app", str(chosen))
        assert not agent.consent.may_read("another-app", str(chosen))
    finally:
        await agent.stop()
