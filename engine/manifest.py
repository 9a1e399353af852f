"""Signed model manifests: create, sign, verify (format: docs/manifests.md).

A manifest lists every file of a model folder with its relative path, size and
SHA-256. Its bytes are canonical JSON (sorted keys, no spaces, ASCII), and the
publisher signs exactly those bytes with Ed25519; the signature lives beside it
in `MANIFEST.sig`. Verification reports every problem it finds, each as a
`Problem` with a kind, so callers and tests can tell them apart.

Hashing reads in large blocks and runs files in parallel threads: hashlib
releases the GIL while it hashes, so threads use every core.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.secret_files import replace_file, write_secret_file

FORMAT = "bastion-manifest/v1"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
BLOCK = 8 * 1024 * 1024

Progress = Callable[[int], None]


class ManifestFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str
    size: int
    sha256: str


class ModelId(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    version: str


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    model: ModelId
    created_at: str
    hash_algorithm: str
    files: list[ManifestFile]


class Signature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    algorithm: str
    key_id: str
    signature: str  # base64 of the 64-byte Ed25519 signature


@dataclass(frozen=True)
class Problem:
    """One reason a model folder does not match its manifest."""

    kind: str  # changed | size | missing | extra | symlink | special_file | bad_path | bad_manifest
    #           | bad_signature | unknown_key | wrong_model | too_large
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}" if self.path else f"{self.kind}: {self.detail}"


@dataclass
class Verification:
    """The outcome of verifying one model folder."""

    model: str
    manifest_sha256: str = ""
    key_id: str = ""
    bytes_hashed: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------- keys


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """A key's id: the first 16 hex digits of SHA-256 over its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def pem_pair(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """The private key (PKCS8) and its public key (SubjectPublicKeyInfo), as PEM."""
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def public_key_path(key_path: Path) -> Path:
    """Where a private key's public half is kept: beside it, `KEY.pub`."""
    return Path(str(key_path) + ".pub")


def create_signing_key(out: Path) -> str:
    """Write an Ed25519 private key (PEM, 0600) to `out` and its public key to `out.pub`."""
    key = Ed25519PrivateKey.generate()
    private, public = pem_pair(key)
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The private key is the commit point: whole or absent, never an empty file
    # that a crash or a full disk left behind and a rerun would then keep.
    write_secret_file(out, private)
    replace_file(public_key_path(out), public, mode=0o644)
    return key_id_of(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


# ------------------------------------------------------------- hashing


def hash_file(path: Path, progress: Progress | None = None) -> tuple[int, str]:
    """(size, hex SHA-256) of a file, read in large blocks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
            if progress is not None:
                progress(n)
    return size, digest.hexdigest()


def hash_files(
    root: Path, paths: Iterable[str], *, workers: int | None = None, progress: Progress | None = None
) -> dict[str, tuple[int, str]]:
    """Hash files under `root` in parallel, largest first so the tail is short."""
    ordered = sorted(paths, key=lambda p: (root / p).stat().st_size, reverse=True)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="hash") as pool:
        results = pool.map(lambda p: (p, hash_file(root / p, progress)), ordered)
        return dict(results)


# ---------------------------------------------------------- the folder


@dataclass(frozen=True)
class FolderPolicy:
    """What a model folder may hold beside the files its manifest lists."""

    allow_extra: tuple[str, ...] = ()  # glob patterns of files that need not be listed
    allow_internal_symlinks: bool = False


def scan_folder(root: Path, policy: FolderPolicy) -> tuple[list[str], list[Problem]]:
    """Every regular file under `root` as a relative POSIX path, and what is wrong.

    Symlinks are refused unless the policy allows ones that stay inside the
    folder; those are listed under their own name and hashed through the link.
    """
    files: list[str] = []
    problems: list[Problem] = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = full.resolve()
                inside = target == real_root or real_root in target.parents
                if not (policy.allow_internal_symlinks and inside and target.is_file()):
                    where = "inside" if inside else "outside"
                    problems.append(Problem("symlink", rel, f"symbolic link to {where} the folder is not allowed"))
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                files.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif stat.S_ISREG(st.st_mode):
                files.append(rel)
            else:
                problems.append(Problem("special_file", rel, "not a regular file"))
    return sorted(files), problems


# ------------------------------------------------------------- manifest


def canonical(manifest: Manifest) -> bytes:
    """The bytes that are signed and written: sorted keys, no spaces, ASCII."""
    return json.dumps(msgspec.to_builtins(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def create_manifest(
    root: Path,
    *,
    name: str,
    version: str,
    policy: FolderPolicy = FolderPolicy(),
    workers: int | None = None,
    progress: Progress | None = None,
) -> Manifest:
    files, problems = scan_folder(root, policy)
    if problems:
        raise ValueError("cannot create a manifest: " + "; ".join(map(str, problems)))
    hashed = hash_files(root, files, workers=workers, progress=progress)
    return Manifest(
        format=FORMAT,
        model=ModelId(name=name, version=version),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        hash_algorithm="sha256",
        files=[ManifestFile(path=p, size=hashed[p][0], sha256=hashed[p][1]) for p in files],
    )


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> Signature:
    return Signature(
        algorithm="ed25519",
        key_id=key_id_of(key.public_key()),
        signature=base64.b64encode(key.sign(manifest_bytes)).decode(),
    )


def signature_path(manifest_path: Path) -> Path:
    return Path(str(manifest_path) + ".sig")


def write_manifest(manifest: Manifest, manifest_path: Path) -> bytes:
    """Write a manifest in canonical form; returns its bytes.

    Whole or not at all (`replace_file`): a full disk, or a gateway re-verifying
    while an operator re-signs, finds the old manifest or the new, never half of
    one. World-readable: a manifest names files and hashes, nothing secret."""
    data = canonical(manifest)
    replace_file(manifest_path, data, 0o644)
    return data


def write_signature(manifest_path: Path, data: bytes, key: Ed25519PrivateKey) -> Signature:
    """Sign a manifest's bytes and write MANIFEST.sig beside it, whole or not at all."""
    sig = sign(data, key)
    replace_file(signature_path(manifest_path), msgspec.json.encode(sig), 0o644)
    return sig


def write_signed(manifest: Manifest, manifest_path: Path, key: Ed25519PrivateKey) -> Signature:
    """Write a manifest in canonical form and its signature."""
    return write_signature(manifest_path, write_manifest(manifest, manifest_path), key)


def _path_problems(files: list[ManifestFile]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for f in files:
        p = f.path
        parts = PurePosixPath(p).parts
        if not p or p.startswith("/") or "\\" in p or (len(p) > 1 and p[1] == ":"):
            problems.append(Problem("bad_path", p, "absolute or not a POSIX relative path"))
        elif ".." in parts or "." in parts or p != PurePosixPath(p).as_posix() or "" in p.split("/"):
            problems.append(Problem("bad_path", p, "path is not normalised (contains '..', '.' or empty parts)"))
        folded = p.casefold()
        if folded in seen:
            kind = "repeats" if seen[folded] == p else f"differs only by case from {seen[folded]!r}"
            problems.append(Problem("bad_path", p, f"path {kind}"))
        seen.setdefault(folded, p)
        if f.size < 0 or len(f.sha256) != 64:
            problems.append(Problem("bad_manifest", p, "size or sha256 is malformed"))
    return problems


def load_manifest(path: Path) -> tuple[bytes, Manifest | None, list[Problem]]:
    """Read and parse a manifest, refusing oversized and malformed ones."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return b"", None, [Problem("bad_manifest", str(path), f"cannot read: {exc.strerror}")]
    if size > MAX_MANIFEST_BYTES:
        return b"", None, [Problem("too_large", str(path), f"manifest is {size} bytes, limit {MAX_MANIFEST_BYTES}")]
    data = path.read_bytes()
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        return data, None, [Problem("bad_manifest", str(path), str(exc))]
    problems = []
    if manifest.format != FORMAT or manifest.hash_algorithm != "sha256":
        problems.append(
            Problem(
                "bad_manifest", str(path), f"unsupported format or hash ({manifest.format}, {manifest.hash_algorithm})"
            )
        )
    return data, manifest, problems + _path_problems(manifest.files)


def check_signature(data: bytes, sig_path: Path, trusted: dict[str, Ed25519PublicKey]) -> tuple[str, list[Problem]]:
    try:
        sig = msgspec.json.decode(sig_path.read_bytes(), type=Signature)
        raw = base64.b64decode(sig.signature, validate=True)
    except (OSError, msgspec.DecodeError, ValueError) as exc:
        return "", [Problem("bad_signature", str(sig_path), f"unreadable signature file: {exc}")]
    key = trusted.get(sig.key_id)
    if sig.algorithm != "ed25519":
        return sig.key_id, [Problem("bad_signature", str(sig_path), f"algorithm {sig.algorithm!r} is not ed25519")]
    if key is None:
        return sig.key_id, [Problem("unknown_key", str(sig_path), f"signed by key {sig.key_id}, which is not trusted")]
    try:
        key.verify(raw, data)
    except InvalidSignature:
        return sig.key_id, [Problem("bad_signature", str(sig_path), "signature does not match the manifest")]
    return sig.key_id, []


def verify(
    root: Path,
    manifest_path: Path,
    trusted: dict[str, Ed25519PublicKey],
    *,
    expected_model: str | None = None,
    policy: FolderPolicy = FolderPolicy(),
    workers: int | None = None,
    progress: Progress | None = None,
) -> Verification:
    """Check the signature, then every file. Files are hashed only when the
    signature and the manifest itself are sound, and only when sizes match."""
    started = time.monotonic()
    data, manifest, problems = load_manifest(manifest_path)
    result = Verification(model=expected_model or "", manifest_sha256=hashlib.sha256(data).hexdigest() if data else "")
    if manifest is not None and not problems:
        result.key_id, sig_problems = check_signature(data, signature_path(manifest_path), trusted)
        problems += sig_problems
        if expected_model is not None and manifest.model.name != expected_model:
            problems.append(
                Problem(
                    "wrong_model",
                    str(manifest_path),
                    f"manifest is for {manifest.model.name!r}, not {expected_model!r}",
                )
            )
    if manifest is None or problems:
        result.problems = problems
        result.seconds = time.monotonic() - started
        return result

    on_disk, problems = scan_folder(root, policy)
    listed = {f.path: f for f in manifest.files}
    present = set(on_disk)
    for path in sorted(set(listed) - present):
        problems.append(Problem("missing", path, "listed in the manifest but not in the folder"))
    for path in sorted(present - set(listed)):
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in policy.allow_extra):
            problems.append(Problem("extra", path, "in the folder but not in the manifest"))
    to_hash = []
    for path in sorted(present & set(listed)):
        size = (root / path).stat().st_size
        if size != listed[path].size:
            change = "truncated" if size < listed[path].size else "grown"
            problems.append(Problem("size", path, f"{change}: {size} bytes, manifest says {listed[path].size}"))
        else:
            to_hash.append(path)
    hashed = hash_files(root, to_hash, workers=workers, progress=progress)
    for path, (size, digest) in sorted(hashed.items()):
        result.bytes_hashed += size
        if digest != listed[path].sha256:
            problems.append(Problem("changed", path, "content differs from the manifest (SHA-256 mismatch)"))
    result.problems = problems
    result.seconds = time.monotonic() - started
    return result
