"""Errors only the agent raises, with their own stable codes (70-79) and HTTP statuses."""

from __future__ import annotations

from slipstream.errors import (
    AuthenticationError,
    DocrootViolation,
    PermissionDenied,
    RateLocked,
    SlipstreamError,
    SpecError,
    UsageError,
)


class UnauthorizedPath(PermissionDenied):
    """A page named a local path the user never picked in a dialog nor dropped."""

    code = 70
    default_message = "This file was not selected by the user and cannot be transferred"


class TransferNotFound(SlipstreamError):
    code = 71
    default_message = "No such transfer"


class InvalidState(SlipstreamError):
    """stop / resume / modify asked of a transfer in a state that does not allow it."""

    code = 72
    default_message = "The transfer cannot do that in its current state"


class MissingAppId(SlipstreamError):
    code = 73
    default_message = "Invalid request: aspera_connect_settings.app_id is required"


class OriginRefused(SlipstreamError):
    code = 74
    default_message = "This web page is not allowed to use the agent"


class DialogsDisabled(SlipstreamError):
    code = 75
    default_message = "Dialogs are not allowed for this transfer"


_STATUS: list[tuple[type[SlipstreamError], int]] = [
    (TransferNotFound, 404),
    (MissingAppId, 404),
    (UnauthorizedPath, 406),  # what real Connect answers ("can't upload unauthorized file")
    (OriginRefused, 403),
    (DocrootViolation, 403),
    (PermissionDenied, 403),
    (AuthenticationError, 401),
    (RateLocked, 409),
    (InvalidState, 409),
    (DialogsDisabled, 409),
    (SpecError, 400),
    (UsageError, 400),
]


def http_status(error: SlipstreamError) -> int:
    """The HTTP status the agent answers a failed request with."""
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500
