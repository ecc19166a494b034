"""Transport security and caller authentication: mTLS credentials, a throwaway CA, bearer tokens."""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

# Probes and tooling must reach these without a token (kubelet, grpcurl list).
OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class SecurityError(ValueError):
    """Certificates or tokens are missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one process: its certificate and key, and the CA that signs its peers."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_paths(cls, cert: str, key: str, ca: str) -> TLSFiles | None:
        """None when no TLS is configured; SecurityError when only part of it is."""
        given = {"tls_cert": cert, "tls_key": key, "tls_ca": ca}
        if not any(given.values()):
            return None
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise SecurityError(f"TLS needs tls_cert, tls_key and tls_ca together; missing: {', '.join(missing)}")
        files = cls(Path(cert), Path(key), Path(ca))
        for name, path in (("tls_cert", files.cert), ("tls_key", files.key), ("tls_ca", files.ca)):
            if not path.is_file():
                raise SecurityError(f"{name} {path} does not exist or is not a file")
        return files

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def server_credentials(self, *, require_client_cert: bool = True) -> grpc.ServerCredentials:
        """Serve TLS; with `require_client_cert`, only peers holding a certificate from our CA get in (mTLS)."""
        cert, key, ca = self.read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dial a peer: verify it against our CA and present our own certificate."""
        cert, key, ca = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# -- a small CA ---------------------------------------------------------------------------------


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _write_pair(directory: Path, name: str, cert: Any, key: Any) -> tuple[Path, Path]:
    """Write NAME.crt and NAME.key (PEM; the key readable by its owner only)."""
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(key_path, pem, private=True)
    return cert_path, key_path


def issue_ca(directory: Path, name: str = "stratus-local-ca", days: int = 30) -> tuple[Path, Path]:
    """A self-signed CA certificate and key in `directory` (ca.crt, ca.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    # X.509 caps a common name at 64 characters.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write_pair(directory, "ca", cert, key)


def issue_cert(
    directory: Path, name: str, ca_cert: Path, ca_key: Path, hosts: Iterable[str], days: int = 30,
    *, server: bool = True, client: bool = True,
) -> tuple[Path, Path]:
    """A certificate for `hosts` (DNS names or IPs), good for TLS server use, client use, or both.

    The extended key usage is what a TLS peer checks: a certificate without client use cannot authenticate a
    client to an mTLS server, whatever CA signed it.
    """
    if not (server or client):
        raise ValueError("a certificate needs server use, client use, or both")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([oid for oid, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                                           (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if wanted]),
            critical=False,
        )
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    return _write_pair(directory, name, cert, key)


def local_pki(directory: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> TLSFiles:
    """A throwaway CA and one certificate for every local process (what `stratus up` uses)."""
    ca_cert, ca_key = issue_ca(directory)
    cert, key = issue_cert(directory, "stratus-local", ca_cert, ca_key, hosts)
    return TLSFiles(cert, key, ca_cert)


# -- bearer tokens ------------------------------------------------------------------------------


class TokenStore:
    """Accepted bearer tokens, one per line of a file (a mounted Secret); re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1.0
        self._tokens: tuple[bytes, ...] = ()
        self._reload()
        if not self._tokens:
            raise SecurityError(f"tokens file {path} holds no token; put one token per line")

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            raise SecurityError(f"tokens file {self.path} cannot be read: {exc}") from exc
        if mtime != self._mtime:
            lines = self.path.read_text().splitlines()
            self._tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.startswith("#"))
            self._mtime = mtime

    def check(self, authorization: str | None) -> bool:
        """Whether an `authorization` value ("Bearer <token>") carries an accepted token."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        try:
            self._reload()
        except SecurityError:
            log.warning("tokens file vanished; keeping the tokens read before", extra={"path": str(self.path)})
        given = authorization[len("Bearer ") :].strip().encode()
        # Compare against every token in constant time so timing leaks nothing.
        return any([hmac.compare_digest(given, token) for token in self._tokens])


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls without an accepted bearer token with UNAUTHENTICATED (health and reflection stay open)."""

    def __init__(self, tokens: TokenStore, on_reject: Callable[[str], None] | None = None) -> None:
        self.tokens = tokens
        self.on_reject = on_reject

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method.startswith(OPEN_METHODS):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if self.tokens.check(metadata.get("authorization")):  # type: ignore[arg-type]
            return await continuation(details)
        if self.on_reject is not None:
            self.on_reject(method)
        handler = await continuation(details)
        message = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"
        return _denying(handler, message)


def _denying(handler: Any, message: str) -> Any:
    async def deny_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)
