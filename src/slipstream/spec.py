"""The transfer spec and the other Connect data objects, as pydantic v2 models.

One JSON :class:`TransferSpec` is the contract between the CLI, the agent (fed by the official
Connect SDK), the server's setup API and the engine. It is validated and normalised exactly
once, here, at the edge:

* **Canonical names.** Connect and ascli spell some fields differently; the aliases in
  :data:`SPEC_ALIASES` are renamed to the canonical field before validation, and a spec that
  gives an alias *and* its canonical field with different values is refused (we cannot know
  which one the sender meant).
* **Canonical values.** ``overwrite`` none→never, ``resume`` attrs/sparse_csum/full_csum or
  ascp's ``-k 0..3``, ``cipher`` aes128/AES-128-GCM…, ``file_checksum`` sha-256…, and
  ``save_before_overwrite`` "yes"/"no" all become one spelling, so downstream code compares
  against a single value.
* **Unknown fields are kept** (``extra="allow"``) and written back unchanged: a spec from a
  newer Connect or a server extension must survive a round trip through us.
* **None means omitted.** ``null`` in the input is treated as an absent field, and absent
  optional fields are left out of :meth:`TransferSpec.to_json_dict`. Fields whose default
  the Connect reference states (``cipher``, ports, ``overwrite``…) get that default; every
  other option stays ``None`` so the engine or the server decides.
* **Every problem at once.** :func:`load_transfer_spec` raises one
  :class:`~slipstream.errors.SpecError` whose ``problems`` list every ``(field path, reason)``,
  with paths like ``paths[2].source``. Problems that involve two fields carry an empty path
  and name both fields in the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import StrEnum
from importlib import resources
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from slipstream.errors import SpecError

__all__ = [
    "EVENT",
    "SPEC_ALIASES",
    "STATUS",
    "TRANSFER_STATUS",
    "AllTransfersInfo",
    "AsperaConnectSettings",
    "Cipher",
    "ConnectSpec",
    "DataTransfer",
    "Direction",
    "FileChecksum",
    "FileCounts",
    "FileFilter",
    "FileFilters",
    "FileSelection",
    "OverwritePolicy",
    "PathPair",
    "RatePolicy",
    "ResumePolicy",
    "SelectedFile",
    "SymlinkPolicy",
    "TransferFileInfo",
    "TransferInfo",
    "TransferSpec",
    "TransferSpecEntry",
    "TransferSpecs",
    "load_example",
    "load_model",
    "load_transfer_spec",
    "parse_model_json",
    "parse_transfer_spec_json",
    "problems_from_validation_error",
]

Problem = tuple[str, str]

# --- Connect enums ------------------------------------------------------------------------


class STATUS(StrEnum):
    """``AW4.Connect.STATUS``: the state of the connection to the local agent."""

    INITIALIZING = "INITIALIZING"
    RETRYING = "RETRYING"
    RUNNING = "RUNNING"
    OUTDATED = "OUTDATED"
    FAILED = "FAILED"
    EXTENSION_INSTALL = "EXTENSION_INSTALL"


class TRANSFER_STATUS(StrEnum):  # noqa: N801  (the Connect name, kept for recognisability)
    """``AW4.Connect.TRANSFER_STATUS``: the ``status`` of a :class:`TransferInfo`."""

    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"
    INITIATING = "initiating"
    QUEUED = "queued"
    REMOVED = "removed"
    RUNNING = "running"
    WILLRETRY = "willretry"


class EVENT(StrEnum):
    """``AW4.Connect.EVENT``: what a listener subscribes to."""

    ALL = "all"
    TRANSFER = "transfer"
    STATUS = "status"


# --- friendly errors ----------------------------------------------------------------------

# A validator that has several (loc, reason) pairs to report raises one error of this type
# carrying them in ``ctx``; problems_from_validation_error() unpacks it again.
_MANY = "slipstream_problems"
_ONE = "slipstream"


def _reason(text: str) -> PydanticCustomError:
    return PydanticCustomError(_ONE, "{reason}", {"reason": text})


def _many(problems: list[Problem]) -> PydanticCustomError:
    summary = "; ".join(f"{loc}: {why}" if loc else why for loc, why in problems)
    return PydanticCustomError(_MANY, "{summary}", {"summary": summary, "problems": problems})


def _show(value: object) -> str:
    """A value as the user wrote it (JSON-ish; strings quoted), shortened for messages."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join_loc(outer: str, inner: str) -> str:
    if not outer or not inner:
        return outer or inner
    return outer + inner if inner.startswith("[") else f"{outer}.{inner}"


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text = _join_loc(text, f"[{part}]" if isinstance(part, int) else str(part))
    return text


_TYPE_WORDS: Final = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
}


def _pydantic_reason(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "is required"
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]} (got {_show(err['input'])})"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        return f"must be one of {', '.join(choices)} (got {_show(err['input'])})"
    message = str(err["msg"])
    return message if kind == _ONE else message[:1].lower() + message[1:]


def problems_from_validation_error(exc: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into ``(field path, reason)`` pairs a user can act on."""
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        where = _format_loc(err["loc"])
        if err["type"] == _MANY:
            inner: list[Problem] = err["ctx"]["problems"]
            problems.extend((_join_loc(where, loc), why) for loc, why in inner)
        else:
            problems.append((where, _pydantic_reason(err)))
    return problems


# --- value checkers -----------------------------------------------------------------------

_INT_TEXT = re.compile(r"\s*[-+]?[0-9]{1,20}\s*")


def _as_int(value: object) -> int | None:
    """An int from an int, an integral float or a decimal string; never from a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    return None


_BOOL: Final = TypeAdapter(bool)


def _as_bool(value: object) -> bool | None:
    """pydantic's lenient bool (true/false, yes/no, 1/0, on/off), or None if not one."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return None


def _range_text(lo: int | None, hi: int | None, got: int) -> str:
    if lo is not None and hi is not None:
        return f"must be between {lo} and {hi} (got {got})"
    if lo == 0:
        return f"must not be negative (got {got})"
    return (
        f"must be at least {lo} (got {got})"
        if lo is not None
        else f"must be at most {hi} (got {got})"
    )


def _int_in(lo: int | None = None, hi: int | None = None) -> BeforeValidator:
    def check(value: object) -> int:
        number = _as_int(value)
        if number is None:
            raise _reason(f"must be an integer (got {_show(value)})")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            raise _reason(_range_text(lo, hi, number))
        return number

    return BeforeValidator(check)


def _check_number(value: object) -> int | float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise _reason(f"must be a number (got {_show(value)})")


def _check_not_empty(value: str) -> str:
    if not value:
        raise _reason("must not be empty")
    return value


def _check_filter_rule(value: str) -> str:
    if len(value) < 3 or value[:2] not in ("- ", "+ "):
        raise _reason(f"must be '- PATTERN' or '+ PATTERN' (got {_show(value)})")
    return value


def _check_http_fallback(value: object) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "force":
        return "force"
    flag = _as_bool(value)
    if flag is None:
        raise _reason(f"must be true, false or 'force' (got {_show(value)})")
    return flag


def _check_time_filter(value: object) -> int | str:
    """Epoch seconds (negative: relative to now, as ascp) or an ISO-8601 time (as the SDK)."""
    number = _as_int(value)
    if number is not None:
        return number
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value.strip())
            return value.strip()
        except ValueError:
            pass
    raise _reason(f"must be epoch seconds or an ISO-8601 time (got {_show(value)})")


def _check_duration(value: object) -> int | str:
    number = _as_int(value)
    if number is not None and number >= 0:
        return number
    if isinstance(value, str) and value.strip() and number is None:
        return value.strip()
    raise _reason(f"must be a number of seconds or a duration string (got {_show(value)})")


Port = Annotated[int, _int_in(1, 65535)]
NonNegativeInt = Annotated[int, _int_in(0)]
AnyInt = Annotated[int, _int_in()]
Number = Annotated[int | float, BeforeValidator(_check_number)]
NonEmptyStr = Annotated[str, AfterValidator(_check_not_empty)]

# --- enumerated values and their accepted spellings -----------------------------------------

Normaliser = Callable[[object], str | None]

Direction = Literal["send", "receive"]
Authentication = Literal["password", "token"]
RatePolicy = Literal["fixed", "high", "fair", "low"]
OverwritePolicy = Literal["never", "always", "diff", "older", "diff+older"]
ResumePolicy = Literal["none", "attributes", "sparse_checksum", "full_checksum"]
Cipher = Literal["none", "aes-128", "aes-192", "aes-256"]
SymlinkPolicy = Literal["follow", "copy", "copy+force", "skip"]
FileChecksum = Literal["none", "md5", "sha1", "sha256", "sha384", "sha512"]
ContentProtection = Literal["encrypt", "decrypt"]
AttributePreservation = Literal["none", "native", "metafile"]
Transport = Literal["fasp", "http"]


def _lookup(choices: Any, aliases: Mapping[str, str] | None = None) -> Normaliser:
    """Case-insensitive match of a Literal's values, plus extra spellings."""
    table = {value: value for value in get_args(choices)} | dict(aliases or {})

    def normalise(value: object) -> str | None:
        return table.get(value.strip().lower()) if isinstance(value, str) else None

    return normalise


_CIPHER_TEXT = re.compile(r"aes[-_]?(128|192|256)(?:[-_](?:gcm|cfb))?")


def _norm_cipher(value: object) -> str | None:
    # ascp spells aes128, ascli aes-128-gcm/-cfb; our AEAD is GCM anyway, so only the key
    # size carries meaning.
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text == "none":
        return text
    match = _CIPHER_TEXT.fullmatch(text)
    return f"aes-{match.group(1)}" if match else None


_RESUME_LEVELS: Final = get_args(ResumePolicy)  # index == ascp -k level
_norm_resume_name = _lookup(
    ResumePolicy,
    {"attrs": "attributes", "sparse_csum": "sparse_checksum", "full_csum": "full_checksum"},
)


def _norm_resume(value: object) -> str | None:
    level = _as_int(value)
    if level is not None:
        return _RESUME_LEVELS[level] if 0 <= level < len(_RESUME_LEVELS) else None
    return _norm_resume_name(value)


_norm_checksum_name = _lookup(FileChecksum)


def _norm_checksum(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return _norm_checksum_name(re.sub(r"^(sha)[-_]", r"\1", value.strip().lower()))


_norm_overwrite = _lookup(OverwritePolicy, {"none": "never"})  # Connect's "none" = never


def _choice(choices: Any, normalise: Normaliser | None = None) -> BeforeValidator:
    names = get_args(choices)
    normalise = normalise or _lookup(choices)

    def check(value: object) -> str:
        found = normalise(value)
        if found is None:
            raise _reason(f"must be one of {', '.join(names)} (got {_show(value)})")
        return found

    return BeforeValidator(check)


DirectionField = Annotated[Direction, _choice(Direction)]
RatePolicyField = Annotated[RatePolicy, _choice(RatePolicy)]
CipherField = Annotated[Cipher, _choice(Cipher, _norm_cipher)]
AttributePreservationField = Annotated[AttributePreservation, _choice(AttributePreservation)]

# --- aliases ------------------------------------------------------------------------------

SPEC_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "overwrite_policy": "overwrite",
        "resume_policy": "resume",
        "save-before-overwrite": "save_before_overwrite",
        "content_protection_password": "content_protection_passphrase",
        "lock_target_rate_kbps": "lock_target_rate",
        "lock_min_rate_kbps": "lock_min_rate",
        "remove_empty_source_dir": "remove_empty_source_directory",
    }
)
"""Alias → canonical TransferSpec field name."""

_VALUE_NORMALISERS: Final[Mapping[str, Callable[[object], object]]] = MappingProxyType(
    {
        "overwrite": _norm_overwrite,
        "resume": _norm_resume,
        "save_before_overwrite": _as_bool,
        "lock_target_rate": _as_bool,
        "lock_min_rate": _as_bool,
        "remove_empty_source_directory": _as_bool,
    }
)


def _same_value(field: str, first: object, second: object) -> bool:
    """Whether two spellings mean the same (unrecognised values compare as written)."""
    normalise = _VALUE_NORMALISERS.get(field)
    if normalise is None:
        return first == second
    a, b = normalise(first), normalise(second)
    return (a if a is not None else first) == (b if b is not None else second)


def _resolve_aliases(data: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Rename aliases to canonical fields; a disagreeing pair keeps the canonical value."""
    resolved = dict(data)
    problems: list[Problem] = []
    for alias, canonical in SPEC_ALIASES.items():
        if alias not in resolved:
            continue
        value = resolved.pop(alias)
        if canonical not in resolved:
            resolved[canonical] = value
        elif not _same_value(canonical, resolved[canonical], value):
            mine = _show(resolved[canonical])
            problems.append(
                ("", f"{canonical} ({mine}) conflicts with its alias {alias} ({_show(value)})")
            )
    return resolved, problems


# --- cross-field rules ----------------------------------------------------------------------


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return _as_int(value)


def _show_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _rate_problems(data: Mapping[str, Any]) -> list[Problem]:
    """min <= target <= cap. A cap of 0 means "no cap" (as in aspera.conf)."""
    pairs = [
        ("min_rate_kbps", "target_rate_kbps"),
        ("target_rate_kbps", "target_rate_cap_kbps"),
        ("min_rate_kbps", "min_rate_cap_kbps"),
    ]
    if data.get("target_rate_kbps") is None:
        # With a target, min > target cap is already reported as one of the two above.
        pairs.append(("min_rate_kbps", "target_rate_cap_kbps"))
    problems: list[Problem] = []
    for low_name, high_name in pairs:
        low, high = _number(data.get(low_name)), _number(data.get(high_name))
        if low is None or high is None or (high == 0 and high_name.endswith("_cap_kbps")):
            continue
        if low > high:
            problems.append(
                ("", f"{low_name} ({_show_number(low)}) exceeds {high_name} ({_show_number(high)})")
            )
    return problems


def _path_problems(data: Mapping[str, Any]) -> list[Problem]:
    paths = data.get("paths")
    if paths is None:
        # A keepalive session receives its paths later over the management channel.
        return [] if _as_bool(data.get("keepalive")) else [("paths", "is required")]
    if not isinstance(paths, list):
        return []

    def has_destination(item: object) -> bool:
        return isinstance(item, Mapping) and item.get("destination") is not None

    if not any(has_destination(item) for item in paths):
        return []
    return [
        (f"paths[{index}]", "every element needs 'destination' once one has it")
        for index, item in enumerate(paths)
        if not has_destination(item)
    ]


def _disposition_problems(data: Mapping[str, Any]) -> list[Problem]:
    if data.get("move_after_transfer") is not None and _as_bool(data.get("remove_after_transfer")):
        return [("", "move_after_transfer and remove_after_transfer cannot both be set")]
    return []


def _cross_field_problems(data: Mapping[str, Any]) -> list[Problem]:
    """Rules spanning fields. Tolerant of raw input, so they can be reported alongside
    per-field errors (pydantic runs model validators only once every field is valid)."""
    return _path_problems(data) + _rate_problems(data) + _disposition_problems(data)


# --- models -------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


class _Model(BaseModel):
    """Base: unknown fields kept, null treated as omitted, omitted fields not written."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _normalise_mapping(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data  # a model instance, or garbage pydantic reports as "must be an object"
        return cls._normalise_input(cls._drop_nulls(data))

    @classmethod
    def _drop_nulls(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """null for a known field means "not given"; an unknown field keeps its null."""
        known = cls._declared_names()
        return {key: value for key, value in data.items() if value is not None or key not in known}

    @classmethod
    def _declared_names(cls) -> set[str]:
        names = set(cls.model_fields)
        names.update(f.alias for f in cls.model_fields.values() if f.alias)
        return names

    @classmethod
    def _normalise_input(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook for subclasses: rename aliases etc. Runs before field validation."""
        return data

    @classmethod
    def _prevalidate(cls, data: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
        """Hook for load_model(): problems to report even when field validation fails."""
        return dict(data), []

    @model_serializer(mode="wrap")
    def _omit_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Declared fields that are None were omitted by the sender; unknown fields are
        # written back exactly, null included.
        data: dict[str, Any] = handler(self)
        extra = self.model_extra or {}
        return {key: value for key, value in data.items() if value is not None or key in extra}

    def to_json_dict(self, *, explicit_only: bool = False) -> dict[str, Any]:
        """The normalised JSON object: canonical names and values, unknown fields kept.

        ``explicit_only`` leaves out fields that were not in the input (i.e. defaults).
        """
        return self.model_dump(mode="json", by_alias=True, exclude_unset=explicit_only)


class PathPair(_Model):
    """One ``paths`` element: a source and, in pair format, its destination."""

    source: NonEmptyStr
    destination: NonEmptyStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_string(cls, data: Any) -> Any:
        # ascp takes plain source lists; accept ["a", "b"] as [{"source": "a"}, ...].
        return {"source": data} if isinstance(data, str) else data


def _check_paths(paths: list[PathPair] | None) -> list[PathPair] | None:
    if paths is not None and not paths:
        raise _reason("must not be empty")
    return paths


class TransferSpec(_Model):
    """The parameters of one transfer (Connect's TransferSpec plus the ascli/Node fields).

    Defaults are those of the Connect reference; ``None`` means "not given: the engine or
    the server decides". ``destination_root`` None means Connect's "/" (or the user's
    download folder for a Connect download), kept None so callers can tell it was omitted.
    """

    # endpoints, authentication, transport
    direction: DirectionField
    remote_host: NonEmptyStr | None = None  # required to start a transfer; the engine checks
    remote_user: str | None = None
    remote_password: str | None = Field(default=None, repr=False)
    authentication: Annotated[Authentication, _choice(Authentication)] = "password"
    token: str | None = Field(default=None, repr=False)
    cookie: str | None = None
    tags: dict[str, Any] | None = None
    tags64: str | None = None
    title: str | None = None
    ssh_port: Port = 33001
    fasp_port: Port = 33001
    ssh_private_key: str | None = Field(default=None, repr=False)
    ssh_private_key_path: str | None = None
    ssh_private_key_passphrase: str | None = Field(default=None, repr=False)
    sshfp: str | None = None
    use_system_ssh: bool | None = None
    ssh_args: list[str] | None = None
    wss_enabled: bool | None = None
    wss_port: Port | None = None
    http_fallback: Annotated[bool | Literal["force"], BeforeValidator(_check_http_fallback)] = False
    http_fallback_port: Port | None = None
    https_fallback_port: Port | None = None
    https_fallback_fingerprint: str | None = None  # Slipstream: pinned SHA256 of its certificate
    proxy: str | None = None
    fasp_proxy: dict[str, Any] | None = None
    dgram_size: Annotated[int, _int_in(296, 65507)] | None = None  # IPv4 min MTU..max UDP
    multi_session: Annotated[int, _int_in(1, 128)] | None = None
    multi_session_threshold: NonNegativeInt | None = None
    keepalive: bool | None = None
    use_ascp4: bool | None = None
    retry_duration: Annotated[int | str, BeforeValidator(_check_duration)] | None = None
    xfer_max_retries: NonNegativeInt | None = None
    remote_access_key: str | None = None
    icos: dict[str, Any] | None = None
    password: str | None = Field(default=None, repr=False)
    token_life_seconds: NonNegativeInt | None = None

    # paths and destination layout
    paths: Annotated[list[PathPair] | None, AfterValidator(_check_paths)] = None
    source_root: str | None = None
    destination_root: str | None = None
    source_root_id: str | None = None
    destination_root_id: str | None = None
    src_base: str | None = None
    src_base64: str | None = None
    create_dir: bool = False
    apply_local_docroot: bool | None = None

    # rate control
    target_rate_kbps: NonNegativeInt | None = None
    min_rate_kbps: NonNegativeInt | None = None
    rate_policy: RatePolicyField = "fair"
    target_rate_cap_kbps: NonNegativeInt | None = None
    min_rate_cap_kbps: NonNegativeInt | None = None
    rate_policy_allowed: RatePolicyField | None = None
    lock_target_rate: bool = False
    lock_min_rate: bool = False
    lock_rate_policy: bool = False

    # security and content
    cipher: CipherField = "aes-128"
    cipher_allowed: CipherField | None = None
    content_protection: Annotated[ContentProtection, _choice(ContentProtection)] | None = None
    content_protection_passphrase: str | None = Field(default=None, repr=False)
    content_protection_extension: NonEmptyStr | None = None  # Slipstream: default .aspera-env
    fail_bad_filepass: bool | None = None
    obfuscate_file_names: bool = False

    # overwrite, resume, file selection
    overwrite: Annotated[OverwritePolicy, _choice(OverwritePolicy, _norm_overwrite)] = "diff"
    resume: Annotated[ResumePolicy, _choice(ResumePolicy, _norm_resume)] = "sparse_checksum"
    save_before_overwrite: bool = False
    delete_before_transfer: bool | None = None
    symlink_policy: Annotated[SymlinkPolicy, _choice(SymlinkPolicy)] | None = None
    skip_special_files: bool | None = None
    skip_duplicate_check: bool | None = None
    precalculate_job_size: bool | None = None
    exclude_newer_than: Annotated[int | str, BeforeValidator(_check_time_filter)] | None = None
    exclude_older_than: Annotated[int | str, BeforeValidator(_check_time_filter)] | None = None
    exclude_patterns: list[NonEmptyStr] | None = None  # Slipstream: ascp -E globs
    include_patterns: list[NonEmptyStr] | None = None  # Slipstream: ascp -N globs
    # Slipstream: -E/-N in their order, "- glob" / "+ glob"; first match wins, before the two
    # lists above (which, having no order between them, apply includes first).
    filters: list[Annotated[str, AfterValidator(_check_filter_rule)]] | None = None
    file_checksum: Annotated[FileChecksum, _choice(FileChecksum, _norm_checksum)] | None = None

    # preserve attributes
    preserve_times: bool | None = None
    preserve_modification_time: bool | None = None
    preserve_access_time: bool | None = None
    preserve_creation_time: bool | None = None
    preserve_source_access_time: bool | None = None
    preserve_file_owner_uid: bool | None = None
    preserve_file_owner_gid: bool | None = None
    preserve_acls: AttributePreservationField | None = None
    preserve_remote_acls: AttributePreservationField | None = None
    preserve_extended_attrs: AttributePreservationField | None = None
    preserve_remote_extended_attrs: AttributePreservationField | None = None

    # source disposition after success
    remove_after_transfer: bool | None = None
    remove_empty_directories: bool | None = None
    remove_empty_source_directory: bool | None = None
    remove_skipped: bool | None = None
    delete_source: bool | None = None
    move_after_transfer: NonEmptyStr | None = None

    @classmethod
    def _normalise_input(cls, data: dict[str, Any]) -> dict[str, Any]:
        resolved, conflicts = _resolve_aliases(data)
        if conflicts:
            raise _many(conflicts)
        return resolved

    @classmethod
    def _declared_names(cls) -> set[str]:
        return super()._declared_names() | set(SPEC_ALIASES)

    @classmethod
    def _prevalidate(cls, data: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
        resolved, conflicts = _resolve_aliases(cls._drop_nulls(data))
        return resolved, conflicts + _cross_field_problems(resolved)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TransferSpec:
        problems = _cross_field_problems(self.model_dump())
        if problems:
            raise _many(problems)
        return self

    @property
    def is_pair_format(self) -> bool:
        """True for the source/destination pair format, False for a plain source list."""
        return any(item.destination is not None for item in self.paths or ())

    def path_pairs(self) -> list[PathPair]:
        """Copies of the ``paths`` elements: each source with its destination as given
        (``None`` throughout a plain source list; never mixed, validation saw to that).

        Nothing is joined with the roots, laid out or resolved here: the destination layout
        (src_base, the single-source rename rule) and docroot containment need the real file
        system, so they live in the engine (``engine.paths``).
        """
        return [item.model_copy(deep=True) for item in self.paths or ()]


class AsperaConnectSettings(_Model):
    """The web app parameters Connect attaches to a transfer."""

    app_id: str | None = None
    back_link: str | None = None
    request_id: str | None = None


class ConnectSpec(_Model):
    """Connect-specific options given with ``startTransfer``."""

    allow_dialogs: bool = True
    back_link: str | None = None
    return_files: bool = True
    return_paths: bool = True
    use_absolute_destination_path: bool = False


class FileCounts(_Model):
    attempted: NonNegativeInt = 0
    completed: NonNegativeInt = 0  # transferred or skipped
    failed: NonNegativeInt = 0
    skipped: NonNegativeInt = 0


class TransferFileInfo(_Model):
    """One file active in a session, as reported in ``TransferInfo.files``."""

    bytes_expected: NonNegativeInt | None = None
    bytes_written: NonNegativeInt | None = None
    fasp_file_id: str | None = None
    file: str | None = None


class TransferInfo(_Model):
    """Statistics for one transfer session."""

    add_time: str | None = None
    aspera_connect_settings: AsperaConnectSettings | None = None
    bytes_expected: NonNegativeInt | None = None
    bytes_written: NonNegativeInt | None = None
    calculated_rate_kbps: Number | None = None
    current_file: str | None = None
    elapsed_usec: NonNegativeInt | None = None
    explorer_path: str | None = None
    end_time: str | None = None
    file_counts: FileCounts | None = None
    files: list[TransferFileInfo] | None = None
    modify_time: str | None = None
    percentage: Number | None = None
    previous_status: TRANSFER_STATUS | None = None
    remaining_usec: AnyInt | None = None
    start_time: str | None = None
    status: TRANSFER_STATUS | None = None
    title: str | None = None
    transfer_iteration_token: AnyInt | None = None
    transfer_spec: TransferSpec | None = None
    transport: Annotated[Transport, _choice(Transport)] = "fasp"
    uuid: str | None = None


class AllTransfersInfo(_Model):
    """The answer to ``getAllTransfers``: transfers active since ``iteration_token``."""

    iteration_token: AnyInt = 0
    result_count: NonNegativeInt = 0
    transfers: list[TransferInfo] = Field(default_factory=list)


class TransferSpecEntry(_Model):
    transfer_spec: TransferSpec
    aspera_connect_settings: ConnectSpec | None = None


class TransferSpecs(_Model):
    """What ``startTransfer`` is given (and echoes to its success callback)."""

    transfer_specs: list[TransferSpecEntry]


class SelectedFile(_Model):
    """One file the user picked in a file dialog or dropped on the page."""

    last_modified_date: str | None = Field(default=None, alias="lastModifiedDate")
    name: str
    size: NonNegativeInt | None = None
    type: str | None = None  # MIME type


class DataTransfer(_Model):
    files: list[SelectedFile] = Field(default_factory=list)


class FileSelection(_Model):
    """The ``{"dataTransfer": {"files": [...]}}`` object of a file or folder selection."""

    data_transfer: DataTransfer = Field(alias="dataTransfer")


class FileFilter(_Model):
    """One entry of a file dialog's extension filters (``["*"]`` = all types)."""

    filter_name: str
    extensions: list[str]


class FileFilters(RootModel[list[FileFilter]]):
    """The list of :class:`FileFilter` given to the file dialogs."""

    def to_json_list(self) -> list[dict[str, Any]]:
        return [item.to_json_dict() for item in self.root]


# --- loading --------------------------------------------------------------------------------


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def load_model(model: type[M], obj: object) -> M:
    """Validate ``obj`` as ``model``; raise :class:`SpecError` listing every problem."""
    if isinstance(obj, model):
        return obj
    early: list[Problem] = []
    if isinstance(obj, Mapping) and issubclass(model, _Model):
        obj, early = model._prevalidate(obj)
    try:
        result = model.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(problems=_dedupe(early + problems_from_validation_error(exc))) from None
    if early:
        raise SpecError(problems=_dedupe(early))
    return result


def load_transfer_spec(obj: object) -> TransferSpec:
    """Validate and normalise a transfer spec given as a dict (e.g. parsed JSON)."""
    return load_model(TransferSpec, obj)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; for a spec that is a guess we refuse.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(Exception):
    pass


def _parse_json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except _DuplicateKey as exc:
        problem = f"invalid JSON: duplicate key {_show(exc.args[0])}"
    except RecursionError:
        problem = "invalid JSON: nested too deeply"
    raise SpecError(problems=[("", problem)])


def parse_model_json(model: type[M], text: str) -> M:
    """Parse JSON text and validate it as ``model``; every failure is a :class:`SpecError`."""
    return load_model(model, _parse_json(text))


def parse_transfer_spec_json(text: str) -> TransferSpec:
    """Parse and validate a transfer spec from JSON text."""
    return parse_model_json(TransferSpec, text)


def load_example(name: str) -> TransferSpec:
    """A bundled example spec (``"download"``, ``"upload"``), validated."""
    path = resources.files("slipstream").joinpath("examples", f"{name}.json")
    return parse_transfer_spec_json(path.read_text(encoding="utf-8"))
