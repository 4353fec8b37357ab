"""Spec combinations refused before anything connects, and the metadata that travels."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from slipstream.engine.semantics import check_file_semantics, session_metadata
from slipstream.errors import UsageError
from slipstream.spec import load_transfer_spec


def spec(**fields: Any):  # type: ignore[no-untyped-def]
    return load_transfer_spec({"direction": "send", "paths": [{"source": "a"}], **fields})


@pytest.mark.parametrize(
    ("fields", "client", "message"),
    [
        ({"content_protection": "encrypt"}, True, "passphrase"),
        (
            {
                "direction": "receive",
                "content_protection": "encrypt",
                "content_protection_passphrase": "p",
            },
            True,
            "uploads",
        ),
        (
            {"content_protection": "decrypt", "content_protection_passphrase": "p"},
            True,
            "downloads",
        ),
        (
            {"content_protection": "encrypt", "content_protection_extension": "no-dot"},
            False,
            "start with",
        ),
        ({"delete_before_transfer": True, "multi_session": 2}, False, "multi_session"),
        ({"filters": ["- [z-a]"]}, False, "not a valid glob"),
    ],
)
def test_refused_combinations(fields: dict[str, Any], client: bool, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_file_semantics(spec(**fields), client=client)


def test_the_server_never_needs_the_passphrase() -> None:
    check_file_semantics(spec(content_protection="encrypt"), client=False)


def test_session_metadata() -> None:
    assert session_metadata(spec()) == {}
    tags = {"aspera": {"xfer_id": "x"}}
    assert session_metadata(spec(cookie="c", tags=tags)) == {"cookie": "c", "tags": tags}
    encoded = base64.b64encode(json.dumps(tags).encode()).decode()
    assert session_metadata(spec(tags64=encoded)) == {"tags": tags}
