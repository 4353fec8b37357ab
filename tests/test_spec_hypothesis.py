"""Property tests: normalisation is stable, and bad input only ever becomes a SpecError."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.errors import SpecError
from slipstream.spec import TransferSpec, load_transfer_spec, parse_transfer_spec_json

text = st.text(min_size=1, max_size=12)
port = st.integers(1, 65535)
rate = st.integers(0, 10_000_000)

# Plain JSON: no NaN or infinity (not JSON; pydantic writes them as null).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)

# Each option: canonical name -> strategy of accepted spellings, including aliases' values.
OPTIONS: dict[str, st.SearchStrategy[Any]] = {
    "remote_host": st.sampled_from(["127.0.0.1", "::1", "demo.example.com"]),
    "remote_user": text,
    "remote_password": text,
    "authentication": st.sampled_from(["password", "token"]),
    "token": text,
    "cookie": text,
    "tags": st.dictionaries(text, json_values, max_size=2),
    "title": text,
    "ssh_port": port,
    "fasp_port": port,
    "http_fallback": st.sampled_from([True, False, "force", "FORCE", "yes", "no"]),
    "http_fallback_port": port,
    "https_fallback_port": port,
    "dgram_size": st.integers(296, 65507),
    "multi_session": st.integers(1, 128),
    "multi_session_threshold": st.integers(0, 2**40),
    "source_root": text,
    "destination_root": text,
    "src_base": text,
    "create_dir": st.booleans(),
    "target_rate_kbps": rate,
    "rate_policy": st.sampled_from(["fixed", "high", "fair", "low", "Fair"]),
    "lock_rate_policy": st.booleans(),
    "lock_target_rate": st.booleans(),
    "lock_min_rate": st.booleans(),
    "cipher": st.sampled_from(
        ["none", "aes-128", "aes128", "AES-256-GCM", "aes_192", "aes-256-cfb"]
    ),
    "content_protection": st.sampled_from(["encrypt", "decrypt"]),
    "content_protection_passphrase": text,
    "obfuscate_file_names": st.booleans(),
    "overwrite": st.sampled_from(["never", "none", "always", "diff", "older", "diff+older"]),
    "resume": st.sampled_from(
        ["none", "attrs", "attributes", "sparse_csum", "full_checksum", 0, 1, 2, 3, "2"]
    ),
    "save_before_overwrite": st.sampled_from([True, False, "yes", "no"]),
    "symlink_policy": st.sampled_from(["follow", "copy", "copy+force", "skip"]),
    "file_checksum": st.sampled_from(["none", "md5", "sha1", "sha-256", "SHA384", "sha512"]),
    "exclude_newer_than": st.integers(-(2**31), 2**31),
    "exclude_patterns": st.lists(text, max_size=3),
    "include_patterns": st.lists(text, max_size=3),
    "preserve_times": st.booleans(),
    "preserve_acls": st.sampled_from(["none", "native", "metafile"]),
    "remove_after_transfer": st.booleans(),
    "remove_empty_directories": st.booleans(),
    "delete_before_transfer": st.booleans(),
    "keepalive": st.booleans(),
}
ALIASES = {
    "overwrite": "overwrite_policy",
    "resume": "resume_policy",
    "save_before_overwrite": "save-before-overwrite",
    "content_protection_passphrase": "content_protection_password",
    "lock_target_rate": "lock_target_rate_kbps",
    "lock_min_rate": "lock_min_rate_kbps",
}
UNKNOWN = st.dictionaries(text.map(lambda key: "x_" + key), json_values, max_size=3)


@st.composite
def path_lists(draw: st.DrawFn) -> list[Any]:
    sources = draw(st.lists(text, min_size=1, max_size=4))
    if draw(st.booleans()):
        return [{"source": s, "destination": draw(text)} for s in sources]
    return [draw(st.sampled_from([{"source": s}, s])) for s in sources]


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "direction": draw(st.sampled_from(["send", "receive"])),
        "paths": draw(path_lists()),
    }
    for name in draw(st.sets(st.sampled_from(sorted(OPTIONS)))):
        key = ALIASES[name] if name in ALIASES and draw(st.booleans()) else name
        spec[key] = draw(OPTIONS[name])
    if spec.get("target_rate_kbps") is not None and draw(st.booleans()):
        spec["min_rate_kbps"] = draw(st.integers(0, spec["target_rate_kbps"]))
    spec.update(draw(UNKNOWN))
    return spec


@settings(max_examples=150, deadline=None)
@given(specs())
def test_normalised_form_is_stable(raw: dict[str, Any]) -> None:
    spec = load_transfer_spec(raw)
    first = spec.to_json_dict()
    again = load_transfer_spec(first)
    assert again == spec
    assert again.to_json_dict() == first
    assert json.loads(json.dumps(first)) == first  # plain JSON
    assert parse_transfer_spec_json(json.dumps(first)).to_json_dict() == first
    for key in raw:
        if key.startswith("x_"):
            assert first[key] == raw[key]


@settings(max_examples=100, deadline=None)
@given(specs())
def test_explicit_only_is_stable(raw: dict[str, Any]) -> None:
    explicit = load_transfer_spec(raw).to_json_dict(explicit_only=True)
    assert load_transfer_spec(explicit).to_json_dict(explicit_only=True) == explicit


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(TransferSpec.model_fields) + ["overwrite_policy"]), json_values
    )
)
def test_arbitrary_values_only_raise_spec_error(raw: dict[str, Any]) -> None:
    try:
        load_transfer_spec(raw)
    except SpecError as exc:
        assert exc.problems
        assert all(
            isinstance(loc, str) and isinstance(why, str) and why for loc, why in exc.problems
        )


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_arbitrary_text_only_raises_spec_error(data: str) -> None:
    try:
        parse_transfer_spec_json(data)
    except SpecError as exc:
        assert exc.problems
