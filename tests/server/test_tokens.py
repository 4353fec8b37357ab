"""Transfer tokens: sealing, every refusal, path binding, and the token SSH login rules."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from slipstream.errors import TokenError, UsageError
from slipstream.server.config import load_server_config
from slipstream.server.tokens import (
    TOKEN_PREFIX,
    TokenAuthenticator,
    TokenCodec,
    TokenUser,
    admin_create,
    admin_inspect,
    canonical_path,
    check_binding,
    codec_for_config,
    download_sources,
    load_or_create_key,
    require_token_grant,
    token_login,
)
from slipstream.spec import load_transfer_spec
from tests.server.conftest import PASSWORD, write_server_config

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def codec(clock: Clock | None = None, secret: bytes = b"k" * 32) -> TokenCodec:
    return TokenCodec(secret, life_seconds=3600, clock=clock or Clock())


UPLOAD = load_transfer_spec({"direction": "send", "destination_root": "/inbox/a", "paths": ["f"]})
DOWNLOAD = load_transfer_spec(
    {"direction": "receive", "source_root": "/data", "paths": [{"source": "x.bin"}, "sub/y"]}
)


def test_round_trip_binds_user_direction_paths_and_expiry() -> None:
    c = codec()
    token = c.issue_for_spec(DOWNLOAD, "xfer", issuer="test")
    assert token.startswith(TOKEN_PREFIX)
    claims = c.verify(token)
    assert (claims.user, claims.direction) == ("xfer", "receive")
    assert claims.paths == ("/data/sub/y", "/data/x.bin")
    assert claims.expires_at - claims.issued_at == 3600
    assert "x.bin" not in token and "xfer" not in token  # sealed, not merely signed
    check_binding(claims, "xfer", DOWNLOAD)


def flip(token: str, index: int) -> str:
    other = "A" if token[index] != "A" else "B"
    return token[:index] + other + token[index + 1 :]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: flip(t, len(t) - 2),  # a changed ciphertext/tag character
        lambda t: flip(t, len(TOKEN_PREFIX) + 3),  # a changed nonce character
        lambda t: t[:-10],  # truncated
        lambda t: TOKEN_PREFIX + "!!!not-base64!!!",
        lambda t: "SLT2." + t[len(TOKEN_PREFIX) :],  # another prefix (the associated data)
    ],
)
def test_tampered_tokens_are_refused(mangle) -> None:  # type: ignore[no-untyped-def]
    c = codec()
    token = c.issue_for_spec(UPLOAD, "xfer")
    with pytest.raises(TokenError) as info:
        c.verify(mangle(token))
    assert info.value.code == 37 and not info.value.retryable


def test_token_from_another_server_key_is_refused() -> None:
    token = codec(secret=b"a" * 32).issue_for_spec(UPLOAD, "xfer")
    with pytest.raises(TokenError, match="altered or made with another server key"):
        codec(secret=b"b" * 32).verify(token)


def test_expiry_with_a_small_clock_skew_allowance() -> None:
    clock = Clock()
    c = codec(clock)
    token = c.issue_for_spec(UPLOAD, "xfer", life_seconds=100)
    clock.now = NOW + 100 + c.skew_seconds  # just inside the allowance
    c.verify(token)
    clock.now += 1
    with pytest.raises(TokenError, match="expired"):
        c.verify(token)
    clock.now = NOW - c.skew_seconds - 5  # issued "in the future": a clock far off
    with pytest.raises(TokenError, match="future"):
        c.verify(token)


@pytest.mark.parametrize(
    ("user", "spec", "reason"),
    [
        ("bob", {"direction": "send", "destination_root": "/inbox/a"}, "for user 'xfer'"),
        ("xfer", {"direction": "receive", "paths": ["/inbox/a"]}, "authorizes uploads only"),
        ("xfer", {"direction": "send", "destination_root": "/inbox"}, "not '/inbox'"),
        ("xfer", {"direction": "send", "destination_root": "/inbox/a/../b"}, "not '/inbox/b'"),
        ("xfer", {"direction": "send"}, "not '/'"),
    ],
)
def test_upload_token_binding_refusals(user: str, spec: dict, reason: str) -> None:  # type: ignore[type-arg]
    claims = codec().verify(codec().issue_for_spec(UPLOAD, "xfer"))
    with pytest.raises(TokenError, match=reason):
        check_binding(claims, user, load_transfer_spec({"paths": ["f"], **spec}))  # type: ignore[dict-item]


def test_upload_destination_is_compared_in_one_spelling() -> None:
    claims = codec().verify(codec().issue_for_spec(UPLOAD, "xfer"))
    for dest in ("inbox/a", "/inbox/a/", "//inbox/./a", "/inbox/b/../a"):
        spec = {"direction": "send", "destination_root": dest, "paths": ["f"]}
        check_binding(claims, "xfer", load_transfer_spec(spec))


def test_download_token_binds_exact_sources() -> None:
    claims = codec().verify(codec().issue_for_spec(DOWNLOAD, "xfer"))
    subset = {"direction": "receive", "paths": [{"source": "/data/x.bin"}]}
    check_binding(claims, "xfer", load_transfer_spec(subset))  # a subset is fine
    for paths, root in (
        ([{"source": "other.bin"}], "/data"),
        ([{"source": "x.bin"}], "/"),  # same name, other folder
        ([{"source": "sub"}], "/data"),  # the parent of an authorized file
        ([{"source": "x.bin"}, {"source": "z"}], "/data"),
    ):
        spec = load_transfer_spec({"direction": "receive", "source_root": root, "paths": paths})
        with pytest.raises(TokenError, match="does not authorize downloading"):
            check_binding(claims, "xfer", spec)


def test_canonical_paths() -> None:
    assert canonical_path("") == "/"
    assert canonical_path("a//b/./c/") == "/a/b/c"
    assert canonical_path("/../../etc") == "/etc"  # lexical; the docroot check refuses later
    assert download_sources(DOWNLOAD) == ["/data/sub/y", "/data/x.bin"]


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "token.key"
    first = load_or_create_key(path)
    assert len(first) == 32 and path.stat().st_mode & 0o077 == 0
    assert load_or_create_key(path) == first


# --- logins ----------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_server_config(write_server_config(tmp_path))


def test_token_login_carries_the_claims_or_the_reason(config) -> None:  # type: ignore[no-untyped-def]
    c = codec_for_config(config)
    good = c.issue_for_spec(UPLOAD, "xfer")
    user = token_login(c, config, "xfer", good)
    assert isinstance(user, TokenUser) and user.claims is not None
    assert user.docroot == config.user("xfer").docroot
    # Refused tokens still "log in" (so the session can say why), with no rights at all.
    for name, token in (("alice", good), ("xfer", good[:-4]), ("nobody", good)):
        refused = token_login(c, config, name, token)
        assert refused.claims is None and refused.problem
        assert not (refused.read or refused.write or refused.browse)
        with pytest.raises(TokenError):
            require_token_grant(refused, UPLOAD)


async def test_token_only_users_cannot_use_passwords(config) -> None:  # type: ignore[no-untyped-def]
    auth = TokenAuthenticator(config, codec_for_config(config))
    assert (await auth.check_password("alice", PASSWORD)) is not None
    assert await auth.check_password("alice", "wrong") is None
    assert await auth.check_password("xfer", PASSWORD) is None  # token_only: no password
    token = codec_for_config(config).issue_for_spec(UPLOAD, "xfer")
    assert isinstance(await auth.check_password("xfer", token), TokenUser)


def test_admin_create_and_inspect(config) -> None:  # type: ignore[no-untyped-def]
    docroot = config.user("xfer").docroot
    (docroot / "projects" / "p1" / "f.txt").write_text("x")
    token, claims = admin_create(
        config,
        user="xfer",
        upload_to=None,
        download=["p1/f.txt"],
        source_root="/projects",
        life_seconds=120,
    )
    assert claims.paths == ("/projects/p1/f.txt",)
    shown, problem = admin_inspect(config, token)
    assert problem is None and shown["kind"] == "download" and shown["issuer"] == "admin"
    with pytest.raises(Exception, match="No such file"):
        admin_create(
            config,
            user="xfer",
            upload_to=None,
            download=["nope"],
            source_root=None,
            life_seconds=None,
        )
    with pytest.raises(UsageError):
        admin_create(
            config, user="ghost", upload_to="/", download=[], source_root=None, life_seconds=None
        )


def test_claims_are_compact_json_inside() -> None:
    # Decrypting with the right key shows exactly the documented fields.
    c = codec()
    claims = c.open(c.issue_for_spec(UPLOAD, "xfer", xfer_id="abc"))
    assert set(claims.to_json()) == {"v", "u", "d", "p", "iat", "exp", "jti", "iss", "x"}
    body = base64.urlsafe_b64decode(c.seal(claims)[len(TOKEN_PREFIX) :] + "==")
    with pytest.raises(ValueError):
        json.loads(body)  # not readable without the key
