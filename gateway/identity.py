"""Who is calling: an API key, an OIDC bearer token, or a client certificate.

A bearer credential authenticates the request when it is one: `bst_...` is an
API key, a three-part token is a JWT from a configured issuer. Otherwise the
client certificate does, when mTLS is on; a bearer that is neither key nor
token is then ignored, because the `openai` SDK always sends some `api_key`
and a certified caller has nothing else to put there. A request with both a
credential and a certificate is authenticated by the credential; the
certificate's fingerprint still goes into its audit record. Every way ends in the same
`Principal`, so policy and audit do not care which it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.errors import Forbidden, Unauthenticated
from gateway.keys import KeyStore, Principal, Role, check_label
from gateway.mtls import ClientCertificates, fingerprint, organizational_units, subject_name
from gateway.oidc import OidcVerifier
from gateway.settings import AuthSettings, IdentityMapping


def map_identity(groups: Iterable[str], team_values: Iterable[str], mapping: IdentityMapping) -> tuple[str, Role]:
    """Team and role from an identity's groups; refused when either is missing or ambiguous."""
    teams = sorted({v.removeprefix(mapping.team_prefix) for v in team_values if v.startswith(mapping.team_prefix)})
    if len(teams) != 1:
        found = "no team" if not teams else f"{len(teams)} teams ({', '.join(teams)})"
        raise Forbidden(f"Your identity maps to {found}; it must map to exactly one.", audit_reason="team_unmapped")
    roles = {mapping.roles[g] for g in groups if g in mapping.roles}
    if len(roles) > 1:
        raise Forbidden(
            f"Your identity maps to several roles ({', '.join(sorted(roles))}); it must map to one.",
            audit_reason="role_ambiguous",
        )
    role = roles.pop() if roles else mapping.default_role
    if role is None:
        raise Forbidden("Your identity maps to no role in this gateway.", audit_reason="role_unmapped")
    try:
        check_label("The team your identity maps to", teams[0])
    except ValueError as exc:
        # The trail could not tell it apart from another team (cut to its column) or show it as is.
        raise Forbidden(f"{exc}; it cannot be recorded.", audit_reason="team_unrecordable") from None
    return teams[0], role


def stable_id(prefix: str, *parts: str) -> str:
    """A short id for a caller without an API key (rate limits and policy key overrides use it)."""
    return f"{prefix}-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _is_credential(authorization: str) -> bool:
    token = authorization.partition(" ")[2].strip()
    return token.startswith("bst_") or token.count(".") == 2


def _values(claim: Any) -> list[str]:
    if isinstance(claim, str):
        return [claim]
    if isinstance(claim, list):
        return [v for v in claim if isinstance(v, str)]
    return []


def one_header(headers: Any, name: str) -> str | None:
    """The value of a header that carries who the caller is; refused (401) when
    sent more than once. Of several, a proxy in front may check one and the
    gateway read another: a proxy that adds its forwarded certificate without
    removing the one the client sent would let the client's come first."""
    if not name:
        return None
    values = headers.getall(name, None)
    if values is None:
        return None
    if len(values) > 1:
        raise Unauthenticated(
            f"The {name} header was sent {len(values)} times; send it once.", audit_reason="repeated_credentials"
        )
    return values[0]  # type: ignore[no-any-return]


class Authenticator:
    def __init__(self, auth: AuthSettings, keys: KeyStore, base_dir: Path):
        self._auth = auth
        self._keys = keys
        self._oidc = OidcVerifier(auth, base_dir) if auth.oidc else None
        self._certs = ClientCertificates(auth.mtls, base_dir) if auth.mtls.client_ca else None

    async def close(self) -> None:
        if self._oidc is not None:
            await self._oidc.close()

    async def authenticate(self, scope: dict[str, Any], headers: Any, peer_addr: str | None) -> Principal:
        """The caller; `peer_addr` is the connection's own peer (for a forwarded certificate's proxy check)."""
        certs = self._certs
        cert = certs.of(scope, one_header(headers, certs.header), peer_addr) if certs else None
        authorization = one_header(headers, "authorization")
        if authorization and (cert is None or _is_credential(authorization)):
            principal = await self._bearer(authorization)
        elif cert is not None:
            principal = self._from_certificate(cert)
        else:
            raise Unauthenticated(
                "Missing credentials: send 'Authorization: Bearer <key or token>'.", audit_reason="missing_key"
            )
        if cert is not None and principal.fingerprint is None:
            principal = principal.with_certificate(fingerprint(cert))
        return principal

    async def _bearer(self, authorization: str) -> Principal:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token.count(".") == 2 and not token.startswith("bst_"):
            if self._oidc is None:
                raise Unauthenticated("Bearer tokens are not accepted here; use an API key.", audit_reason="oidc_off")
            verified = await self._oidc.verify(token)
            cfg = verified.config
            team, role = map_identity(
                _values(verified.claims.get(cfg.roles_claim)), _values(verified.claims.get(cfg.team_claim)), cfg.mapping
            )
            return Principal(
                auth_method="oidc",
                key_id=stable_id("oidc", verified.issuer, verified.subject),
                name=verified.subject,
                role=role,
                team=team,
                issuer=verified.issuer,
                subject=verified.subject,
            )
        if not self._auth.api_keys:
            raise Unauthenticated("API keys are not accepted here.", audit_reason="api_keys_off")
        return await self._keys.authenticate(authorization)

    def _from_certificate(self, cert: x509.Certificate) -> Principal:
        m = self._auth.mtls
        subject = subject_name(cert, m.subject)
        if not subject:
            raise Unauthenticated(
                f"The client certificate has no {m.subject} to identify you by.", audit_reason="cert_without_subject"
            )
        units = organizational_units(cert)
        team, role = map_identity(units, units, m.mapping)
        return Principal(
            auth_method="mtls",
            key_id=stable_id("mtls", subject),
            name=subject,
            role=role,
            team=team,
            subject=subject,
            fingerprint=fingerprint(cert),
        )
