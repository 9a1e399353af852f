"""Manifest hashing: parallel `hash_files` against a single-threaded hashlib loop.

Writes a multi-file folder (default 8 files x 512 MiB = 4 GiB), reads it once
so both sides hash from the page cache, then alternates the two measurements.
Target (issue 3): parallel throughput at least 85% of cores x the one-thread rate.

    .venv/bin/python bench/hash_throughput.py [--files 8] [--mib 512] [--rounds 3] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.manifest import hash_files  # noqa: E402


def one_thread(root: Path, names: list[str]) -> float:
    """The baseline: plain hashlib, one file after another, 1 MiB reads."""
    start = time.perf_counter()
    for name in names:
        digest = hashlib.sha256()
        with open(root / name, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return time.perf_counter() - start


def parallel(root: Path, names: list[str], workers: int) -> float:
    start = time.perf_counter()
    hash_files(root, names, workers=workers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--mib", type=int, default=512, help="size of each file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the folder (default: a temp folder)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bastion-hash-", dir=args.dir))
    try:
        block = os.urandom(1 << 20)
        names = []
        for i in range(args.files):
            name = f"model-{i:05d}-of-{args.files:05d}.safetensors"
            with open(root / name, "wb") as f:
                for _ in range(args.mib):
                    f.write(block)
            names.append(name)
        total = args.files * args.mib * (1 << 20)
        one_thread(root, names)  # warm the page cache
        singles, parallels = [], []
        for _ in range(args.rounds):
            singles.append(one_thread(root, names))
            parallels.append(parallel(root, names, cores))
        single_rate = total / min(singles) / 1e9
        parallel_rate = total / min(parallels) / 1e9
        target = 0.85 * cores * single_rate
        print(f"folder: {args.files} files, {total / 2**30:.1f} GiB; cores: {cores}; best of {args.rounds} rounds")
        print(f"one thread (hashlib loop): {single_rate:.2f} GB/s")
        print(f"parallel hash_files:       {parallel_rate:.2f} GB/s ({cores} workers)")
        share = parallel_rate / (cores * single_rate)
        verdict = "met" if parallel_rate >= target else "MISSED"
        print(
            f"ratio: {parallel_rate / single_rate:.2f}x = {share:.0%} of cores x one thread (target >= 85%: {verdict})"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
