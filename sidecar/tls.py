"""TLS to upstreams: a route's `tls:` settings, and the client context built from them.

A context is built when the config loads (at start, and on every reload), from
the files as they are then: a file that cannot be read or is not what it should
be is a config error, so a bad certificate fails the reload and the running
context stays. Each context remembers, per server name, the last TLS session an
upstream gave it, and offers it on the next connection (the standard library's
`SSLContext.wrap_bio` takes a session; asyncio and uvloop both create their TLS
objects through it), so a new pooled connection resumes instead of doing a full
handshake where the upstream allows it. It also keeps, per server name, when the
upstream's certificate expires, as last seen, for the metrics.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from sidecar.files import FileProblem, read_small_file

__all__ = [
    "TLS_VERSIONS",
    "TlsContext",
    "TlsSettings",
    "TlsSetupError",
    "build_context",
    "certificate_expiry",
    "resolve_path",
]

MAX_PEM_FILE = 1024 * 1024
"""Bytes in a certificate or key file at most: a CA bundle is a few hundred KiB."""
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
"""`min_version`'s choices. Older versions are broken; no upstream worth calling needs them."""


class TlsSetupError(ValueError):
    """A context cannot be built from the settings (its message names the file and why)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        """The `tls:` key whose file is at fault."""


class TlsContext(ssl.SSLContext):
    """A client context that offers the last session each server gave it, and remembers
    when each server's certificate expires."""

    sessions: dict[str | None, ssl.SSLSession]
    presents_certificate = False
    """A client certificate is configured (mTLS): an upstream may refuse it."""
    not_after: dict[str, float]
    """The upstream's leaf certificate's expiry (Unix time) by server name, as last seen."""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.sessions.get(server_hostname)  # type: ignore[arg-type]
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def connected(self, ssl_object: Any, server_name: str) -> None:
        """A connection's handshake is done: note its certificate's expiry."""
        try:
            der = ssl_object.getpeercert(binary_form=True)
        except (AttributeError, ValueError):
            return
        if der:
            expiry = certificate_expiry(der)
            if expiry is not None:
                self.not_after[server_name] = expiry

    def used(self, ssl_object: Any, server_name: str) -> None:
        """A connection carried an answer: keep its session (TLS 1.3 sends its tickets
        after the handshake, so only now is there one) for the next connection."""
        try:
            session = ssl_object.session
        except (AttributeError, ValueError):
            return
        if session is not None and (session.has_ticket or ssl_object.version() != "TLSv1.3"):
            self.sessions[server_name] = session


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """A route's `tls:` (paths as written, resolved against the config file)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    verify: bool = True
    min_version: str = "1.2"
    digest: str = ""
    """A hash of the files' contents: settings whose files changed are not equal."""
    context: TlsContext | None = field(default=None, compare=False, repr=False)
    client_cert_expiry: float | None = field(default=None, compare=False)
    """The client certificate's expiry (Unix time), if one is configured."""


def build_context(settings: TlsSettings) -> TlsSettings:
    """`settings` with its context (and digest, and client certificate expiry); raises
    `TlsSetupError` naming the key at fault."""
    context = TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sessions = {}
    context.not_after = {}
    context.minimum_version = TLS_VERSIONS[settings.min_version]
    digest = hashlib.sha256()
    if settings.ca_file is not None:
        pem = _read(settings.ca_file, "ca_file")
        digest.update(pem)
        try:
            context.load_verify_locations(cadata=pem.decode("latin-1"))
        except (ssl.SSLError, ValueError):
            raise TlsSetupError(
                "ca_file", f"{settings.ca_file}: no PEM certificate in it"
            ) from None
    else:
        context.load_default_certs()
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    expiry = None
    if settings.cert_file is not None and settings.key_file is not None:
        cert = _read(settings.cert_file, "cert_file")
        key = _read(settings.key_file, "key_file")
        digest.update(cert)
        digest.update(key)
        if b"ENCRYPTED" in key:
            raise TlsSetupError(
                "key_file", f"{settings.key_file}: the key is encrypted; give an unencrypted key"
            )
        try:
            loaded = x509.load_pem_x509_certificate(cert)
        except ValueError:
            raise TlsSetupError(
                "cert_file", f"{settings.cert_file}: not a PEM certificate"
            ) from None
        expiry = loaded.not_valid_after_utc.timestamp()
        context.presents_certificate = True
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file, password=_no_password)
        except (ssl.SSLError, ValueError, OSError) as e:
            reason = getattr(e, "reason", None) or str(e)
            if reason == "KEY_VALUES_MISMATCH":
                message = f"{settings.key_file}: not the key of {settings.cert_file}"
            else:
                message = f"{settings.key_file}: not a PEM private key ({reason})"
            raise TlsSetupError("key_file", message) from None
    return TlsSettings(
        ca_file=settings.ca_file,
        cert_file=settings.cert_file,
        key_file=settings.key_file,
        server_name=settings.server_name,
        verify=settings.verify,
        min_version=settings.min_version,
        digest=digest.hexdigest(),
        context=context,
        client_cert_expiry=expiry,
    )


def certificate_expiry(der: bytes) -> float | None:
    """A DER certificate's notAfter (Unix time), or None if it cannot be read."""
    try:
        return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    except ValueError:
        return None


def _read(path: str, key: str) -> bytes:
    try:
        data = read_small_file(path, MAX_PEM_FILE)
    except FileProblem as e:
        raise TlsSetupError(key, str(e)) from None
    if b"-----BEGIN" not in data:
        raise TlsSetupError(key, f"{path}: not a PEM file (no -----BEGIN line)")
    return data


def _no_password() -> bytes:
    return b""


def resolve_path(path: str, config_file: str) -> str:
    """A path from the config, relative to the config file's directory."""
    if os.path.isabs(path) or config_file.startswith("<"):
        return path
    return os.path.join(os.path.dirname(config_file), path)
