"""The services around the transfer sessions: tokens, ops records, TLS, HTTP logins.

One :class:`ServerServices` per running server, shared by the SSH sessions (through
:class:`ServiceHooks`), the REST API and the HTTPS fallback, so all three apply the same
rules: a token is checked the same way whether it arrives over SSH or HTTPS, and every
session of any transport lands in the same ops records.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slipstream.errors import AuthenticationError, PermissionDenied, SlipstreamError
from slipstream.server.config import ServerConfig, UserConfig
from slipstream.server.hooks import SessionHooks
from slipstream.server.ops import OpsStore, Tracked
from slipstream.server.rate_policy import AggregateBudget
from slipstream.server.tls import (
    cert_fingerprint,
    load_or_create_certificate,
    server_ssl_context,
)
from slipstream.server.tokens import (
    TokenAuthenticator,
    TokenCodec,
    codec_for_config,
    looks_like_token,
    require_token_grant,
    token_login,
)
from slipstream.spec import TransferSpec

log = logging.getLogger("slipstream.server")

# A fallback ticket only has to outlive the switch from UDP to HTTPS and the retries of a
# dropped connection; every later request rides on the fallback session it opened.
TICKET_LIFE_SECONDS = 3600


@dataclass(frozen=True)
class TlsMaterial:
    cert: Path
    key: Path
    fingerprint: str
    context: ssl.SSLContext


def load_tls(config: ServerConfig) -> TlsMaterial:
    cert = config.api.tls_cert or config.state_dir / "tls.crt"
    key = config.api.tls_key or config.state_dir / "tls.key"
    if config.api.tls_cert is None:
        hosts = [config.listen, *([config.api.public_host] if config.api.public_host else [])]
        load_or_create_certificate(cert, key, hosts)
    return TlsMaterial(cert, key, cert_fingerprint(cert), server_ssl_context(cert, key))


def check_rights(user: UserConfig, spec: TransferSpec) -> None:
    if spec.direction == "send" and not user.write:
        raise PermissionDenied(f"User {user.name} may not upload")
    if spec.direction == "receive" and not user.read:
        raise PermissionDenied(f"User {user.name} may not download")


class ServerServices:
    """Everything a running server shares between its SSH, REST and HTTPS front doors."""

    def __init__(
        self,
        config: ServerConfig,
        codec: TokenCodec,
        ops: OpsStore,
        tls: TlsMaterial | None,
    ) -> None:
        self.config = config
        self.codec = codec
        self.ops = ops
        self.tls = tls
        self.authenticator = TokenAuthenticator(config, codec)
        self.hooks = ServiceHooks(self)
        # The aggregate bandwidth cap: one budget split over UDP and HTTPS sessions alike.
        self.budget = AggregateBudget(config.aggregate_rate_kbps)
        # Filled in by start_server once the ports are bound (port 0 = any free port).
        self.ports: dict[str, int] = {}
        self.sshfp = ""

    @classmethod
    def create(cls, config: ServerConfig) -> ServerServices:
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        codec = codec_for_config(config)
        ops = OpsStore(config.state_dir / "ops.sqlite")
        needs_tls = config.api.enabled or config.http_fallback.enabled
        return cls(config, codec, ops, load_tls(config) if needs_tls else None)

    def close(self) -> None:
        self.ops.close()

    @property
    def fallback_port(self) -> int | None:
        return self.ports.get("fallback_port")

    async def http_login(
        self, username: str, *, password: str | None, token: str | None
    ) -> UserConfig:
        """A login over HTTPS, by the same rules as over SSH."""
        if token is None and looks_like_token(password):
            token = password
        if token is not None:
            return token_login(self.codec, self.config, username, token)
        user = await self.authenticator.check_password(username, password or "")
        if user is None:
            raise AuthenticationError(f"Authentication failed for user {username!r}")
        return user

    def authorize(self, user: UserConfig, spec: TransferSpec) -> None:
        """Token binding first (its message is the precise one), then the user's rights."""
        require_token_grant(user, spec)
        check_rights(user, spec)

    def fallback_ticket(self, user: UserConfig, spec: TransferSpec, xfer_id: str | None) -> str:
        """A short-lived token for exactly this session's spec: what lets a client that
        logged in over SSH (password, key or token) continue over HTTPS."""
        return self.codec.issue_for_spec(
            spec, user.name, life_seconds=TICKET_LIFE_SECONDS, issuer="fallback", xfer_id=xfer_id
        )


class ServiceHooks(SessionHooks):
    """How an SSH session reaches the services."""

    def __init__(self, services: ServerServices) -> None:
        self.services = services

    def authorize(self, user: UserConfig, spec: TransferSpec) -> None:
        require_token_grant(user, spec)

    def started(self, user: UserConfig, peer: tuple[str, int], spec: TransferSpec) -> Tracked:
        return self.services.ops.start(
            user=user.name, peer=f"{peer[0]}:{peer[1]}", spec=spec, transport="fasp"
        )

    def accept_extra(self, user: UserConfig, spec: TransferSpec, tracked: Any) -> dict[str, Any]:
        xfer_id = tracked.id if isinstance(tracked, Tracked) else None
        extra: dict[str, Any] = {"xfer_id": xfer_id} if xfer_id else {}
        services = self.services
        if services.fallback_port is not None and services.tls is not None:
            # Sent inside the authenticated SSH channel: the client can trust this
            # certificate fingerprint as much as it trusts the SSH host key.
            extra["fallback"] = {
                "port": services.fallback_port,
                "fingerprint": services.tls.fingerprint,
                "ticket": services.fallback_ticket(user, spec, xfer_id),
            }
        return extra

    def file_event(self, tracked: Any, event: dict[str, Any]) -> None:
        if isinstance(tracked, Tracked):
            tracked.file_event(event)

    def finished(self, tracked: Any, error: SlipstreamError | None) -> None:
        if isinstance(tracked, Tracked):
            tracked.finish(error)
