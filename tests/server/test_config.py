"""Server config parsing, password hashes, host keys and quickstart folders."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import asyncssh
import pytest

from slipstream.errors import ConfigError
from slipstream.server.config import load_server_config
from slipstream.server.hostkey import fingerprint, load_or_create_host_key
from slipstream.server.passwords import check_password_hash, hash_password, verify_password
from slipstream.server.quickstart import create_quickstart

PUBKEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
HASH = hash_password("secret")


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def user_block(**fields: object) -> str:
    fields = {"name": "alice", "docroot": "data", "password_hash": HASH, **fields}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items() if v is not None)
    return f"[[users]]\n{body}\n"


# --- passwords --------------------------------------------------------------------------


def test_password_round_trip() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$n=16384,r=8,p=1$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert hash_password("correct horse") != stored  # fresh salt each time


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "md5$x",
        "scrypt$n=16384,r=8,p=1$!!!$AAAA",
        "scrypt$n=1000,r=8,p=1$AAAAAAAAAAA$AAAA",
        "scrypt$n=1073741824,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$r=8$a$b",
    ],
)
def test_malformed_hash_never_matches(stored: str) -> None:
    assert not verify_password("anything", stored)
    with pytest.raises(ValueError):
        check_password_hash(stored)


# --- config -----------------------------------------------------------------------------


def test_full_config(tmp_path: Path) -> None:
    keys_file = tmp_path / "bob_keys"
    keys_file.write_text(f"# bob's keys\n\n{PUBKEY}\n")
    path = write_config(
        tmp_path,
        '[server]\nlisten = "0.0.0.0"\nssh_port = 2222\nfasp_port = 0\nhost_key = "keys/hk"\n'
        'log_file = "/var/log/slip.log"\n'
        + user_block(read=True, write=False, browse=False)
        + user_block(
            name="bob",
            password_hash=None,
            authorized_keys_file="bob_keys",
            authorized_keys=[PUBKEY + " inline"],
        ),
    )
    config = load_server_config(path)
    assert (config.listen, config.ssh_port, config.fasp_port) == ("0.0.0.0", 2222, 0)
    assert config.host_key == tmp_path / "keys" / "hk"
    assert config.state_dir == tmp_path / "state"
    assert config.log_file == Path("/var/log/slip.log")
    alice = config.user("alice")
    assert alice is not None and alice.docroot == tmp_path / "data"
    assert (alice.read, alice.write, alice.browse) == (True, False, False)
    bob = config.user("bob")
    assert bob is not None and bob.password_hash is None
    assert bob.authorized_keys == (PUBKEY + " inline", PUBKEY)
    assert config.user("carol") is None


def test_defaults(tmp_path: Path) -> None:
    config = load_server_config(write_config(tmp_path, user_block()))
    assert (config.listen, config.ssh_port, config.fasp_port) == ("127.0.0.1", 33001, 33001)
    assert config.host_key == tmp_path / "host_key"
    assert config.log_file is None
    alice = config.user("alice")
    assert alice is not None and (alice.read, alice.write, alice.browse) == (True, True, True)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[server]\nssh_port = 70000\n", "server.ssh_port", "port number"),
        ('[server]\nfasp_port = "x"\n', "server.fasp_port", "port number"),
        ("[server]\nssh_port = true\n", "server.ssh_port", "port number"),
        ('[server]\nlisten = ""\n', "server.listen", "address"),
        ("[server]\nlisten = 5\n", "server.listen", "string"),
        ("[server]\nbogus = 1\n", "server.bogus", "unknown key"),
        ("server = 3\n", "server", "table"),
        ("users = 3\n", "users", "array"),
        (user_block(docroot=None), "users[alice].docroot", "missing"),
        (user_block(docroot="nope"), "users[alice].docroot", "not an existing directory"),
        (user_block() + user_block(), "users[alice].name", "duplicate user"),
        (user_block(name=None), "users[#1].name", "missing"),
        (user_block(name="a b"), "users[#1].name", "not a valid user name"),
        (user_block(password_hash=None), "users[alice]", "neither password_hash nor"),
        (user_block(password_hash="plain"), "users[alice].password_hash", "scrypt"),
        (
            user_block(authorized_keys=["ssh-ed25519 garbage"]),
            "users[alice].authorized_keys",
            "entry 1",
        ),
        (user_block(authorized_keys="x"), "users[alice].authorized_keys", "array of strings"),
        (
            user_block(authorized_keys_file="missing"),
            "users[alice].authorized_keys_file",
            "cannot read",
        ),
        (user_block(wirte=False), "users[alice].wirte", "unknown key"),
        (user_block(read="yes"), "users[alice].read", "true or false"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    message = info.value.user_message
    assert message.startswith(f"{path}: {key}: "), message
    assert reason in message


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_server_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_server_config(write_config(tmp_path, "[server\n"))


def test_unreadable_key_file(tmp_path: Path) -> None:
    # A folder where the key file should be fails to read even for root, who would read a
    # chmod-0 file regardless.
    (tmp_path / "keys").mkdir()
    path = write_config(tmp_path, user_block(authorized_keys_file="keys"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_server_config(path)


# --- host key ---------------------------------------------------------------------------


def test_host_key_created_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "host_key"
    key = load_or_create_host_key(path)
    assert key.get_algorithm() == "ssh-ed25519"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fingerprint(key).startswith("SHA256:") and not fingerprint(key).endswith("=")
    assert fingerprint(load_or_create_host_key(path)) == fingerprint(key)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_host_key_refused_when_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "host_key"
    load_or_create_host_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_host_key(path)


def test_host_key_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "host_key"
    path.write_text("not a key")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="cannot load"):
        load_or_create_host_key(path)


# --- quickstart -------------------------------------------------------------------------


def test_quickstart_creates_and_reuses(tmp_path: Path) -> None:
    qs = tmp_path / "qs"
    info = create_quickstart(qs, ssh_port=0, fasp_port=0)
    assert (info.host, info.user, info.ssh_port, info.fasp_port) == (
        "127.0.0.1",
        "slipstream",
        0,
        0,
    )
    assert info.docroot == qs / "docroot" and info.docroot.is_dir()
    assert info.config_path == qs / "server.toml"
    assert (qs / "host_key").is_file()
    creds = qs / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text())["password"] == info.password

    config = load_server_config(info.config_path)
    user = config.user("slipstream")
    assert user is not None and user.password_hash is not None
    assert verify_password(info.password, user.password_hash)
    assert fingerprint(load_or_create_host_key(config.host_key)) == info.host_key_fingerprint

    before = info.config_path.read_text()
    again = create_quickstart(qs)
    assert again == info
    assert info.config_path.read_text() == before


def test_quickstart_wildcard_listen_gives_loopback_host(tmp_path: Path) -> None:
    info = create_quickstart(tmp_path, listen="0.0.0.0", ssh_port=4000, fasp_port=4001)
    assert info.host == "127.0.0.1"
    config = load_server_config(info.config_path)
    assert (config.listen, config.ssh_port, config.fasp_port) == ("0.0.0.0", 4000, 4001)


def test_quickstart_regenerates_config_from_credentials(tmp_path: Path) -> None:
    info = create_quickstart(tmp_path)
    info.config_path.unlink()
    assert create_quickstart(tmp_path).password == info.password


def test_quickstart_lost_credentials(tmp_path: Path) -> None:
    create_quickstart(tmp_path)
    (tmp_path / "credentials.json").unlink()
    with pytest.raises(ConfigError, match="credentials.json"):
        create_quickstart(tmp_path)


def test_quickstart_mismatched_credentials(tmp_path: Path) -> None:
    create_quickstart(tmp_path)
    (tmp_path / "credentials.json").write_text(json.dumps({"password": "other"}))
    with pytest.raises(ConfigError, match="does not match"):
        create_quickstart(tmp_path)
