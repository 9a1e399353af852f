"""`bastion compose prepare`: one deployment's compose file and secret files, from bastion.toml.

`docker/compose.yaml` holds what every deployment shares: the sandbox, the
networks, PostgreSQL. This renders what belongs to one deployment, from the
same engine spec the local and Docker SDK runners use (`engine/container.py`):

- the engine's vLLM command line and environment, and its GPUs
  (count = `tensor_parallel_size`; none with `--cpu`);
- the mounts, each at its host path so the config's paths mean the same inside
  the containers: the config folder read-only, the audit anchor's folder
  writable (the gateway's only writable path), the model folder read-only;
- the secret files, each owned by the one container user that reads it: the
  engine key for the engine, the database password for PostgreSQL, the
  gateway's secrets (state/) for the gateway.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.container import (
    ENGINE_UID,
    GATEWAY_UID,
    POSTGRES_UID,
    SOCKET_PATH,
    engine_command,
    engine_environment,
)
from engine.secret_files import hand_over
from gateway.keys import ensure_token_file
from gateway.settings import ConfigError, Deployment, Settings

ENGINE_URL = f"unix:{SOCKET_PATH}"  # the engine service's socket, on the volume the gateway shares
DEPLOY_FILE = "compose.deploy.yaml"


@dataclass(frozen=True)
class Prepared:
    deploy_file: Path
    engine_key: Path  # the engine's copy (ENGINE_UID, 0400)
    postgres_password: Path  # PostgreSQL's copy (POSTGRES_UID, 0400)


def check(settings: Settings, deployment: Deployment) -> None:
    """What a compose deployment needs of bastion.toml; ConfigError names what is off."""
    g = settings.gateway
    problems = []
    if deployment.engine_url.rstrip("/") != ENGINE_URL:
        socket = f"{ENGINE_URL!r} (the engine service's socket)"
        problems.append(f"deployments.{deployment.name}.engine_url must be {socket}")
    if g.host != "0.0.0.0" or g.port != 8000:  # noqa: S104 - inside the container; compose publishes the port
        problems.append('gateway.host must be "0.0.0.0" and gateway.port 8000 inside the container')
    if not settings.database.url.startswith("postgresql"):
        problems.append("database.url must be PostgreSQL (the compose `postgres` service)")
    if not settings.database.password_file:
        problems.append("database.password_file must be set (the password is a secret file, not part of the URL)")
    if not deployment.model_dir:
        problems.append(f"deployments.{deployment.name}.model_dir is required")
    base = Path(settings.base_dir).resolve()
    inside = {
        "state_dir": settings.state_path,
        "policy.file": settings.policy_file,
        "the audit anchor file": settings.audit_anchor_file,
        "the audit signing key": settings.audit_signing_key,
        "the manifest": settings.path(deployment.manifest) if deployment.manifest else base,
        **{f"publisher key {p.key_id}": settings.path(p.public_key) for p in settings.publishers},
        **{f"audit trusted key {k.key_id}": settings.path(k.public_key) for k in settings.audit.trusted_keys},
        **{f"jwks_file of {o.issuer}": settings.path(o.jwks_file) for o in settings.auth.oidc if o.jwks_file},
    }
    files = {
        "gateway.tls_cert": settings.gateway.tls_cert,
        "gateway.tls_key": settings.gateway.tls_key,
        "auth.mtls.client_ca": settings.auth.mtls.client_ca,
        "media.fetch.ca_file": settings.media.fetch.ca_file,
        "audit.keyring_file": settings.audit.keyring_file,
    }
    inside |= {what: settings.path(value) for what, value in files.items() if value}
    for what, path in inside.items():
        if not path.resolve().is_relative_to(base):
            problems.append(f"{what} ({path}) must be inside the config folder {base}, which the gateway mounts")
    if deployment.model_dir:
        unreadable = _unreadable_by_others(settings.path(deployment.model_dir).resolve())
        if unreadable:
            problems.append(f"the engine's user cannot read {unreadable} (the model folder must be o+rX)")
    if problems:
        raise ConfigError("not ready for compose:\n  " + "\n  ".join(problems))


def _walk(root: Path, skip: set[Path]) -> list[Path]:
    """root and everything under it, without the subtrees in skip."""
    found = [root]
    for entry in root.iterdir():
        if entry in skip or entry.is_symlink():
            continue
        found += _walk(entry, skip) if entry.is_dir() else [entry]
    return found


def _unreadable_by_others(folder: Path) -> Path | None:
    for path in _walk(folder, skip=set()):
        need = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if path.stat().st_mode & need != need:
            return path
    return None


def prepare(settings: Settings, deployment: Deployment, *, gpus: bool) -> Prepared:
    """Write the secret files with their owners, then DIR/compose.deploy.yaml. Needs root (chown)."""
    check(settings, deployment)
    if os.geteuid() != 0:
        raise ConfigError("compose prepare gives each secret file to its container user: run it as root")
    base = Path(settings.base_dir).resolve()
    state = settings.state_path.resolve()

    engine_key = settings.engine_key_path(deployment)
    password = settings.path(settings.database.password_file)
    ensure_token_file(engine_key)
    ensure_token_file(password)
    anchor_dir = settings.audit_anchor_file.resolve().parent
    anchor_dir.mkdir(parents=True, exist_ok=True)

    model = settings.path(deployment.model_dir).resolve()
    # The config folder and the gateway's state (its secrets, the anchor) belong
    # to the gateway's user; the model and the copies handed to the other
    # containers (state/compose, read on the host only by dockerd) do not.
    handed = state / "compose"
    for path in _walk(base, skip={model, handed, state / "containers"}):
        os.chown(path, GATEWAY_UID, GATEWAY_UID)
    handed.mkdir(exist_ok=True)
    os.chown(handed, 0, 0)
    handed.chmod(0o700)
    prepared = Prepared(base / DEPLOY_FILE, handed / "engine.key", handed / "postgres-password")
    hand_over(engine_key, prepared.engine_key, ENGINE_UID)
    hand_over(password, prepared.postgres_password, POSTGRES_UID)

    prepared.deploy_file.write_text(render(settings, deployment, prepared, gpus=gpus))
    return prepared


def render(settings: Settings, deployment: Deployment, prepared: Prepared, *, gpus: bool) -> str:
    """The deployment's compose file (merged over docker/compose.yaml)."""
    base = Path(settings.base_dir).resolve()
    config = str(base / "bastion.toml")
    model = str(settings.path(deployment.model_dir).resolve())
    anchor_dir = str(settings.audit_anchor_file.resolve().parent)
    engine: dict[str, object] = {
        "command": engine_command(deployment.engine, deployment.name, Path(model)),
        "environment": engine_environment(deployment.engine),
        "volumes": [f"{model}:{model}:ro"],
    }
    if gpus:
        device = {"driver": "nvidia", "count": deployment.engine.tensor_parallel_size, "capabilities": ["gpu"]}
        engine["deploy"] = {"resources": {"reservations": {"devices": [device]}}}
    doc = {
        "services": {
            "engine": engine,
            "migrate": {"command": ["db", "upgrade", "--config", config], "volumes": [f"{base}:{base}:ro"]},
            "gateway": {
                "command": ["serve", "--config", config],
                "volumes": [f"{base}:{base}:ro", f"{anchor_dir}:{anchor_dir}:rw", f"{model}:{model}:ro"],
            },
        },
        "secrets": {
            "engine_key": {"file": str(prepared.engine_key)},
            "postgres_password": {"file": str(prepared.postgres_password)},
        },
    }
    header = f"# Rendered by `bastion compose prepare` from {config}; render again instead of editing.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=1000)
