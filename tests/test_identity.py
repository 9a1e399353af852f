"""OIDC bearer tokens and mutual TLS beside API keys, against a local issuer
(keys from `cryptography`, its JWKS served over loopback HTTP by the test) and
a test CA, through the real gateway."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway

pytestmark = pytest.mark.engine
AUDIENCE = "bastion"
POLICY = "version: 1\nteams:\n" + "".join(f"  {t}:\n    models: ['*']\n" for t in ("risk", "claims", "ops"))


# ------------------------------------------------------------------ issuer


def _jwk(kid: str, key: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    return {**jwk, "kid": kid, "use": "sig"}


@dataclass
class Issuer:
    """A local identity provider: signing keys, and their JWKS served on loopback."""

    name: str
    keys: dict[str, tuple[str, Any]] = field(default_factory=dict)  # kid -> (alg, private key)
    fetches: int = 0

    def __post_init__(self) -> None:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                issuer.fetches += 1
                body = json.dumps({"keys": [_jwk(k, key) for k, (_, key) in issuer.keys.items()]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.add("rsa1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.add("ec1", "ES256", ec.generate_private_key(ec.SECP256R1()))
        self.add("ed1", "EdDSA", ed25519.Ed25519PrivateKey.generate())

    @property
    def iss(self) -> str:
        return f"https://{self.name}.idp.test/realms/main"

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/certs"

    def add(self, kid: str, alg: str, key: Any) -> None:
        self.keys[kid] = (alg, key)

    def token(self, kid: str = "rsa1", *, alg: str | None = None, key: Any = None, **claims: Any) -> str:
        key_alg, own = self.keys.get(kid, ("RS256", None))
        now = int(time.time())
        body = {"iss": self.iss, "aud": AUDIENCE, "sub": "svc-risk", "iat": now, "exp": now + 300}
        body["groups"] = ["team:risk", "bastion-users"]
        body.update(claims)
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None}, key or own, algorithm=alg or key_alg, headers={"kid": kid}
        )

    def toml(self, jwks_file: Path | None = None) -> str:
        """This issuer's [[auth.oidc]] block; with `jwks_file`, its keys are written there instead of served."""
        roles = {"bastion-users": "user", "bastion-auditors": "auditor", "bastion-admins": "admin"}
        if jwks_file is not None:
            jwks_file.write_text(json.dumps({"keys": [_jwk(k, key) for k, (_, key) in self.keys.items()]}))
        lines = [
            "[[auth.oidc]]",
            f'issuer = "{self.iss}"',
            f'audience = "{AUDIENCE}"',
            f'jwks_file = "{jwks_file}"' if jwks_file else f'jwks_url = "{self.jwks_url}"',
            "clock_skew_seconds = 60",
            "[auth.oidc.mapping]",
            'team_prefix = "team:"',
            "[auth.oidc.mapping.roles]",
            *(f'"{g}" = "{r}"' for g, r in roles.items()),
        ]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer() -> Any:
    made = Issuer("bank")
    yield made
    made.close()


def auth_toml(*issuers: Issuer, min_refresh: float = 30) -> str:
    return f"[auth]\njwks_min_refresh_seconds = {min_refresh}\n" + "".join(i.toml() for i in issuers)


def models(gw: Gateway, token: str) -> httpx.Response:
    return gw.get("/v1/models", key=token)


def refused(gw: Gateway, r: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    final = gw.final(r.headers["x-request-id"])
    assert final["error_type"] == reason, final
    return final


# -------------------------------------------------------------------- OIDC


def test_tokens_from_the_identity_provider_are_accepted_and_audited(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, issuer: Issuer
) -> None:
    gw = make_gateway(engines=[vllm_engine], policy=POLICY, extra_toml=auth_toml(issuer))
    for kid in ("rsa1", "ec1", "ed1"):
        assert models(gw, issuer.token(kid)).status_code == 200, kid

    token = issuer.token("ec1", sub="alice@bank.test")
    client = openai.OpenAI(api_key=token, base_url=gw.url + "/v1", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    )
    assert raw.parse().choices
    final = gw.final(raw.headers["x-request-id"])
    assert (final["auth_method"], final["team"], final["role"], final["key_name"]) == (
        "oidc",
        "risk",
        "user",
        "alice@bank.test",
    )
    assert final["key_id"].startswith("oidc-")
    assert json.loads(final["detail"])["auth"] == {"issuer": issuer.iss, "subject": "alice@bank.test"}
    stored = b"".join(f.read_bytes() for f in (gw.config.parent / "state").glob("bastion.db*"))
    assert token.encode() not in stored and token.split(".")[2].encode() not in stored, "the token is never stored"


def test_every_bad_token_gets_401_and_an_audit_row(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, issuer: Issuer
) -> None:
    gw = make_gateway(engines=[vllm_engine], policy=POLICY, extra_toml=auth_toml(issuer))
    now = int(time.time())
    rsa_public_pem = (
        issuer.keys["rsa1"][1]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    unsigned = (
        base64.urlsafe_b64encode(b'{"alg":"none","kid":"rsa1"}').rstrip(b"=").decode()
        + "."
        + base64.urlsafe_b64encode(
            json.dumps({"iss": issuer.iss, "aud": AUDIENCE, "sub": "x", "exp": now + 60}).encode()
        )
        .rstrip(b"=")
        .decode()
        + "."
    )
    cases = {
        "expired_token": issuer.token(exp=now - 120),
        "token_not_yet_valid": issuer.token(nbf=now + 600),
        "wrong_audience": issuer.token(aud="another-service"),
        "untrusted_issuer": issuer.token(iss="https://evil.test/"),
        "bad_signature": issuer.token("rsa1", key=stranger),
        "malformed_token": "abc.def.ghi",
        "algorithm_not_allowed": unsigned,
        "unknown_kid": issuer.token("nope", key=stranger),
        "algorithm_key_mismatch": issuer.token("ec1", alg="RS256", key=stranger),
    }
    for reason, token in cases.items():
        r = models(gw, token)
        final = refused(gw, r, 401, reason)
        assert r.json()["error"]["code"] == "invalid_token"
        assert final["auth_method"] is None and token not in json.dumps(final, default=str)
    # A header nested past the JSON parser's recursion limit (PyJWT turns the RecursionError into its DecodeError).
    deep = b'{"alg":"RS256","kid":"rsa1","x":' + b"[" * 1500 + b"]" * 1500 + b"}"
    nested = ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode() for part in (deep, b"{}", b"sig"))
    refused(gw, models(gw, nested), 401, "malformed_token")
    # HS256 keyed with the issuer's public key (the classic algorithm confusion).
    confused = jwt.api_jws.PyJWS()
    confused._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[attr-defined]  # let PyJWT sign with a PEM
    payload = json.dumps({"iss": issuer.iss, "aud": AUDIENCE, "sub": "x", "exp": now + 60}).encode()
    hs = confused.encode(payload, rsa_public_pem, algorithm="HS256", headers={"kid": "rsa1"})
    refused(gw, models(gw, hs), 401, "algorithm_not_allowed")
    # The header is the caller's text until the signature holds: the record does not quote it.
    card = "4111 1111 1111 1111"
    named = jwt.api_jws.PyJWS()
    named._algorithms[card] = named._algorithms["none"]  # type: ignore[attr-defined]  # a header alg of any text
    odd = named.encode(payload, None, algorithm=card, headers={"kid": "rsa1"})
    final = refused(gw, models(gw, odd), 401, "algorithm_not_allowed")
    assert card not in json.dumps(final, default=str), final["error_message"]
    # Inside the clock skew (60 s) an expiry just past still counts.
    assert models(gw, issuer.token(exp=now - 30)).status_code == 200


def test_groups_map_to_one_team_and_one_role(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, issuer: Issuer
) -> None:
    gw = make_gateway(engines=[vllm_engine], policy=POLICY, extra_toml=auth_toml(issuer))
    auditor = issuer.token(groups=["team:risk", "bastion-auditors"])
    assert gw.get("/admin/audit/stats", key=auditor).status_code == 200
    refused(gw, models(gw, auditor), 403, "role_not_allowed")
    admin = issuer.token(groups=["team:ops", "bastion-admins"])
    assert gw.post("/admin/models/verify", key=admin).status_code == 200
    refused(gw, models(gw, issuer.token(groups=["team:risk"])), 403, "role_unmapped")
    refused(
        gw, models(gw, issuer.token(groups=["team:risk", "bastion-users", "bastion-admins"])), 403, "role_ambiguous"
    )
    refused(gw, models(gw, issuer.token(groups=["bastion-users"])), 403, "team_unmapped")
    refused(gw, models(gw, issuer.token(groups=["team:risk", "team:ops", "bastion-users"])), 403, "team_unmapped")
    # A team the trail would cut to 200 characters (two such teams would read
    # alike there), or could not show as it is: refused, as a key's would be.
    for team in ("r" * 200 + "1", "risk\u202e"):
        r = models(gw, issuer.token(groups=[f"team:{team}", "bastion-users"]))
        final = refused(gw, r, 403, "team_unrecordable")
        assert final["team"] is None
    assert models(gw, issuer.token(groups=["team:risk", "bastion-users"])).status_code == 200
    # API keys keep working beside tokens.
    assert models(gw, gw.create_key(team="risk")).status_code == 200


def test_key_rotation_is_picked_up_and_refreshes_are_capped(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, issuer: Issuer
) -> None:
    gw = make_gateway(engines=[vllm_engine], policy=POLICY, extra_toml=auth_toml(issuer, min_refresh=2))
    assert models(gw, issuer.token()).status_code == 200
    fetched = issuer.fetches
    # A flood of tokens naming unknown keys: at most one fetch per 2 s.
    start = time.monotonic()
    for _ in range(30):
        assert models(gw, issuer.token(f"forged-{uuid.uuid4().hex[:6]}", key=issuer.keys["rsa1"][1])).status_code == 401
    allowed = 1 + int((time.monotonic() - start) / 2)
    assert issuer.fetches - fetched <= allowed, (issuer.fetches - fetched, allowed)
    # The provider rotates to a new key: picked up without a restart.
    issuer.add("rsa2", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    time.sleep(2.1)
    r = models(gw, issuer.token("rsa2"))
    assert r.status_code == 200, r.text


def test_several_issuers_at_once(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, issuer: Issuer, tmp_path: Path
) -> None:
    other = Issuer("partner")
    try:
        # The partner's keys come from a file (an air-gapped site's way), the bank's over HTTP.
        toml = auth_toml(issuer) + other.toml(jwks_file=tmp_path / "partner-jwks.json")
        gw = make_gateway(engines=[vllm_engine], policy=POLICY, extra_toml=toml)
        assert models(gw, issuer.token()).status_code == 200
        assert models(gw, other.token()).status_code == 200
        # A token claiming one issuer but signed with the other's key.
        forged = jwt.encode(
            {"iss": issuer.iss, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60, "groups": ["team:risk"]},
            other.keys["rsa1"][1],
            algorithm="RS256",
            headers={"kid": "rsa1"},
        )
        refused(gw, models(gw, forged), 401, "bad_signature")
    finally:
        other.close()


# -------------------------------------------------------------------- mTLS


@dataclass
class Pki:
    folder: Path
    ca_key: Any = None
    ca: Any = None

    def __post_init__(self) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._cert("Bastion Test CA", self.ca_key.public_key(), ca=True)
        (self.folder / "ca.pem").write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def _cert(
        self,
        cn: str,
        public: Any,
        *,
        ca: bool = False,
        ous: tuple[str, ...] = (),
        days: tuple[int, int] = (-1, 30),
        signer: Any = None,
        issuer: Any = None,
        ip: str | None = None,
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
            + [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, o) for o in ous]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days[0]))
            .not_valid_after(now + dt.timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ip:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
            )
        return builder.sign(signer or self.ca_key, hashes.SHA256())

    def issue(
        self,
        name: str,
        cn: str,
        *,
        ous: tuple[str, ...] = (),
        days: tuple[int, int] = (-1, 30),
        foreign: bool = False,
        ip: str | None = None,
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        if foreign:
            other = ec.generate_private_key(ec.SECP256R1())
            other_ca = self._cert("Some Other CA", other.public_key(), ca=True, signer=other)
            cert = self._cert(cn, key.public_key(), ous=ous, days=days, signer=other, issuer=other_ca, ip=ip)
        else:
            cert = self._cert(cn, key.public_key(), ous=ous, days=days, issuer=self.ca, ip=ip)
        cert_path, key_path = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


MTLS_TOML = """\
[auth.mtls]
client_ca = "{ca}"
subject = "cn"
{proxy}
[auth.mtls.mapping]
team_prefix = "team:"
[auth.mtls.mapping.roles]
"bastion-users" = "user"
"bastion-auditors" = "auditor"
"""


def test_mutual_tls_with_the_openai_sdk(make_gateway: GatewayFactory, vllm_engine: EngineRef, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    server_cert, server_key = pki.issue("server", "gateway", ip="127.0.0.1")
    good = pki.issue("good", "svc-claims", ous=("team:claims", "bastion-users"))
    expired = pki.issue("expired", "svc-old", ous=("team:claims", "bastion-users"), days=(-30, -1))
    foreign = pki.issue("foreign", "svc-evil", ous=("team:claims", "bastion-users"), foreign=True)
    no_role = pki.issue("norole", "svc-x", ous=("team:claims",))
    gw = make_gateway(
        engines=[vllm_engine],
        policy=POLICY,
        gateway={"tls_cert": str(server_cert), "tls_key": str(server_key)},
        extra_toml=MTLS_TOML.format(ca=tmp_path / "ca.pem", proxy=""),
        start=False,
    )
    gw.tls_cert = str(tmp_path / "ca.pem")
    gw.client_cert = (str(good[0]), str(good[1]))  # for the helper's health checks
    gw.start()

    opened: list[httpx.Client] = []

    def client(cert: tuple[Path, Path] | None, key: str = "unused") -> openai.OpenAI:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        if cert:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        opened.append(httpx.Client(verify=context))
        return openai.OpenAI(api_key=key, base_url=gw.url + "/v1", max_retries=0, http_client=opened[-1])

    try:
        _mtls_calls(gw, client, good, expired, foreign, no_role)
    finally:
        # Open TLS connections would hold the gateway's graceful shutdown until its timeout.
        for c in opened:
            c.close()


def _mtls_calls(gw: Gateway, client: Any, good: Any, expired: Any, foreign: Any, no_role: Any) -> None:

    raw = client(good).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    )
    final = gw.final(raw.headers["x-request-id"])
    assert (final["auth_method"], final["key_name"], final["team"], final["role"]) == (
        "mtls",
        "svc-claims",
        "claims",
        "user",
    )
    cert_sha = x509.load_pem_x509_certificate(good[0].read_bytes()).fingerprint(hashes.SHA256()).hex()
    assert json.loads(final["detail"])["auth"] == {"subject": "svc-claims", "cert_sha256": cert_sha}

    # Refused at the handshake: no certificate, an expired one, one from another CA.
    for cert in (None, expired, foreign):
        with pytest.raises(openai.APIConnectionError):
            client(cert).models.list()
    # A good certificate that maps to no role: 403 and an audit row.
    with pytest.raises(openai.PermissionDeniedError):
        client(no_role).models.list()
    # A bearer key on a certified connection: the key authenticates; the certificate is noted.
    key = gw.create_key(team="risk")
    raw = client(good, key).models.with_raw_response.list()
    final = gw.final(raw.headers["x-request-id"])
    assert final["auth_method"] == "api_key" and json.loads(final["detail"])["auth"] == {"cert_sha256": cert_sha}


def test_client_certificate_forwarded_by_a_trusted_proxy(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    good = pki.issue("good", "svc-claims", ous=("team:claims", "bastion-users"))
    expired = pki.issue("expired", "svc-old", ous=("team:claims", "bastion-users"), days=(-30, -1))
    foreign = pki.issue("foreign", "svc-evil", ous=("team:claims", "bastion-users"), foreign=True)
    proxy = 'proxy_header = "x-ssl-client-cert"\ntrusted_proxies = ["{nets}"]'
    trusting = make_gateway(
        engines=[vllm_engine],
        policy=POLICY,
        extra_toml=MTLS_TOML.format(ca=tmp_path / "ca.pem", proxy=proxy.format(nets="127.0.0.1/32")),
    )
    distrusting = make_gateway(
        engines=[vllm_engine],
        policy=POLICY,
        extra_toml=MTLS_TOML.format(ca=tmp_path / "ca.pem", proxy=proxy.format(nets="10.0.0.0/8")),
    )

    def forwarded(gw: Gateway, cert: tuple[Path, Path]) -> httpx.Response:
        return gw.get("/v1/models", headers={"x-ssl-client-cert": quote(cert[0].read_text())})

    r = forwarded(trusting, good)
    assert r.status_code == 200 and gw_final(trusting, r)["auth_method"] == "mtls"
    refused(trusting, forwarded(trusting, expired), 401, "cert_expired")
    refused(trusting, forwarded(trusting, foreign), 401, "foreign_cert")
    # Two of the header: a proxy that adds its own without removing the
    # client's. The client's came first and was the one read: the caller
    # chose whom the gateway took them for.
    both = [("x-ssl-client-cert", quote(c[0].read_text())) for c in (good, expired)]
    refused(trusting, trusting.get("/v1/models", headers=both), 401, "repeated_credentials")
    # The same header from an address that is not the proxy is a forgery,
    # also when X-Forwarded-For names the proxy.
    refused(distrusting, forwarded(distrusting, good), 401, "untrusted_cert_header")
    spoofed = {"x-ssl-client-cert": quote(good[0].read_text()), "x-forwarded-for": "10.0.0.1"}
    refused(distrusting, distrusting.get("/v1/models", headers=spoofed), 401, "untrusted_cert_header")


def test_a_page_of_another_site_cannot_call_with_the_browser_s_certificate(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, tmp_path: Path
) -> None:
    """A browser sends its user's certificate whichever page asks. A form on
    another site posting `text/plain` (no CORS preflight) made a model call
    as that user; these are the headers such a form's request carries."""
    pki = Pki(tmp_path)
    good = pki.issue("good", "svc-claims", ous=("team:claims", "bastion-users"))
    proxy = 'proxy_header = "x-ssl-client-cert"\ntrusted_proxies = ["127.0.0.1/32"]'
    gw = make_gateway(
        engines=[vllm_engine], policy=POLICY, extra_toml=MTLS_TOML.format(ca=tmp_path / "ca.pem", proxy=proxy)
    )
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})

    def post(**browser: str) -> httpx.Response:
        headers = {"x-ssl-client-cert": quote(good[0].read_text()), "content-type": "text/plain;charset=UTF-8"}
        return httpx.post(gw.url + "/v1/chat/completions", content=body, headers={**headers, **browser}, timeout=30)

    other_site = "https://intranet.example"
    # A browser of today says where the request comes from; one from before
    # Sec-Fetch-Site (or a sandboxed page: origin "null") only its origin.
    for browser in (
        {"sec-fetch-site": "cross-site", "origin": other_site},
        {"sec-fetch-site": "same-site", "origin": other_site},
        {"origin": other_site},
        {"origin": "null"},
    ):
        final = refused(gw, post(**browser), 403, "cross_site_request")
        assert (final["auth_method"], final["key_name"]) == ("mtls", "svc-claims"), browser
    # The gateway's own origin, the user's own typing, and clients that are not browsers get through.
    for browser in ({"sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"}, {"origin": gw.url}, {}):
        r = post(**browser)
        assert r.status_code == 200 and gw_final(gw, r)["outcome"] == "ok", (browser, r.text)

    # The auditor's routes refuse reads too: an <img> on another site's page
    # had an auditor's browser verify the whole trail, on record as the auditor's.
    auditor = pki.issue("auditor", "ann-audit", ous=("team:audit", "bastion-auditors"))
    as_auditor = {"x-ssl-client-cert": quote(auditor[0].read_text())}
    img = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    final = refused(gw, gw.get("/admin/audit/verify", headers=as_auditor | img), 403, "cross_site_request")
    assert final["key_name"] == "ann-audit"
    typed = gw.get("/admin/audit/verify", headers=as_auditor | {"sec-fetch-site": "none"})
    assert typed.status_code == 200 and typed.json()["intact"] is True
    # A user's reads of the model list stay open (nothing changes, nothing is exported).
    listed = gw.get("/v1/models", headers={"x-ssl-client-cert": quote(good[0].read_text())} | img)
    assert listed.status_code == 200, listed.text


def test_certificate_names_by_kind(tmp_path: Path) -> None:
    from gateway.mtls import organizational_units, subject_name

    pki = Pki(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("claims.svc.bank.test"),
            x509.RFC822Name("claims@bank.test"),
            x509.UniformResourceIdentifier("spiffe://bank.test/claims"),
        ]
    )
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "svc-claims"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "team:claims"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(pki.ca.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(pki.ca_key, hashes.SHA256())
    )
    names = {kind: subject_name(cert, kind) for kind in ("cn", "san_dns", "san_email", "san_uri")}
    assert names == {
        "cn": "svc-claims",
        "san_dns": "claims.svc.bank.test",
        "san_email": "claims@bank.test",
        "san_uri": "spiffe://bank.test/claims",
    }
    assert organizational_units(cert) == ["team:claims"]


def gw_final(gw: Gateway, r: httpx.Response) -> dict[str, Any]:
    return gw.final(r.headers["x-request-id"])
