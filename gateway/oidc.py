"""OIDC bearer tokens: JWKS keys per issuer, and token verification.

Why PyJWT: it checks signature, expiry, not-before, issuer and audience the way
the RFCs say, and it is the JWT library most Python identity code already
trusts. Around it we add what an on-prem gateway needs: the issuer is chosen
from the token's `iss` among those configured (several may be trusted), the
key by its `kid` from that issuer's JWKS, and the algorithm must be both
allowed for the issuer and the one the key's type implies, so a token cannot
pick an algorithm its key was not made for (no `none`, no HS256 keyed with a
public key: symmetric keys in a JWKS are ignored).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import structlog

from gateway.errors import KeyStoreUnavailable, Unauthenticated
from gateway.settings import AuthSettings, OidcIssuer

log = structlog.get_logger("bastion.oidc")

MAX_JWKS_BYTES = 1024 * 1024
# What each key type may sign with; the token's `alg` must be one of these.
_ALGS_BY_KEY = {
    ("RSA", None): {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    ("EC", "P-256"): {"ES256"},
    ("EC", "P-384"): {"ES384"},
    ("EC", "P-521"): {"ES512"},
    ("OKP", "Ed25519"): {"EdDSA"},
    ("OKP", "Ed448"): {"EdDSA"},
}


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    issuer: str
    subject: str
    claims: dict[str, Any]
    config: OidcIssuer


def _bad(message: str, reason: str) -> Unauthenticated:
    return Unauthenticated(message, code="invalid_token", audit_reason=reason)


@dataclass
class KeySet:
    """One issuer's keys by `kid`, fetched or read, with the refresh cap."""

    config: OidcIssuer
    base_dir: Path
    cache_seconds: float
    min_refresh_seconds: float
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetched_at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def key(self, kid: str, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        now = time.monotonic()
        stale = now - self.fetched_at > self.cache_seconds
        if kid not in self.keys or stale:
            async with self._lock:
                # Another caller may have refreshed while this one waited.
                since = time.monotonic() - self.fetched_at
                if (kid not in self.keys and since >= self.min_refresh_seconds) or since > self.cache_seconds:
                    await self._refresh(session)
        return self.keys.get(kid)

    async def _refresh(self, session: aiohttp.ClientSession) -> None:
        self.fetched_at = time.monotonic()
        try:
            document = await self._load(session)
            self.keys = _usable_keys(document)
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.error("oidc.jwks_unavailable", issuer=self.config.issuer, error=f"{type(exc).__name__}: {exc}")
            if not self.keys:
                raise KeyStoreUnavailable(
                    "The identity provider's keys cannot be loaded; the call was refused.",
                    audit_reason="jwks_unavailable",
                ) from None
            return  # keep the keys we had
        log.info("oidc.jwks_loaded", issuer=self.config.issuer, kids=sorted(self.keys))

    async def _load(self, session: aiohttp.ClientSession) -> Any:
        if self.config.jwks_file:
            path = Path(self.config.jwks_file)
            return json.loads((path if path.is_absolute() else self.base_dir / path).read_bytes())
        timeout = aiohttp.ClientTimeout(total=5)
        async with session.get(self.config.jwks_url, timeout=timeout, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"JWKS answered {response.status}")
            body = await response.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document too large")
            return json.loads(body)


def _usable_keys(document: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    out = {}
    for k in document["keys"]:
        # Signing keys of the asymmetric types only: an "oct" (shared secret) key is skipped.
        usable = isinstance(k, dict) and (k.get("kty"), _curve(k)) in _ALGS_BY_KEY and k.get("use", "sig") == "sig"
        if usable and isinstance(k.get("kid"), str):
            out[k["kid"]] = k
    return out


def _curve(jwk: dict[str, Any]) -> str | None:
    return None if jwk.get("kty") == "RSA" else jwk.get("crv")


class OidcVerifier:
    def __init__(self, auth: AuthSettings, base_dir: Path):
        self._sets = {
            i.issuer: KeySet(i, base_dir, auth.jwks_cache_seconds, auth.jwks_min_refresh_seconds) for i in auth.oidc
        }
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def verify(self, token: str) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _bad("Malformed bearer token.", "malformed_token") from None
        issuer = unverified.get("iss")
        keyset = self._sets.get(issuer) if isinstance(issuer, str) else None
        if keyset is None:
            raise _bad("The token's issuer is not trusted.", "untrusted_issuer")
        config = keyset.config
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in config.algorithms:
            # The header is the caller's text until the signature is checked: name what is accepted, not what came.
            accepted = ", ".join(config.algorithms)
            raise _bad(
                f"The token's algorithm is not accepted; this issuer signs with {accepted}.", "algorithm_not_allowed"
            )
        if not isinstance(kid, str):
            raise _bad("The token names no signing key (kid).", "missing_kid")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        jwk = await keyset.key(kid, self._session)
        if jwk is None:
            raise _bad("The token's signing key is unknown.", "unknown_kid")
        if alg not in _ALGS_BY_KEY[(jwk["kty"], _curve(jwk))] or jwk.get("alg", alg) != alg:
            raise _bad(f"Token algorithm {alg!r} does not match its key.", "algorithm_key_mismatch")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.clock_skew_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise _bad("The token has expired.", "expired_token") from None
        except jwt.ImmatureSignatureError:
            raise _bad("The token is not valid yet.", "token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise _bad("The token is not meant for this service (audience).", "wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise _bad("The token's issuer is not trusted.", "wrong_issuer") from None
        except jwt.InvalidSignatureError:
            raise _bad("The token's signature is invalid.", "bad_signature") from None
        except jwt.PyJWTError as exc:
            raise _bad(f"Invalid token: {exc}", "invalid_token") from None
        subject = claims.get(config.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise _bad(f"The token has no '{config.subject_claim}' claim.", "missing_subject")
        return VerifiedToken(config.issuer, subject, claims, config)
