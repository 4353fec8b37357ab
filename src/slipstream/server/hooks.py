"""What a server session asks the rest of the server, as one small interface.

``SessionManager`` runs transfer sessions; tokens, the ops records and the HTTPS fallback
are services around it. It calls these hooks at fixed points and knows nothing else about
them; the defaults do nothing, so a bare ``SessionManager`` (tests, embedding) still works.
"""

from __future__ import annotations

from typing import Any

from slipstream.errors import SlipstreamError
from slipstream.server.config import UserConfig
from slipstream.spec import TransferSpec


class SessionHooks:
    def authorize(self, user: UserConfig, spec: TransferSpec) -> None:
        """Raise to refuse ``spec`` (a token that does not fit). No file system access."""

    def started(self, user: UserConfig, peer: tuple[str, int], spec: TransferSpec) -> Any:
        """A session was accepted; the value comes back to the other hooks."""
        return None

    def accept_extra(self, user: UserConfig, spec: TransferSpec, tracked: Any) -> dict[str, Any]:
        """Extra ACCEPT fields (the transfer id, how to reach the HTTPS fallback)."""
        return {}

    def file_event(self, tracked: Any, event: dict[str, Any]) -> None:
        """A file was done, skipped or failed."""

    def finished(self, tracked: Any, error: SlipstreamError | None) -> None:
        """The session ended, with ``error`` when it failed as a whole."""
