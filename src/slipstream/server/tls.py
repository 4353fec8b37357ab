"""The server's TLS certificate for the REST API and the HTTPS fallback port.

A self-signed certificate is made on first start and then kept, like the SSH host key:
clients pin its SHA-256 fingerprint (printed by ``slipstream serve`` and handed out in the
transfer specs the setup API returns), so a new certificate on every start would break
every pin. An administrator with a CA-signed certificate names it in ``[api] tls_cert`` /
``tls_key`` instead.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from slipstream.errors import ConfigError, UsageError

log = logging.getLogger("slipstream.server")

CERT_DAYS = 3650  # pinned by fingerprint, so expiry buys nothing but a surprise outage


def fingerprint_of_der(der: bytes) -> str:
    """``SHA256:<base64, no padding>``: the same shape as an SSH key fingerprint."""
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def cert_fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


def fingerprint_digest(text: str) -> bytes:
    """The 32 digest bytes of a fingerprint given as ``SHA256:base64`` or hex (colons ok)."""
    value = text.strip()
    if value.upper().startswith("SHA256:"):
        value = value[len("SHA256:") :]
    hexed = value.replace(":", "")
    try:
        if len(hexed) == 64:
            return bytes.fromhex(hexed)
        digest = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (ValueError, binascii.Error):
        digest = b""
    if len(digest) != 32:
        raise UsageError(f"{text!r} is not a SHA-256 certificate fingerprint")
    return digest


def load_or_create_certificate(
    cert_path: Path, key_path: Path, hosts: list[str]
) -> tuple[Path, Path]:
    """Both files, generating a self-signed pair for ``hosts`` when neither exists."""
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    if cert_path.exists() or key_path.exists():
        missing = key_path if cert_path.exists() else cert_path
        raise ConfigError(f"{missing}: missing (the TLS certificate and key go together)")
    try:
        _create(cert_path, key_path, hosts)
    except OSError as exc:
        raise ConfigError(f"{cert_path}: cannot create the TLS certificate: {exc}") from None
    log.info("generated a self-signed TLS certificate %s", cert_path)
    return cert_path, key_path


def server_ssl_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{cert_path}: cannot load the TLS certificate: {exc}") from None
    return context


def _create(cert_path: Path, key_path: Path, hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slipstream server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    seen = {"localhost"}
    for host in ["127.0.0.1", "::1", *hosts]:
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write(path: Path, data: bytes, mode: int) -> None:
    # Private temp file, then rename: a crash never leaves half a key under the real name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
