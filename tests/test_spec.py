"""TransferSpec and the Connect data objects: seed examples, normalisation, exact errors."""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import pytest

from slipstream.errors import SpecError
from slipstream.spec import (
    EVENT,
    SPEC_ALIASES,
    STATUS,
    TRANSFER_STATUS,
    AllTransfersInfo,
    AsperaConnectSettings,
    ConnectSpec,
    FileFilters,
    FileSelection,
    PathPair,
    TransferInfo,
    TransferSpec,
    TransferSpecs,
    load_example,
    load_model,
    load_transfer_spec,
    parse_model_json,
    parse_transfer_spec_json,
)

# --- the seed's example objects, verbatim (placeholders filled in by the fixtures below) ----

MINIMAL: dict[str, Any] = {
    "paths": [{"source": "/foo/1"}],
    "remote_host": "10.0.203.80",
    "remote_user": "aspera",
    "direction": "send",
}

DOWNLOAD: dict[str, Any] = {
    "paths": [{"source": "tinyfile0001"}, {"source": "tinyfile0002"}],
    "obfuscate_file_names": False,
    "overwrite_policy": "diff",
    "remote_host": "demo.asperasoft.com",
    "remote_user": "asperaweb",
    "authentication": "password",
    "remote_password": "**********",
    "fasp_port": 33001,
    "ssh_port": 33001,
    "http_fallback": True,
    "http_fallback_port": 443,
    "direction": "receive",
    "create_dir": False,
    "source_root": "aspera-test-dir-tiny",
    "destination_root": "/temp",
    "rate_policy": "high",
    "target_rate_kbps": 1000,
    "min_rate_kbps": 100,
    "lock_rate_policy": False,
    "target_rate_cap_kbps": 2000,
    "lock_target_rate": False,
    "lock_min_rate": False,
    "resume": "sparse_checksum",
    "cipher": "aes-128",
    "cookie": "foobarbazqux",
    "dgram_size": 1492,
    "preserve_times": True,
    "tags": {"your_company": {"key": "value"}},
}

CONNECT_SETTINGS: dict[str, Any] = {
    "app_id": "TUyMGQyNDYtM2M1NS00YWRkLTg0MTMtOWQ2OTkxMjk5NGM4",
    "back_link": "http://demo.asperasoft.com",
    "request_id": "36d3c2a4-1856-47cf-9865-f8e3a8b47822",
}

CONNECT_SPEC: dict[str, Any] = {
    "allow_dialogs": False,
    "back_link": "www.foo.com",
    "return_paths": False,
    "return_files": False,
    "use_absolute_destination_path": True,
}

DATA_TRANSFER: dict[str, Any] = {
    "dataTransfer": {
        "files": [
            {
                "lastModifiedDate": "Wed Jan 24 12:22:02 2019",
                "name": "/Users/aspera/Desktop/foo.txt",
                "size": 386,
                "type": "text/plain",
            },
            {
                "lastModifiedDate": "Mon Jan 22 18:01:02 2019",
                "name": "/Users/aspera/Desktop/foo.rb",
                "size": 609,
                "type": "text/x-ruby-script",
            },
        ]
    }
}

FILE_FILTERS: list[dict[str, Any]] = [
    {"filter_name": "Text file", "extensions": ["txt"]},
    {"filter_name": "Image file", "extensions": ["jpg", "png"]},
    {"filter_name": "All types", "extensions": ["*"]},
]


def transfer_info(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "add_time": "2012-10-05T17:53:16",
        "aspera_connect_settings": CONNECT_SETTINGS,
        "bytes_expected": 102400,
        "bytes_written": 11616,
        "calculated_rate_kbps": 34,
        "current_file": "/temp/tinyfile0001",
        "elapsed_usec": 3000000,
        "explorer_path": "/Users/aspera/Downloads/connect_downloads/10MB.3",
        "end_time": "",
        "file_counts": {"attempted": 1, "completed": 1, "failed": 0, "skipped": 1},
        "files": [
            {
                "bytes_expected": 10485760,
                "bytes_written": 1523456,
                "fasp_file_id": "3c40b511-5b2dfebb-a2e63483-9b58cb45-9cd9abff",
                "file": "/Users/aspera/Downloads/connect_downloads/10MB.3",
            },
            {
                "bytes_expected": 10485760,
                "bytes_written": 10485760,
                "fasp_file_id": "d5b7deea-2d5878f4-222661f6-170ce0f2-68880a6c",
                "file": "/Users/aspera/Downloads/connect_downloads/10MB.2",
            },
        ],
        "modify_time": "2012-10-05T17:53:18",
        "percentage": 0.113438,
        "previous_status": "initiating",
        "remaining_usec": 21000000,
        "start_time": "2012-10-05T17:53:16",
        "status": "running",
        "title": "tinyfile0001",
        "transfer_iteration_token": 18,
        "transfer_spec": spec,
        "transport": "fasp",
        "uuid": "add433a8-c99b-4e3a-8fc0-4c7a24284ada",
    }


def canonical_download() -> dict[str, Any]:
    """DOWNLOAD as we write it back: overwrite_policy renamed, nothing else changed."""
    spec = dict(DOWNLOAD)
    spec["overwrite"] = spec.pop("overwrite_policy")
    return spec


def spec_with(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    spec.update(changes)
    return spec


def problems_of(obj: object) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        load_transfer_spec(obj)
    return info.value.problems


def rendered(obj: object) -> str:
    with pytest.raises(SpecError) as info:
        load_transfer_spec(obj)
    return info.value.user_message


# --- seed examples --------------------------------------------------------------------------


def test_minimal_example_round_trips() -> None:
    spec = load_transfer_spec(MINIMAL)
    assert spec.to_json_dict(explicit_only=True) == MINIMAL
    assert load_transfer_spec(spec.to_json_dict()) == spec


def test_download_example_validates_and_normalises() -> None:
    spec = load_transfer_spec(DOWNLOAD)
    assert spec.overwrite == "diff"
    assert spec.direction == "receive"
    assert spec.http_fallback is True
    assert spec.preserve_times is True
    assert spec.tags == {"your_company": {"key": "value"}}
    out = spec.to_json_dict()
    assert "overwrite_policy" not in out
    assert out["overwrite"] == "diff"
    assert spec.to_json_dict(explicit_only=True) == canonical_download()
    assert load_transfer_spec(out).to_json_dict() == out


@pytest.mark.parametrize(
    ("model", "example"),
    [
        (AsperaConnectSettings, CONNECT_SETTINGS),
        (ConnectSpec, CONNECT_SPEC),
        (FileSelection, DATA_TRANSFER),
        (TransferInfo, transfer_info(MINIMAL)),
        (TransferInfo, transfer_info(canonical_download())),
        (AllTransfersInfo, {"iteration_token": 28, "result_count": 3, "transfers": []}),
        (
            AllTransfersInfo,
            {
                "iteration_token": 28,
                "result_count": 3,
                "transfers": [transfer_info(MINIMAL)] * 2 + [transfer_info(canonical_download())],
            },
        ),
        (
            TransferSpecs,
            {
                "transfer_specs": [
                    {"transfer_spec": canonical_download(), "aspera_connect_settings": CONNECT_SPEC}
                ]
            },
        ),
    ],
)
def test_seed_objects_round_trip(model: type[Any], example: dict[str, Any]) -> None:
    loaded = load_model(model, example)
    assert loaded.to_json_dict(explicit_only=True) == example
    again = load_model(model, loaded.to_json_dict())
    assert again == loaded
    assert again.to_json_dict() == loaded.to_json_dict()


def test_transfer_info_types() -> None:
    info = load_model(TransferInfo, transfer_info(DOWNLOAD))
    assert info.status is TRANSFER_STATUS.RUNNING
    assert info.previous_status is TRANSFER_STATUS.INITIATING
    assert info.file_counts is not None and info.file_counts.skipped == 1
    assert info.files is not None and info.files[1].bytes_written == 10485760
    assert info.transfer_spec is not None and info.transfer_spec.overwrite == "diff"
    assert info.aspera_connect_settings is not None
    assert info.aspera_connect_settings.request_id == CONNECT_SETTINGS["request_id"]
    assert info.to_json_dict()["transfer_spec"]["overwrite"] == "diff"


def test_data_transfer_uses_camel_case_names() -> None:
    selection = load_model(FileSelection, DATA_TRANSFER)
    first = selection.data_transfer.files[0]
    assert first.last_modified_date == "Wed Jan 24 12:22:02 2019"
    assert first.size == 386 and first.type == "text/plain"


def test_file_filters_round_trip() -> None:
    filters = FileFilters.model_validate(FILE_FILTERS)
    assert filters.root[1].extensions == ["jpg", "png"]
    assert filters.to_json_list() == FILE_FILTERS


def test_connect_spec_defaults() -> None:
    spec = ConnectSpec()
    assert spec.allow_dialogs and spec.return_files and spec.return_paths
    assert not spec.use_absolute_destination_path


def test_enums_have_the_seed_values() -> None:
    assert [s.value for s in STATUS] == [
        "INITIALIZING",
        "RETRYING",
        "RUNNING",
        "OUTDATED",
        "FAILED",
        "EXTENSION_INSTALL",
    ]
    assert {s.value for s in TRANSFER_STATUS} == {
        "cancelled",
        "completed",
        "failed",
        "initiating",
        "queued",
        "removed",
        "running",
        "willretry",
    }
    assert [e.value for e in EVENT] == ["all", "transfer", "status"]
    assert str(EVENT.ALL) == "all" and json.dumps(TRANSFER_STATUS.WILLRETRY) == '"willretry"'


# --- bundled examples -------------------------------------------------------------------------


def test_bundled_download_is_the_seed_example() -> None:
    text = resources.files("slipstream").joinpath("examples", "download.json").read_text()
    assert json.loads(text) == DOWNLOAD
    assert load_example("download").to_json_dict(explicit_only=True) == canonical_download()


def test_bundled_upload_targets_loopback() -> None:
    spec = load_example("upload")
    assert spec.direction == "send"
    assert spec.remote_host == "127.0.0.1"
    assert spec.paths


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_are_the_seeds() -> None:
    spec = load_transfer_spec(MINIMAL)
    assert spec.cipher == "aes-128"
    assert spec.fasp_port == 33001 and spec.ssh_port == 33001
    assert spec.overwrite == "diff"
    assert spec.resume == "sparse_checksum"
    assert spec.rate_policy == "fair"
    assert spec.create_dir is False
    assert spec.authentication == "password"
    assert spec.destination_root is None
    assert spec.http_fallback is False
    assert spec.save_before_overwrite is False
    assert spec.symlink_policy is None and spec.file_checksum is None


def test_none_fields_are_omitted_and_null_means_not_given() -> None:
    spec = load_transfer_spec(spec_with(destination_root=None, cipher=None, token=None))
    out = spec.to_json_dict()
    assert "destination_root" not in out and "token" not in out
    assert out["cipher"] == "aes-128"
    assert "cipher" not in spec.to_json_dict(explicit_only=True)


# --- unknown fields -----------------------------------------------------------------------------


def test_unknown_fields_round_trip_unchanged() -> None:
    extras = {
        "x_vendor": {"nested": [1, 2.5, None, {"deep": True}]},
        "future_flag": None,
        "ascp_args": ["-v"],
    }
    source = spec_with(**extras)
    source["paths"] = [{"source": "a", "checksum": "abc", "nothing": None}]
    spec = load_transfer_spec(source)
    out = spec.to_json_dict()
    for key, value in extras.items():
        assert out[key] == value
    assert out["paths"] == [{"source": "a", "checksum": "abc", "nothing": None}]
    assert spec.to_json_dict(explicit_only=True) == source
    assert load_transfer_spec(out).to_json_dict() == out


# --- aliases and canonical values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "field", "expected"),
    [
        ({"overwrite_policy": "none"}, "overwrite", "never"),
        ({"overwrite_policy": "diff+older"}, "overwrite", "diff+older"),
        ({"overwrite": "ALWAYS"}, "overwrite", "always"),
        ({"overwrite": "none"}, "overwrite", "never"),
        ({"resume_policy": "attrs"}, "resume", "attributes"),
        ({"resume": "sparse_csum"}, "resume", "sparse_checksum"),
        ({"resume": "full_csum"}, "resume", "full_checksum"),
        ({"resume": 0}, "resume", "none"),
        ({"resume": 1}, "resume", "attributes"),
        ({"resume": 2}, "resume", "sparse_checksum"),
        ({"resume_policy": "3"}, "resume", "full_checksum"),
        ({"save-before-overwrite": "yes"}, "save_before_overwrite", True),
        ({"save-before-overwrite": "no"}, "save_before_overwrite", False),
        ({"save-before-overwrite": True}, "save_before_overwrite", True),
        ({"save_before_overwrite": "yes"}, "save_before_overwrite", True),
        ({"content_protection_password": "s3"}, "content_protection_passphrase", "s3"),
        ({"lock_target_rate_kbps": True}, "lock_target_rate", True),
        ({"lock_min_rate_kbps": True}, "lock_min_rate", True),
        ({"remove_empty_source_dir": True}, "remove_empty_source_directory", True),
        ({"cipher": "aes128"}, "cipher", "aes-128"),
        ({"cipher": "AES-128"}, "cipher", "aes-128"),
        ({"cipher": "aes-128-gcm"}, "cipher", "aes-128"),
        ({"cipher": "aes-256-cfb"}, "cipher", "aes-256"),
        ({"cipher": "Aes192"}, "cipher", "aes-192"),
        ({"cipher": "NONE"}, "cipher", "none"),
        ({"symlink_policy": "copy+force"}, "symlink_policy", "copy+force"),
        ({"file_checksum": "sha-256"}, "file_checksum", "sha256"),
        ({"file_checksum": "SHA-512"}, "file_checksum", "sha512"),
        ({"file_checksum": "md5"}, "file_checksum", "md5"),
        ({"http_fallback": "force"}, "http_fallback", "force"),
        ({"http_fallback": "yes"}, "http_fallback", True),
        ({"rate_policy": "FIXED"}, "rate_policy", "fixed"),
        ({"exclude_newer_than": "-3600"}, "exclude_newer_than", -3600),
        (
            {"exclude_older_than": "2024-01-01T00:00:00Z"},
            "exclude_older_than",
            "2024-01-01T00:00:00Z",
        ),
    ],
)
def test_aliases_and_values_are_normalised(
    given: dict[str, Any], field: str, expected: Any
) -> None:
    spec = load_transfer_spec(spec_with(**given))
    assert getattr(spec, field) == expected
    out = spec.to_json_dict()
    assert out[field] == expected
    assert not set(SPEC_ALIASES) & set(out)


def test_alias_agreeing_with_canonical_is_accepted() -> None:
    spec = load_transfer_spec(
        spec_with(overwrite="never", overwrite_policy="none", resume=1, resume_policy="attrs")
    )
    assert (spec.overwrite, spec.resume) == ("never", "attributes")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"overwrite": "never", "overwrite_policy": "always"},
            "overwrite ('never') conflicts with its alias overwrite_policy ('always')",
        ),
        (
            {"resume": "none", "resume_policy": "full_csum"},
            "resume ('none') conflicts with its alias resume_policy ('full_csum')",
        ),
        (
            {"save_before_overwrite": False, "save-before-overwrite": "yes"},
            "save_before_overwrite (false) conflicts with its alias save-before-overwrite ('yes')",
        ),
        (
            {"content_protection_passphrase": "a", "content_protection_password": "b"},
            "content_protection_passphrase ('a') conflicts with its alias "
            "content_protection_password ('b')",
        ),
        (
            {"lock_min_rate": True, "lock_min_rate_kbps": False},
            "lock_min_rate (true) conflicts with its alias lock_min_rate_kbps (false)",
        ),
    ],
)
def test_alias_conflicts_name_both_fields(given: dict[str, Any], message: str) -> None:
    assert ("", message) in problems_of(spec_with(**given))


def test_alias_conflict_is_reported_with_other_problems() -> None:
    problems = problems_of(spec_with(overwrite="never", overwrite_policy="always", ssh_port=0))
    assert ("ssh_port", "must be between 1 and 65535 (got 0)") in problems
    assert len(problems) == 2


def test_model_validate_also_normalises_aliases() -> None:
    spec = TransferSpec.model_validate(spec_with(overwrite_policy="none"))
    assert spec.overwrite == "never"


# --- exact error messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            spec_with(rate_policy="turbo"),
            "rate_policy: must be one of fixed, high, fair, low (got 'turbo')",
        ),
        (
            spec_with(
                paths=[
                    {"source": "a", "destination": "x"},
                    {"source": "b", "destination": "y"},
                    {"source": "c"},
                ]
            ),
            "paths[2]: every element needs 'destination' once one has it",
        ),
        (
            spec_with(min_rate_kbps=5000, target_rate_kbps=1000),
            "min_rate_kbps (5000) exceeds target_rate_kbps (1000)",
        ),
        (spec_with(ssh_port=70000), "ssh_port: must be between 1 and 65535 (got 70000)"),
        (spec_with(fasp_port=0), "fasp_port: must be between 1 and 65535 (got 0)"),
        (
            spec_with(http_fallback_port=65536),
            "http_fallback_port: must be between 1 and 65535 (got 65536)",
        ),
        (
            spec_with(https_fallback_port=-1),
            "https_fallback_port: must be between 1 and 65535 (got -1)",
        ),
        (
            spec_with(direction="sideways"),
            "direction: must be one of send, receive (got 'sideways')",
        ),
        (spec_with(paths=[]), "paths: must not be empty"),
    ],
)
def test_exact_messages(spec: dict[str, Any], message: str) -> None:
    assert rendered(spec) == message


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({k: v for k, v in MINIMAL.items() if k != "direction"}, ("direction", "is required")),
        ({k: v for k, v in MINIMAL.items() if k != "paths"}, ("paths", "is required")),
        (spec_with(paths=[{"destination": "x"}]), ("paths[0].source", "is required")),
        (spec_with(paths=[{"source": 5}]), ("paths[0].source", "must be a string (got 5)")),
        (spec_with(paths=[{"source": ""}]), ("paths[0].source", "must not be empty")),
        (spec_with(paths=[7]), ("paths[0]", "must be an object (got 7)")),
        (spec_with(paths="a"), ("paths", "must be a list (got 'a')")),
        (spec_with(target_rate_kbps=-1), ("target_rate_kbps", "must not be negative (got -1)")),
        (spec_with(min_rate_kbps=-5), ("min_rate_kbps", "must not be negative (got -5)")),
        (
            spec_with(target_rate_cap_kbps=-2),
            ("target_rate_cap_kbps", "must not be negative (got -2)"),
        ),
        (spec_with(target_rate_kbps=1.5), ("target_rate_kbps", "must be an integer (got 1.5)")),
        (spec_with(target_rate_kbps=True), ("target_rate_kbps", "must be an integer (got true)")),
        (spec_with(dgram_size=295), ("dgram_size", "must be between 296 and 65507 (got 295)")),
        (spec_with(dgram_size=65508), ("dgram_size", "must be between 296 and 65507 (got 65508)")),
        (spec_with(multi_session=0), ("multi_session", "must be between 1 and 128 (got 0)")),
        (spec_with(remote_host=""), ("remote_host", "must not be empty")),
        (spec_with(remote_host=12), ("remote_host", "must be a string (got 12)")),
        (spec_with(create_dir="maybe"), ("create_dir", "must be true or false (got 'maybe')")),
        (spec_with(tags=[1]), ("tags", "must be an object (got [1])")),
        (
            spec_with(cipher="rot13"),
            ("cipher", "must be one of none, aes-128, aes-192, aes-256 (got 'rot13')"),
        ),
        (
            spec_with(overwrite="sometimes"),
            (
                "overwrite",
                "must be one of never, always, diff, older, diff+older (got 'sometimes')",
            ),
        ),
        (
            spec_with(resume=4),
            ("resume", "must be one of none, attributes, sparse_checksum, full_checksum (got 4)"),
        ),
        (
            spec_with(symlink_policy="hardlink"),
            ("symlink_policy", "must be one of follow, copy, copy+force, skip (got 'hardlink')"),
        ),
        (
            spec_with(http_fallback="sometimes"),
            ("http_fallback", "must be true, false or 'force' (got 'sometimes')"),
        ),
        (
            spec_with(target_rate_kbps=3000, target_rate_cap_kbps=2000),
            ("", "target_rate_kbps (3000) exceeds target_rate_cap_kbps (2000)"),
        ),
        (
            spec_with(move_after_transfer="/archive", remove_after_transfer=True),
            ("", "move_after_transfer and remove_after_transfer cannot both be set"),
        ),
        ([1, 2], ("", "must be an object (got [1, 2])")),
        pytest.param("x" * 100, ("", f"must be an object (got '{'x' * 56}...)"), id="long"),
    ],
)
def test_problem_is_reported(spec: object, problem: tuple[str, str]) -> None:
    assert problem in problems_of(spec)


def test_every_problem_is_listed_at_once() -> None:
    spec = spec_with(
        direction="sideways",
        rate_policy="turbo",
        ssh_port=70000,
        paths=[{"source": "a", "destination": "x"}, {"source": 3}, {"source": "c"}],
        min_rate_kbps=5000,
        target_rate_kbps=1000,
    )
    problems = problems_of(spec)
    assert set(problems) == {
        ("direction", "must be one of send, receive (got 'sideways')"),
        ("rate_policy", "must be one of fixed, high, fair, low (got 'turbo')"),
        ("ssh_port", "must be between 1 and 65535 (got 70000)"),
        ("paths[1].source", "must be a string (got 3)"),
        ("paths[1]", "every element needs 'destination' once one has it"),
        ("paths[2]", "every element needs 'destination' once one has it"),
        ("", "min_rate_kbps (5000) exceeds target_rate_kbps (1000)"),
    }
    assert len(problems) == len(set(problems))


def test_min_rate_above_target_is_reported_once() -> None:
    problems = problems_of(
        spec_with(min_rate_kbps=5000, target_rate_kbps=1000, target_rate_cap_kbps=2000)
    )
    assert problems == [("", "min_rate_kbps (5000) exceeds target_rate_kbps (1000)")]


def test_zero_caps_mean_no_cap() -> None:
    spec = load_transfer_spec(
        spec_with(
            target_rate_kbps=5000, target_rate_cap_kbps=0, min_rate_cap_kbps=0, min_rate_kbps=10
        )
    )
    assert spec.target_rate_kbps == 5000


def test_keepalive_spec_may_omit_paths() -> None:
    spec = load_transfer_spec({"direction": "send", "keepalive": True})
    assert spec.paths is None and spec.path_pairs() == []


def test_nested_spec_errors_carry_the_full_path() -> None:
    bad = {
        "transfer_specs": [
            {
                "transfer_spec": spec_with(
                    rate_policy="turbo",
                    paths=[{"source": "a", "destination": "b"}, {"source": "c"}],
                )
            }
        ]
    }
    with pytest.raises(SpecError) as info:
        load_model(TransferSpecs, bad)
    assert info.value.problems == [
        (
            "transfer_specs[0].transfer_spec.rate_policy",
            "must be one of fixed, high, fair, low (got 'turbo')",
        )
    ]
    fixed = copy.deepcopy(bad)
    fixed["transfer_specs"][0]["transfer_spec"]["rate_policy"] = "low"
    with pytest.raises(SpecError) as info:
        load_model(TransferSpecs, fixed)
    assert info.value.problems == [
        (
            "transfer_specs[0].transfer_spec.paths[1]",
            "every element needs 'destination' once one has it",
        )
    ]


def test_spec_error_is_the_registered_error() -> None:
    with pytest.raises(SpecError) as info:
        load_transfer_spec(spec_with(rate_policy="turbo"))
    assert info.value.code == 52 and not info.value.retryable
    assert info.value.to_dict()["user_message"] == info.value.user_message


def test_secrets_stay_out_of_repr() -> None:
    spec = load_transfer_spec(
        spec_with(remote_password="hunter2", token="ATM123", ssh_private_key="PEM")
    )
    assert "hunter2" not in repr(spec) and "ATM123" not in repr(spec) and "PEM" not in repr(spec)
    assert spec.to_json_dict()["remote_password"] == "hunter2"


# --- JSON text ----------------------------------------------------------------------------------


def test_json_text_is_parsed() -> None:
    spec = parse_transfer_spec_json(json.dumps(DOWNLOAD, indent=2))
    assert spec.to_json_dict(explicit_only=True) == canonical_download()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '{\n  "direction": "send",\n}',
            "invalid JSON at line 3, column 1: Expecting property name enclosed in double quotes",
        ),
        ("", "invalid JSON at line 1, column 1: Expecting value"),
        (
            '{"direction": "send" "paths": []}',
            "invalid JSON at line 1, column 22: Expecting ',' delimiter",
        ),
        ('{"cipher": "none", "cipher": "aes-128"}', "invalid JSON: duplicate key 'cipher'"),
        pytest.param("[" * 100_000, "invalid JSON: nested too deeply", id="deep"),
    ],
)
def test_bad_json_is_a_spec_error(text: str, problem: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_transfer_spec_json(text)
    assert info.value.problems == [("", problem)]


def test_json_of_the_wrong_shape_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as info:
        parse_transfer_spec_json('"a string"')
    assert info.value.problems == [("", "must be an object (got 'a string')")]
    with pytest.raises(SpecError):
        parse_model_json(TransferInfo, '{"status": "exploded"}')


# --- path model ---------------------------------------------------------------------------------


def test_pair_format() -> None:
    spec = load_transfer_spec(spec_with(paths=[{"source": "a/x", "destination": "y"}]))
    assert spec.is_pair_format
    assert spec.path_pairs() == [PathPair(source="a/x", destination="y")]


def test_source_list() -> None:
    spec = load_transfer_spec(spec_with(src_base="/data", paths=[{"source": "/data/a"}, "b/"]))
    assert not spec.is_pair_format
    assert [(p.source, p.destination) for p in spec.path_pairs()] == [
        ("/data/a", None),
        ("b/", None),
    ]


def test_path_pairs_are_copies() -> None:
    spec = load_transfer_spec(spec_with(paths=[{"source": "a", "extra": {"k": 1}}]))
    pairs = spec.path_pairs()
    pairs[0].source = "changed"
    assert spec.paths is not None and spec.paths[0].source == "a"
    assert pairs[0].model_extra == {"extra": {"k": 1}}


def test_bare_strings_become_path_objects() -> None:
    spec = load_transfer_spec(spec_with(paths=["a", "b"]))
    assert spec.to_json_dict()["paths"] == [{"source": "a"}, {"source": "b"}]
