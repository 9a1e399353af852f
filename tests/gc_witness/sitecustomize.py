"""Loaded into a gateway under test (PYTHONPATH) by tests/test_cyclic_garbage.py.

On SIGUSR2 it runs a full collection with DEBUG_SAVEALL and writes to
$GC_WITNESS_OUT how many unreachable objects it found and of which types:
garbage that only the cycle collector can free, which the gateway's raised
collector thresholds (gateway/app.py) assume calls do not make."""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import types as types_module


def _collect(signum: int, frame: object) -> None:
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        found = gc.collect()
        types = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        # Which functions' frames are caught in it says where a cycle was made.
        frames = collections.Counter(
            f"{o.f_code.co_qualname} ({o.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{o.f_lineno})"
            for o in gc.garbage
            if isinstance(o, types_module.FrameType)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()  # kept alive by gc.garbage until now: free them for real
    target = os.environ["GC_WITNESS_OUT"]
    with open(target + ".part", "w") as out:
        json.dump(
            {"collected": found, "types": dict(types.most_common(12)), "frames": dict(frames.most_common(12))}, out
        )
    os.replace(target + ".part", target)  # the test sees the report whole or not at all


if os.environ.get("GC_WITNESS_OUT"):
    signal.signal(signal.SIGUSR2, _collect)
