"""Build a random Llama-style model at a realistic size, for GPU validation.

    ENGINE_PYTHON engine/build_llama.py OUT_DIR [--preset 1b|tiny] [--device cuda]

The `1b` preset has the layer shape of Llama 3.2 1B (hidden 2048, MLP 8192,
32 query heads over 8 KV heads, head_dim 64) with 22 layers: 1.3 B parameters,
2.7 GB in bf16. The vocabulary is the small trained tokenizer's (~512 tokens),
since nothing can be downloaded; the layers, not the embedding table, are what
a serving benchmark exercises. Random weights: the text is noise, so callers
check shapes, token counts and audit rows. `tiny` is the same builder at toy
size, for a local smoke test on CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tiny_tokenizer import train_tokenizer

PRESETS = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 8},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1},
}  # fmt: skip


def build(out: Path, preset: str, device: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="bfloat16",
        **PRESETS[preset],
    )
    with torch.device(device):  # initialising 1.3 B parameters on a GPU takes a second, not a minute
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{build(args.out, args.preset, args.device):,} parameters")
