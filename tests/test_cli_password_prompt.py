"""When the CLI asks for a password: only when nothing else can log in."""

from __future__ import annotations

import sys

import pytest

from slipstream import cli_transfer
from slipstream.spec import TransferSpec


class _Tty:
    def isatty(self) -> bool:
        return True


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(sys, "stdin", _Tty())
    monkeypatch.delenv("SLIPSTREAM_PASSWORD", raising=False)
    monkeypatch.setattr(cli_transfer.getpass, "getpass", lambda text: asked.append(text) or "pw")
    return asked


def _opts() -> dict[str, object]:
    return {"key_files": (), "known_hosts": None, "accept_host_key": False, "udp_timeout": 5.0}


def _spec(**fields: object) -> TransferSpec:
    body = {"remote_host": "127.0.0.1", "remote_user": "alice", "direction": "send"}
    return TransferSpec.model_validate({**body, **fields, "paths": [{"source": "a"}]})


def test_password_authentication_prompts(prompts: list[str]) -> None:
    options = cli_transfer._client_options(_spec(), _opts())
    assert options.password == "pw"
    assert prompts == ["Password for alice@127.0.0.1: "]


@pytest.mark.parametrize(
    "fields",
    [
        {"authentication": "token", "token": "Bearer abc"},
        {"ssh_private_key_path": "/keys/id_ed25519"},
        {"remote_password": "given"},
    ],
)
def test_no_prompt_when_something_else_logs_in(prompts: list[str], fields: dict) -> None:
    cli_transfer._client_options(_spec(**fields), _opts())
    assert prompts == []
