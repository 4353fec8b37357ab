"""Every error a user can meet, as typed exceptions with stable numeric codes.

The shape mirrors the Connect error object (``{"error": {"code", "internal_message",
"user_message"}}``) so the agent can hand our errors to the official SDK unchanged, and the
``retryable`` flag tells the agent and the CLI whether trying again can help: a docroot
violation or a bad password never gets better by retrying, a lost connection may.

Errors are split, as h11 does, into what the local side got wrong and what the peer did:
``origin`` is ``"local"`` or ``"remote"``; an error received over the control channel is
rebuilt with :func:`error_from_dict` and keeps the peer's code.

Codes are part of the public contract: never renumber, only add.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

Origin = Literal["local", "remote"]

_REGISTRY: dict[int, type[SlipstreamError]] = {}


class SlipstreamError(Exception):
    """Root of every Slipstream error."""

    code: ClassVar[int] = 1
    retryable: ClassVar[bool] = False
    default_message: ClassVar[str] = "Internal error"

    def __init__(
        self,
        user_message: str | None = None,
        *,
        internal_message: str | None = None,
        origin: Origin = "local",
    ) -> None:
        self.user_message = user_message or self.default_message
        self.internal_message = internal_message or self.user_message
        self.origin: Origin = origin
        super().__init__(self.user_message)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            if cls.code in _REGISTRY:
                raise TypeError(f"error code {cls.code} is already used by {_REGISTRY[cls.code]}")
            _REGISTRY[cls.code] = cls

    def to_dict(self) -> dict[str, Any]:
        """The Connect error object body (without the outer ``"error"`` key)."""
        return {
            "code": self.code,
            "internal_message": self.internal_message,
            "user_message": self.user_message,
            "retryable": self.retryable,
        }

    def to_connect(self) -> dict[str, Any]:
        return {"error": self.to_dict()}

    def __str__(self) -> str:
        return f"{self.user_message} (code {self.code})"


_REGISTRY[SlipstreamError.code] = SlipstreamError


# --- bad input -------------------------------------------------------------------------


class SpecError(SlipstreamError):
    """A transfer spec (or its JSON) is invalid. ``problems`` lists ``(field path, reason)``."""

    code = 52
    default_message = "Invalid transfer specification"

    def __init__(
        self,
        problems: list[tuple[str, str]] | None = None,
        user_message: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.problems = problems or []
        if user_message is None and self.problems:
            user_message = "; ".join(f"{loc}: {why}" if loc else why for loc, why in self.problems)
        super().__init__(user_message, **kwargs)


class UsageError(SlipstreamError):
    """A command line or API call that does not make sense."""

    code = 53
    default_message = "Invalid usage"


class ConfigError(SlipstreamError):
    """The server or agent configuration file is wrong."""

    code = 54
    default_message = "Invalid configuration"


# --- authentication and trust -----------------------------------------------------------


class AuthenticationError(SlipstreamError):
    code = 19
    default_message = "Authentication failed: check the user name, password, key or token"


class HostKeyError(SlipstreamError):
    """The server's host key is unknown, or differs from the one pinned or remembered."""

    code = 51
    default_message = "Server host key verification failed"


class TokenError(SlipstreamError):
    """A token is tampered with, expired, for another direction or for other paths."""

    code = 37
    default_message = "Token rejected"


# --- paths and files ------------------------------------------------------------------


class PathError(SlipstreamError):
    """Any problem with a path."""

    code = 40
    default_message = "Invalid path"


class DocrootViolation(PathError):
    code = 41
    default_message = "Path violates docroot containment"


class SourceNotFound(PathError):
    code = 43
    default_message = "No such file or directory"


class PermissionDenied(PathError):
    code = 44
    default_message = "Permission denied"


class DiskFull(SlipstreamError):
    code = 45
    default_message = "No space left on device"


class FileIOError(SlipstreamError):
    """A read or write failed for a reason other than space or permission."""

    code = 46
    retryable = True
    default_message = "File read/write error"


class ChecksumMismatch(SlipstreamError):
    """The received bytes do not match the sender's checksum: the file is not renamed."""

    code = 47
    retryable = True
    default_message = "File checksum mismatch after transfer"


class DestinationExists(PathError):
    code = 48
    default_message = "Destination exists and the overwrite policy forbids replacing it"


# --- content protection (files encrypted at rest) ----------------------------------------


class BadPassphrase(SlipstreamError):
    """The content-protection passphrase does not open an envelope (or is missing)."""

    code = 49
    default_message = "Wrong content-protection passphrase"


class ContentProtectionError(SlipstreamError):
    """An envelope is not one, or is corrupt, truncated or tampered with."""

    code = 56
    default_message = "Invalid or damaged encrypted file (envelope)"


# --- network ---------------------------------------------------------------------------


class NetworkError(SlipstreamError):
    """Connections and timeouts: worth retrying."""

    code = 12
    retryable = True
    default_message = "Network error"


class ConnectError(NetworkError):
    """Nothing answered on the SSH control port."""

    code = 13
    default_message = "Could not open the SSH control connection"


class UdpBlocked(NetworkError):
    """The handshake worked but no UDP data passed: a firewall drops the data port."""

    code = 14
    default_message = "No UDP data reached the peer: the UDP port is blocked"


class TransferTimeout(NetworkError):
    code = 15
    default_message = "Transfer timed out: no progress from the peer"


class PeerAborted(NetworkError):
    """The peer closed or died mid-transfer."""

    code = 16
    default_message = "The peer ended the session unexpectedly"


class PathMtuError(NetworkError):
    """Full-size datagrams do not get through although small ones do (path MTU)."""

    code = 17
    default_message = "The network path drops datagrams of the chosen size"


# --- protocol --------------------------------------------------------------------------


class ProtocolError(SlipstreamError):
    """A message broke the protocol (from the peer when ``origin == 'remote'``)."""

    code = 30
    default_message = "Protocol error"


class UnsupportedError(ProtocolError):
    """A cipher, version or feature the other side does not support."""

    code = 31
    default_message = "Unsupported by the peer"


class RateLocked(SlipstreamError):
    """A live rate change refused: the field is locked or over a cap."""

    code = 55
    default_message = "The rate setting is locked or above the allowed cap"


class Cancelled(SlipstreamError):
    code = 60
    default_message = "Transfer cancelled"


def error_from_dict(body: dict[str, Any], *, origin: Origin = "remote") -> SlipstreamError:
    """Rebuild an error received from a peer; an unknown code becomes the root class."""
    if "error" in body and isinstance(body["error"], dict):
        body = body["error"]
    code = int(body.get("code", 1))
    cls = _REGISTRY.get(code, SlipstreamError)
    user = str(body.get("user_message") or cls.default_message)
    internal = str(body.get("internal_message") or user)
    if cls is SpecError:
        err: SlipstreamError = SpecError(None, user, internal_message=internal, origin=origin)
    else:
        err = cls(user, internal_message=internal, origin=origin)
    if cls is SlipstreamError and code != 1:
        err.code = code  # type: ignore[misc]  # keep the peer's code verbatim
    return err


def error_codes() -> dict[int, type[SlipstreamError]]:
    """Every registered code, for docs and tests."""
    return dict(_REGISTRY)
