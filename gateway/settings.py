"""Bastion's configuration: one TOML file, validated into typed structs.

Why TOML + msgspec: `tomllib` is in the standard library (no YAML parser to
trust), and `msgspec.convert` validates the parsed table into frozen structs
with errors that name the exact field (`$.gateway.port`), which is what an
operator needs from a bad config. Relative paths are resolved against the
folder holding the config file, so a config folder can be moved as a whole.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from engine.spec import EngineSpec
from gateway.client_address import Networks
from gateway.engine_http import Origin

DEFAULT_CONFIG_NAME = "bastion.toml"
CONFIG_ENV = "BASTION_CONFIG"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid (CLI exit code 2)."""


class GatewaySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # TLS is served when both are set; the key file must not be world-readable.
    tls_cert: str = ""
    tls_key: str = ""
    max_body_bytes: int = 10 * 1024 * 1024
    # Seconds a client has to send a request's line and headers, counted from
    # the connection's start or the head's first bytes; then 408 (slow loris).
    header_timeout_seconds: float = 30.0
    # Seconds a client has to send a request's body once the gateway reads it; then 408.
    body_timeout_seconds: float = 60.0
    # Seconds a client may leave the gateway's answer unread (its socket
    # full) before the connection is dropped (slow reader).
    send_timeout_seconds: float = 60.0
    # Seconds a connection may sit idle between requests before the gateway
    # closes it. Longer than any client keeps an idle connection for reuse
    # (httpx and the openai SDK: 5 s; load balancers and nginx's upstream
    # pools: 60 s): a request sent as the gateway closes is lost to a reset.
    keepalive_timeout_seconds: float = 75.0
    # Open connections per gateway process, and per client address (a trusted
    # proxy's connections count only in the first); more are answered 503.
    max_connections: int = 4096
    max_connections_per_client: int = 1024
    # Seconds to wait for the engine: to connect, and between bytes of its answer.
    engine_connect_timeout: float = 5.0
    engine_read_timeout: float = 300.0
    # The most of one engine answer the gateway holds: a whole non-streamed
    # answer, or one event of a stream; larger is a 502 (or an error event).
    engine_max_answer_bytes: int = 256 * 1024 * 1024
    engine_pool_size: int = 256
    # How long an idle pooled connection to an engine is kept. Keep it below the
    # engine's own keep-alive (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default).
    engine_keepalive_seconds: float = 4.0
    # Gateway processes sharing the port (uvicorn's supervisor restarts one
    # that dies). Each has its own audit stream and engine pool;
    # rate limits must then be shared (policy.rate_limits.backend = "redis").
    workers: int = 1
    # Networks (CIDR) of proxies in front of the gateway whose X-Forwarded-For
    # names the caller. Empty: the connection's peer is the caller, whatever
    # the headers say (gateway/client_address.py).
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # Whose calls may reuse each other's cached prompt prefixes in the engine
    # (vLLM's `cache_salt`, set by the gateway over any the caller sends): a
    # cache hit answers faster, so a caller who shares a cache can time whether
    # a prompt was sent by someone else. "team" (default), "key", or "shared".
    prefix_cache_scope: Literal["team", "key", "shared"] = "team"


class DatabaseSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # SQLAlchemy async URL: sqlite+aiosqlite:///PATH or postgresql+asyncpg://...
    url: str = "sqlite+aiosqlite:///state/bastion.db"
    # How long a writer waits on a locked SQLite file before the write fails.
    sqlite_busy_timeout_ms: int = 5000
    # File holding the database password (a secret mounted into a container), so
    # that the URL above carries none; its one line replaces the URL's password.
    password_file: str = ""


class TrustedKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An Ed25519 public key trusted for signatures (model publishers, audit checkpoints)."""

    key_id: str
    public_key: str  # PEM file of the Ed25519 public key


CaptureMode = Literal["none", "hash", "encrypted"]


class AuditSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # strict: an intent record is committed before the engine sees a call (on
    # disk before any of the answer is released), the outcome record follows.
    # relaxed: one record after the call (see docs/audit.md).
    mode: Literal["strict", "relaxed"] = "strict"
    # Records waiting for the writer. When full, calls are refused with 503
    # instead of buffering without bound.
    queue_max: int = 10_000
    # Most records written in one transaction (group commit).
    batch_max: int = 512
    # Sign the chain head every this many records, or this many seconds.
    checkpoint_every: int = 1000
    checkpoint_seconds: float = 10.0
    # Ed25519 key that signs checkpoints (default: state/secrets/audit-signing.key).
    signing_key: str = ""
    # Keys `audit verify` trusts; default: the signing key's own .pub file.
    trusted_keys: list[TrustedKey] = msgspec.field(default_factory=list)
    # Append-only JSON lines of every checkpoint (default: state/audit-anchor.jsonl).
    anchor_file: str = ""
    # Payload capture: none | hash (SHA-256 of request and response) | encrypted.
    capture: CaptureMode = "hash"
    # (A team's or key's own capture mode is set in the policy file: `capture`.)
    # AES-256-GCM keyring for encrypted capture (default: state/secrets/audit-keyring.json).
    keyring_file: str = ""
    # Encrypted capture keeps at most this many bytes of each request and response.
    capture_max_bytes: int = 16 * 1024 * 1024


class RateLimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # memory: limits held by this gateway alone; redis: shared by every replica.
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Redis key (hash-tag it, e.g. "{bastion}", on Redis Cluster).
    key_prefix: str = "bastion"
    # Seconds to wait for Redis before the call is refused (503), never let through.
    timeout_seconds: float = 0.5
    # Connections to Redis per gateway process; a call finding all of them busy
    # waits for one (within timeout_seconds) instead of failing at once.
    max_connections: int = 64


class PolicySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The policy file (YAML, see docs/policy.md). Without it the gateway does not start.
    file: str = "policy.yaml"
    # How often to look for a changed file (seconds); 0 = only on SIGHUP.
    reload_seconds: float = 2.0
    rate_limits: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)


Role = Literal["user", "auditor", "admin"]
JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


class IdentityMapping(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How an identity's groups (token claim values, certificate OUs) become a team and a role."""

    # Groups starting with this prefix name the team (prefix removed); exactly one must.
    team_prefix: str = ""
    # Group → role. Groups mapping to two different roles are refused (give a caller one role).
    roles: dict[str, Role] = msgspec.field(default_factory=dict)
    # The role when no group maps to one; unset: such callers are refused.
    default_role: Role | None = None


class OidcIssuer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    issuer: str
    audience: str
    # Keys: fetched from jwks_url (https, or http on loopback only), or read from jwks_file.
    jwks_url: str = ""
    jwks_file: str = ""
    # Never "none" nor HS*: a shared secret has no place beside published keys.
    algorithms: list[JwtAlgorithm] = msgspec.field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    clock_skew_seconds: float = 60.0
    subject_claim: str = "sub"
    team_claim: str = "groups"
    roles_claim: str = "groups"
    mapping: IdentityMapping = msgspec.field(default_factory=IdentityMapping)


class MtlsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # PEM bundle of the CA(s) that issue client certificates; set = client certificates required.
    client_ca: str = ""
    # Which name identifies the caller.
    subject: Literal["cn", "san_dns", "san_uri", "san_email"] = "cn"
    # Team and role come from the certificate subject's OU values, mapped like token groups.
    mapping: IdentityMapping = msgspec.field(default_factory=IdentityMapping)
    # Behind a TLS-terminating proxy: the header carrying the verified client certificate
    # (URL-encoded PEM, as nginx's $ssl_client_escaped_cert), accepted only from these networks.
    proxy_header: str = ""
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class AuthSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    api_keys: bool = True
    oidc: list[OidcIssuer] = msgspec.field(default_factory=list)
    mtls: MtlsSettings = msgspec.field(default_factory=MtlsSettings)
    # JWKS: keep fetched keys this long; on an unknown `kid` fetch again, but at
    # most once per jwks_min_refresh_seconds per issuer (a flood of bad tokens
    # must not become a flood of requests to the identity provider).
    jwks_cache_seconds: float = 3600.0
    jwks_min_refresh_seconds: float = 30.0


class FetchSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Remote images the gateway itself may fetch (gateway/image_fetch.py); none by default."""

    # "host" or "host:port", matched exactly. Empty: every remote URL is refused.
    allow_hosts: list[str] = msgspec.field(default_factory=list)
    # Plain http:// as well as https:// (for hosts on a trusted internal network).
    allow_http: bool = False
    max_bytes: int = 10_000_000
    # The whole fetch, connect to last byte.
    timeout_seconds: float = 10.0
    # CA bundle for https (default: the system's).
    ca_file: str = ""

    def hosts(self) -> set[tuple[str, int | None]]:
        """The allow-list as (host, port); port None means the scheme's default port."""
        out = set()
        for entry in self.allow_hosts:
            parts = urlsplit("//" + entry.strip())
            if not parts.hostname or parts.path or parts.username or parts.query:
                raise ValueError(f"{entry!r} is not a host or host:port")
            out.add((parts.hostname.lower(), parts.port))
        return out


class MediaSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Ceilings for every caller; a team's policy can only set tighter ones.
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    # Media parts (images and audio) in one request. Each is decoded (and may
    # be fetched) before policy's counts are read, and recorded in the audit
    # detail: 10 MB of one-pixel GIFs was 80,000 parts, 3 s of decoding and a
    # 10 MB record.
    max_parts: int = 64
    fetch: FetchSettings = msgspec.field(default_factory=FetchSettings)


class LoggingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Deployment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One model as clients name it, and the engine that serves it."""

    name: str
    # Where the gateway reaches the engine: http(s)://host:port or unix:/path
    # (engine/address.py). `bastion up` starts a local engine listening exactly
    # here (a loopback address or a Unix socket for the local runner).
    engine_url: str
    # The model folder the engine serves (verified against the manifest; served by `up`).
    model_dir: str = ""
    # File holding the engine's API key; only the gateway and the engine know it.
    engine_key_file: str = ""
    engine: EngineSpec = msgspec.field(default_factory=EngineSpec)
    # Integrity: the signed manifest (signature at MANIFEST.sig). A deployment
    # with verify = true (the default) is routable only once model_dir matches it.
    verify: bool = True
    manifest: str = ""
    # The model name the manifest must carry (default: the deployment name).
    manifest_model: str = ""
    # Files the folder may hold without being listed (glob patterns, e.g. "README.md").
    allow_extra_files: list[str] = msgspec.field(default_factory=list)
    # Symlinks are refused; this allows those that stay inside the folder.
    allow_internal_symlinks: bool = False

    @property
    def expected_model(self) -> str:
        return self.manifest_model or self.name


class IntegritySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Re-verify every model this often (seconds); 0 = only at boot, on SIGHUP
    # and on POST /admin/models/verify.
    reverify_seconds: float = 3600.0
    # Hashing threads; 0 = one per core.
    workers: int = 0


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    state_dir: str = "state"
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)
    policy: PolicySettings = msgspec.field(default_factory=PolicySettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    media: MediaSettings = msgspec.field(default_factory=MediaSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    integrity: IntegritySettings = msgspec.field(default_factory=IntegritySettings)
    # Model publishers whose manifest signatures the gateway trusts.
    publishers: list[TrustedKey] = msgspec.field(default_factory=list)
    # The engine's own Python (vLLM lives there, never in the gateway's environment).
    engine_python: str = ""
    deployments: list[Deployment] = msgspec.field(default_factory=list)
    # Folder of the config file; every relative path above is relative to it.
    base_dir: str = "."

    def path(self, value: str) -> Path:
        """Resolve a path from the config against the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    @property
    def key_pepper_file(self) -> Path:
        return self.state_path / "secrets" / "api-key-pepper"

    @property
    def audit_signing_key(self) -> Path:
        return (
            self.path(self.audit.signing_key)
            if self.audit.signing_key
            else self.state_path / "secrets" / "audit-signing.key"
        )

    @property
    def audit_anchor_file(self) -> Path:
        return self.path(self.audit.anchor_file) if self.audit.anchor_file else self.state_path / "audit-anchor.jsonl"

    @property
    def policy_file(self) -> Path:
        return self.path(self.policy.file)

    @property
    def audit_keyring_file(self) -> Path:
        if self.audit.keyring_file:
            return self.path(self.audit.keyring_file)
        return self.state_path / "secrets" / "audit-keyring.json"

    def database_url(self) -> str:
        """The database URL: a relative SQLite path resolved against base_dir, the password from password_file."""
        url = self.database.url
        for prefix in ("sqlite+aiosqlite:///", "sqlite:///"):
            if url.startswith(prefix):
                rest = url[len(prefix) :]
                if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
                    return prefix + str(self.path(rest).resolve())
        if self.database.password_file:
            from sqlalchemy.engine import make_url

            path = self.path(self.database.password_file)
            try:
                password = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"database.password_file {path}: {exc.strerror}") from None
            return make_url(url).set(password=password).render_as_string(hide_password=False)
        return url

    def engine_key_path(self, deployment: Deployment) -> Path:
        if deployment.engine_key_file:
            return self.path(deployment.engine_key_file)
        return self.state_path / "secrets" / f"engine-{deployment.name}.key"

    def deployment(self, name: str) -> Deployment | None:
        for d in self.deployments:
            if d.name == name:
                return d
        return None


def resolve_config_path(explicit: str | None) -> Path:
    """`--config`, then `$BASTION_CONFIG`, then `./bastion.toml`."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path(DEFAULT_CONFIG_NAME)


def load_settings(path: Path) -> Settings:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (run `bastion init` or pass --config)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table["base_dir"] = str(path.resolve().parent)
    try:
        settings = msgspec.convert(table, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    _check(settings, path)
    return settings


def _check(settings: Settings, path: Path) -> None:
    names = [d.name for d in settings.deployments]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"{path}: deployment names repeat: {', '.join(sorted(duplicates))}")
    if bool(settings.gateway.tls_cert) != bool(settings.gateway.tls_key):
        raise ConfigError(f"{path}: gateway.tls_cert and gateway.tls_key must be set together")
    if settings.gateway.workers < 1:
        raise ConfigError(f"{path}: gateway.workers must be at least 1")
    g = settings.gateway
    timeouts = (g.header_timeout_seconds, g.body_timeout_seconds, g.send_timeout_seconds, g.keepalive_timeout_seconds)
    if min(timeouts) <= 0:
        raise ConfigError(
            f"{path}: gateway.header_timeout_seconds, body_timeout_seconds, send_timeout_seconds"
            " and keepalive_timeout_seconds must be positive"
        )
    if min(g.max_connections, g.max_connections_per_client) < 1:
        raise ConfigError(f"{path}: gateway.max_connections and max_connections_per_client must be at least 1")
    if min(g.engine_pool_size, g.engine_max_answer_bytes) < 1:
        raise ConfigError(f"{path}: gateway.engine_pool_size and engine_max_answer_bytes must be at least 1")
    _check_networks(f"{path}: gateway.trusted_proxies", settings.gateway.trusted_proxies)
    if settings.gateway.workers > 1 and settings.policy.rate_limits.backend != "redis":
        # In-memory limits would be per process: N workers would allow N times the limit.
        raise ConfigError(
            f'{path}: gateway.workers = {settings.gateway.workers} needs policy.rate_limits.backend = "redis"'
            " (limits held in memory would count each worker's calls only)"
        )
    a = settings.audit
    if min(a.queue_max, a.batch_max, a.checkpoint_every, a.capture_max_bytes) < 1 or a.checkpoint_seconds <= 0:
        raise ConfigError(
            f"{path}: audit.queue_max, batch_max, checkpoint_every, capture_max_bytes and checkpoint_seconds"
            " must be positive"
        )
    _check_auth(settings.auth, path)
    if settings.media.max_parts < 1:
        raise ConfigError(f"{path}: media.max_parts must be at least 1")
    f = settings.media.fetch
    try:
        f.hosts()
    except ValueError as exc:
        raise ConfigError(f"{path}: media.fetch.allow_hosts: {exc}") from None
    if f.max_bytes < 1 or f.timeout_seconds <= 0:
        raise ConfigError(f"{path}: media.fetch.max_bytes and timeout_seconds must be positive")
    if settings.auth.mtls.client_ca and not settings.auth.mtls.proxy_header and not settings.gateway.tls_cert:
        raise ConfigError(f"{path}: auth.mtls.client_ca needs gateway.tls_cert and tls_key (or a proxy_header)")
    for d in settings.deployments:
        try:
            Origin.of(d.engine_url, {})  # what the engine client will connect to
        except ValueError as exc:
            raise ConfigError(f"{path}: deployment {d.name!r}: engine_url: {exc}") from None
        if d.verify and not (d.manifest and d.model_dir):
            raise ConfigError(
                f"{path}: deployment {d.name!r}: set manifest and model_dir, or verify = false to serve it unverified"
            )


def _check_auth(auth: AuthSettings, path: Path) -> None:
    issuers = [i.issuer for i in auth.oidc]
    if len(set(issuers)) != len(issuers):
        raise ConfigError(f"{path}: auth.oidc: an issuer is listed twice")
    for i in auth.oidc:
        if bool(i.jwks_url) == bool(i.jwks_file):
            raise ConfigError(f"{path}: auth.oidc {i.issuer!r}: set exactly one of jwks_url and jwks_file")
        if i.jwks_url and not _https_or_loopback(i.jwks_url):
            raise ConfigError(f"{path}: auth.oidc {i.issuer!r}: jwks_url must be https:// (http:// only on loopback)")
        if not i.algorithms or not i.audience:
            raise ConfigError(f"{path}: auth.oidc {i.issuer!r}: audience and algorithms must not be empty")
    m = auth.mtls
    _check_networks(f"{path}: auth.mtls.trusted_proxies", m.trusted_proxies)
    if m.proxy_header and not m.trusted_proxies:
        raise ConfigError(f"{path}: auth.mtls.proxy_header needs trusted_proxies (the proxy's addresses)")
    if m.proxy_header and not m.client_ca:
        raise ConfigError(f"{path}: auth.mtls.proxy_header needs client_ca (forwarded certificates are checked too)")


def _check_networks(where: str, cidrs: list[str]) -> None:
    try:
        Networks(cidrs)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _https_or_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost"))
