"""Client certificates: from the TLS connection, or from a trusted proxy.

Direct: the gateway's TLS context requires a client certificate and verifies
it against `auth.mtls.client_ca` during the handshake, so a missing, expired or
foreign certificate never becomes an HTTP request. uvicorn does not put the
peer certificate into the ASGI scope, so `TlsPeerProtocol` adds it the way
the ASGI TLS extension describes (`scope["extensions"]["tls"]`).

Behind a TLS-terminating proxy: the proxy verifies the certificate and forwards
it in a header. That header is believed only from `trusted_proxies` (anyone
else could write it) and the certificate is checked again here: issued by the
client CA and within its validity.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID

from gateway.client_address import Networks
from gateway.errors import Unauthenticated
from gateway.http_protocol import GatewayHttpProtocol
from gateway.settings import MtlsSettings


class TlsPeerProtocol(GatewayHttpProtocol):
    """The gateway's protocol, with the verified client certificate in the scope."""

    _peer_pem: str | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self._peer_pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._peer_pem is not None:
            self.scope["extensions"] = {"tls": {"client_cert_chain": [self._peer_pem]}}  # type: ignore[typeddict-unknown-key]


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def organizational_units(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]


def subject_name(cert: x509.Certificate, kind: str) -> str | None:
    if kind == "cn":
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return None
    general = {"san_dns": x509.DNSName, "san_uri": x509.UniformResourceIdentifier, "san_email": x509.RFC822Name}[kind]
    values = san.get_values_for_type(general)  # type: ignore[type-var]
    return str(values[0]) if values else None


class ClientCertificates:
    """Finds the caller's certificate for a request, per `auth.mtls`."""

    def __init__(self, settings: MtlsSettings, base_dir: Path):
        self._settings = settings
        self._cas: list[x509.Certificate] = []
        if settings.client_ca:
            path = Path(settings.client_ca)
            path = path if path.is_absolute() else base_dir / path
            self._cas = x509.load_pem_x509_certificates(path.read_bytes())
        self._proxies = Networks(settings.trusted_proxies)
        # The header a TLS-terminating proxy forwards the certificate in ("": none).
        self.header = settings.proxy_header.lower()

    def of(self, scope: dict[str, Any], forwarded: str | None, peer_addr: str | None) -> x509.Certificate | None:
        """The certificate of the call's caller, if any. `forwarded`: the value
        of `self.header`; `peer_addr`: the connection's own peer (never an
        address named by X-Forwarded-For)."""
        if self.header:
            if forwarded is None:
                return None
            if peer_addr not in self._proxies:
                raise Unauthenticated(
                    "A client certificate header was sent from an address that is not a trusted proxy.",
                    audit_reason="untrusted_cert_header",
                )
            return self._checked(forwarded)
        chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain")
        return x509.load_pem_x509_certificate(chain[0].encode()) if chain else None

    def _checked(self, forwarded: str) -> x509.Certificate:
        try:
            cert = x509.load_pem_x509_certificate(unquote(forwarded).encode())
        except ValueError:
            raise Unauthenticated(
                "The forwarded client certificate is malformed.", audit_reason="bad_cert_header"
            ) from None
        if not _issued_by_any(cert, self._cas):
            raise Unauthenticated("The client certificate is not from a trusted CA.", audit_reason="foreign_cert")
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Unauthenticated("The client certificate is expired or not yet valid.", audit_reason="cert_expired")
        return cert


def _issued_by_any(cert: x509.Certificate, cas: Iterable[x509.Certificate]) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False
