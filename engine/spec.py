"""The engine spec: every vLLM setting Bastion controls, in one typed place.

The same spec produces the command line for the local runner today, and for
the container runners (compose, Docker SDK, GPU image) later, so operators never
hand-edit vLLM flags.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import msgspec


class EngineSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tensor_parallel_size: int = 1
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    # Per-prompt media limits, e.g. {"image": 2, "audio": 1}; empty for text models.
    limit_mm_per_prompt: dict[str, int] = msgspec.field(default_factory=dict)
    reasoning_parser: str = ""
    # GiB of KV cache for the CPU build (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = 1
    # Which CPUs each tensor-parallel worker of the CPU build runs on
    # (VLLM_CPU_OMP_THREADS_BIND): "auto" wants a NUMA node per worker, so a
    # one-node host with tensor_parallel_size > 1 needs lists, e.g. "0-7|8-15",
    # or "nobind".
    cpu_threads_bind: Annotated[str, msgspec.Meta(pattern=r"^(auto|nobind|[0-9,-]+(\|[0-9,-]+)*)$")] = "auto"
    gpu_memory_utilization: float = 0.9
    # Skip torch.compile and CUDA graphs: starts faster, decodes slower (GPU only).
    enforce_eager: bool = False

    def vllm_args(self, *, model_dir: str, served_name: str, listen: list[str]) -> list[str]:
        """Arguments for `python -m vllm.entrypoints.openai.api_server`; `listen`
        says where (`--host H --port P`, or `--uds PATH`).

        The API key is deliberately not here: it travels in the VLLM_API_KEY
        environment variable so it never shows in `ps` output.
        """
        args = [
            "--model", model_dir,
            "--served-model-name", served_name,
            *listen,
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        args.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.limit_mm_per_prompt:
            args += ["--limit-mm-per-prompt", json.dumps(self.limit_mm_per_prompt, sort_keys=True)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.reasoning_parser:
            args += ["--reasoning-parser", self.reasoning_parser]
        return args

    def environment(self) -> dict[str, str]:
        """Environment every engine gets: offline, no telemetry."""
        return {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads_bind,
        }
