"""Certificates for the TLS tests, made fresh in a directory, and TLS upstreams that use them.

`make_pki(tmp_path)` writes a private CA and certificates it signed (one for `localhost`
and 127.0.0.1, one for another name only, one expired), a second CA for client
certificates with a client certificate it signed, and a client certificate of an
unrelated CA. EC P-256 keys: a set takes milliseconds.

`tls_upstream(...)` starts an HTTP/1.1 server on 127.0.0.1 speaking TLS with one of those
certificates, optionally asking for a client certificate (mTLS), and records what it saw
of each connection: the SNI, whether a client certificate came and which, whether the TLS
session was resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
VALID_FROM = NOW - datetime.timedelta(days=1)
VALID_UNTIL = NOW + datetime.timedelta(days=30)
CLIENT_VALID_UNTIL = datetime.datetime(2031, 7, 14, 12, 30, 0, tzinfo=datetime.UTC)
"""The client certificate's notAfter: what the client-certificate expiry gauge must read."""
NEW_CLIENT_VALID_UNTIL = datetime.datetime(2032, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)
"""The notAfter of the client certificate a reload replaces the first with."""
RENEWED_VALID_UNTIL = NOW + datetime.timedelta(days=90)
"""The notAfter of `Pki.renewed`, the server certificate an upstream changes to."""


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path
    not_after: datetime.datetime

    @property
    def not_after_timestamp(self) -> float:
        return self.not_after.timestamp()


@dataclass(frozen=True)
class Pki:
    ca: Pair
    """The server CA: every server certificate below is signed by it."""
    server: Pair
    """For DNS `localhost` and IP 127.0.0.1 (and any `extra_server_names`)."""
    renewed: Pair
    """For the same names as `server`, with a later notAfter (RENEWED_VALID_UNTIL)."""
    server_localhost_only: Pair
    """For DNS `localhost` only: connecting to 127.0.0.1 verifies only with server_name."""
    wrong_name: Pair
    """For `wrong.example` only."""
    expired: Pair
    """For the same names as `server`, but its notAfter has passed."""
    client_ca: Pair
    """The CA an mTLS upstream trusts for client certificates."""
    client: Pair
    """Signed by client_ca; notAfter CLIENT_VALID_UNTIL."""
    client_new: Pair
    """Signed by client_ca too; notAfter NEW_CLIENT_VALID_UNTIL (the one a reload brings)."""
    stranger: Pair
    """A client certificate signed by a CA nobody trusts."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Pair:
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pair(cert_path, key_path, cert.not_valid_after_utc)


@dataclass
class _Ca:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    pair: Pair


def _make_ca(directory: Path, stem: str, common_name: str) -> _Ca:
    key = _key()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(VALID_FROM)
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Ca(name, key, _write(directory, stem, cert, key))


def _leaf(
    directory: Path,
    stem: str,
    ca: _Ca,
    common_name: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    client: bool = False,
    not_before: datetime.datetime = VALID_FROM,
    not_after: datetime.datetime = VALID_UNTIL,
) -> Pair:
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return _write(directory, stem, cert, key)


def make_pki(directory: Path, extra_server_names: Sequence[str] = ()) -> Pki:
    """Write every certificate and key the TLS tests use into `directory`;
    `extra_server_names`: DNS names that `server` (and `renewed`, `expired`) are for besides
    `localhost`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "ca", "sidecar test server CA")
    client_ca = _make_ca(directory, "client-ca", "sidecar test client CA")
    stranger_ca = _make_ca(directory, "stranger-ca", "nobody's CA")
    dns, ips = ("localhost", *extra_server_names), ("127.0.0.1",)
    return Pki(
        ca=ca.pair,
        server=_leaf(directory, "server", ca, "localhost", dns=dns, ips=ips),
        renewed=_leaf(
            directory,
            "renewed",
            ca,
            "localhost",
            dns=dns,
            ips=ips,
            not_after=RENEWED_VALID_UNTIL,
        ),
        server_localhost_only=_leaf(
            directory, "server-localhost", ca, "localhost", dns=["localhost"]
        ),
        wrong_name=_leaf(directory, "wrong-name", ca, "wrong.example", dns=["wrong.example"]),
        expired=_leaf(
            directory,
            "expired",
            ca,
            "localhost",
            dns=dns,
            ips=ips,
            not_before=NOW - datetime.timedelta(days=60),
            not_after=NOW - datetime.timedelta(days=30),
        ),
        client_ca=client_ca.pair,
        client=_leaf(
            directory, "client", client_ca, "sidecar", client=True, not_after=CLIENT_VALID_UNTIL
        ),
        client_new=_leaf(
            directory,
            "client-new",
            client_ca,
            "sidecar",
            client=True,
            not_after=NEW_CLIENT_VALID_UNTIL,
        ),
        stranger=_leaf(directory, "stranger", stranger_ca, "sidecar", client=True),
    )


def client_serial(pair: Pair) -> int:
    """The serial number of the certificate in `pair` (to tell which one an upstream saw)."""
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


# -- TLS upstreams -----------------------------------------------------------------------
#
# Blocking `ssl` sockets in threads, not an aiohttp server: asyncio's TLS (and uvloop's)
# drops the alert of a handshake it fails (it closes the socket without flushing it), so
# an asyncio upstream refusing a client certificate looks to the sidecar like a bare reset.
# OpenSSL on a blocking socket sends the alert, as nginx or any real server does; a
# lingering close then lets the alert reach the peer before the connection ends.


@dataclass
class Seen:
    """One request as a TLS upstream saw it."""

    path: str
    client_cert: dict[str, Any] | None
    """`getpeercert()` of the connection: None when no client certificate was presented."""
    client_serial: int | None
    session_reused: bool
    tls_version: str | None


@dataclass
class TlsUpstream:
    """A running TLS upstream: where it is and what reached it."""

    port: int
    seen: list[Seen]
    server_names: list[str | None]
    """The SNI of every handshake begun, in order (None: the client sent none)."""
    handshake_errors: list[str]
    """The upstream's side of every handshake that failed."""
    _stop: Callable[[], None]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def close(self) -> None:
        await asyncio.to_thread(self._stop)


def server_context(
    server: Pair,
    client_ca: Pair | None = None,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A server-side context: `server`'s certificate; with `client_ca`, a client certificate
    signed by it is required (mTLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert, server.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca.cert)
    if min_version is not None:
        context.minimum_version = min_version
    if max_version is not None:
        context.maximum_version = max_version
    return context


def _read_request(conn: ssl.SSLSocket, buffer: bytearray) -> tuple[str, bytes] | None:
    """The next request's (target, head) on `conn`, its body read and dropped; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    del buffer[:length]
    target = head.split(b" ", 2)[1].decode("latin-1")
    return target, head


def _linger_close(sock: socket.socket) -> None:
    """Close so that what was sent (an alert) arrives: no reset for unread input."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


async def tls_upstream(
    server: Pair,
    client_ca: Pair | None = None,
    *,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    close_connections: bool = False,
    first_handshake: Pair | None = None,
    resumable: bool = True,
) -> TlsUpstream:
    """Start a TLS upstream on 127.0.0.1 (a free port) with `server`'s certificate.

    With `client_ca` it requires a client certificate signed by that CA (mTLS). Every path
    answers 200 with JSON saying what the upstream saw; `close_connections` answers with
    `Connection: close` and closes, so the next request needs a new connection (and a
    handshake). `first_handshake`: the first handshake presents that certificate instead
    (one TLS failure, then the right certificate). Not `resumable`: TLS 1.3 without
    session tickets, so every handshake is a full one and shows the certificate.
    """
    if not resumable:
        min_version = ssl.TLSVersion.TLSv1_3

    def make(pair: Pair) -> ssl.SSLContext:
        made = server_context(pair, client_ca, min_version, max_version)
        if not resumable:
            made.num_tickets = 0
        return made

    context = make(server)
    swap = None if first_handshake is None else make(first_handshake)
    server_names: list[str | None] = []
    seen: list[Seen] = []
    handshake_errors: list[str] = []

    def on_hello(ssl_socket: Any, name: str | None, _context: ssl.SSLContext) -> None:
        server_names.append(name)
        if swap is not None and len(server_names) == 1:
            ssl_socket.context = swap

    context.sni_callback = on_hello
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    lock = threading.Lock()
    open_sockets: set[socket.socket] = set()
    threads: list[threading.Thread] = []
    stopping = threading.Event()

    def answer(conn: ssl.SSLSocket) -> None:
        buffer = bytearray()
        while not stopping.is_set():
            request = _read_request(conn, buffer)
            if request is None:
                return
            target, _head = request
            der = conn.getpeercert(binary_form=True)
            record = Seen(
                path=target.split("?", 1)[0],
                client_cert=conn.getpeercert() or None,
                client_serial=x509.load_der_x509_certificate(der).serial_number if der else None,
                session_reused=conn.session_reused,
                tls_version=conn.version(),
            )
            seen.append(record)
            body = json.dumps(
                {
                    "path": record.path,
                    "client_cert": record.client_cert is not None,
                    "session_reused": record.session_reused,
                    "tls_version": record.tls_version,
                }
            ).encode()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if close_connections else "")
                + "\r\n"
            )
            conn.sendall(head.encode() + body)
            if close_connections:
                return

    def serve(raw: socket.socket) -> None:
        raw.settimeout(30)
        conn = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        with lock:
            open_sockets.add(conn)
        try:
            try:
                conn.do_handshake()
            except (ssl.SSLError, OSError) as e:
                handshake_errors.append(str(e))
                return
            answer(conn)
        except OSError:
            pass  # (the sidecar went away, or the upstream is stopping)
        finally:
            with lock:
                open_sockets.discard(conn)
            _linger_close(conn)

    def accept() -> None:
        while not stopping.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=serve, args=(raw,), daemon=True)
            threads.append(thread)
            thread.start()

    def stop() -> None:
        stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # (wakes the accept)
        listener.close()
        with lock:
            for conn in open_sockets:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for thread in [acceptor, *threads]:
            thread.join(10)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    return TlsUpstream(port, seen, server_names, handshake_errors, stop)
