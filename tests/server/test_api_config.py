"""Config tables of the REST API, fallback and tokens; the token CLI; the quickstart line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slipstream.errors import ConfigError
from slipstream.server.config import load_server_config
from tests.conftest import cli
from tests.server.conftest import _hash, write_server_config

BASE = '[server]\nlisten = "LISTEN"\n[[users]]\nname = "u"\npassword_hash = "HASH"\ndocroot = "d"\n'


def config_text(tmp_path: Path, extra: str, listen: str = "127.0.0.1") -> Path:
    (tmp_path / "d" / "sub").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "server.toml"
    path.write_text(BASE.replace("LISTEN", listen).replace("HASH", _hash("pw")) + extra)
    return path


def test_defaults_keep_everything_off(tmp_path: Path) -> None:
    config = load_server_config(config_text(tmp_path, ""))
    assert not config.api.enabled and not config.http_fallback.enabled
    assert config.tokens.life_seconds == 86400 and config.tokens.key_file is None
    assert config.api_users == () and config.access_keys == ()


def test_full_tables(tmp_path: Path) -> None:
    extra = (
        '[api]\nhttps_port = 9443\nhttp_port = 9091\npublic_host = "files.example"\n'
        '[http_fallback]\nport = 8444\n[tokens]\nkey_file = "keys/t"\nlife_seconds = 600\n'
        f'[[api_users]]\nname = "web"\npassword_hash = "{_hash("pw")}"\ntransfer_user = "u"\n'
        f'[[access_keys]]\nid = "k1"\nsecret_hash = "{_hash("pw")}"\ntransfer_user = "u"\n'
        'root = "/sub"\n'
    )
    config = load_server_config(config_text(tmp_path, extra))
    assert (config.api.enabled, config.api.https_port, config.api.http_port) == (True, 9443, 9091)
    assert config.api.public_host == "files.example"
    assert (config.http_fallback.enabled, config.http_fallback.port) == (True, 8444)
    assert config.tokens.key_file == tmp_path / "keys" / "t"
    assert config.api_users[0].transfer_user == "u" and config.access_keys[0].root == "/sub"


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ("[api]\nhttp_port = 9091\n", "api.http_port", "loopback"),
        ("[api]\nbogus = 1\n", "api.bogus", "unknown key"),
        ('[api]\ntls_cert = "c.pem"\n', "api.tls_cert", "give both"),
        ("[http_fallback]\nport = 99999\n", "http_fallback.port", "port number"),
        ("[tokens]\nlife_seconds = 5\n", "tokens.life_seconds", "60"),
        ('[[api_users]]\nname = "w"\npassword_hash = "x"\n', "api_users[w].password_hash", ""),
        (
            "[[access_keys]]\nid = 'k'\nsecret_hash = 'H'\ntransfer_user = 'nobody'\n",
            "transfer_user",
            "no [[users]]",
        ),
        (
            "[[access_keys]]\nid = 'k'\nsecret_hash = 'H'\ntransfer_user = 'u'\nroot = '/../x'\n",
            "root",
            "inside",
        ),
        (
            "[[access_keys]]\nid = 'k'\nsecret_hash = 'H'\ntransfer_user = 'u'\nroot = '/nope'\n",
            "root",
            "not a folder",
        ),
    ],
)
def test_config_errors(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    text = extra.replace("'H'", f"'{_hash('pw')}'")
    with pytest.raises(ConfigError) as info:
        load_server_config(config_text(tmp_path, text, listen="0.0.0.0"))
    assert key in str(info.value) and reason in str(info.value)


def test_token_only_user_needs_no_password(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    path = tmp_path / "server.toml"
    path.write_text('[[users]]\nname = "x"\ntoken_only = true\ndocroot = "d"\n')
    user = load_server_config(path).user("x")
    assert user is not None and user.token_only and user.password_hash is None


def test_token_cli_create_and_inspect(tmp_path: Path) -> None:
    path = write_server_config(tmp_path)
    (tmp_path / "web" / "inbox").mkdir()
    made = cli("token", "create", "--config", str(path), "--user", "xfer", "--upload", "/inbox")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    shown = cli("token", "inspect", "--config", str(path), token)
    assert shown.returncode == 0, shown.stderr
    claims = json.loads(shown.stdout)
    assert claims["valid"] and claims["kind"] == "upload" and claims["paths"] == ["/inbox"]
    bad = cli("token", "inspect", "--config", str(path), token[:-5] + "AAAAA")
    assert bad.returncode == 1 and "altered" in bad.stderr and "code 37" in bad.stderr
    missing = cli("token", "create", "--config", str(path), "--user", "xfer", "--download", "x")
    assert missing.returncode == 1 and "code 43" in missing.stderr
    assert "Traceback" not in missing.stderr + bad.stderr


def test_quickstart_line_has_the_api(tmp_path: Path) -> None:
    from tests.conftest import start_quickstart

    handle = start_quickstart(tmp_path / "server")
    try:
        info = handle.info
        assert info["api_url"] == f"https://127.0.0.1:{info['api_port']}"
        assert info["api_user"] == "api" and info["api_password"]
        assert info["api_fingerprint"].startswith("SHA256:") and info["fallback_port"] > 0
        credentials = json.loads((tmp_path / "server" / "qs" / "credentials.json").read_text())
        assert credentials["api_password"] == info["api_password"]
        assert "api_fingerprint=" in handle.log() or "api_url=" in handle.log()
    finally:
        handle.stop()
