"""Build a tiny random chat model (Qwen2 architecture, ~1.4 MB) for tests.

Run with the *engine's* Python (it imports torch and transformers, which the
gateway's environment never has)::

    ENGINE_PYTHON engine/build_tiny.py OUT_DIR

The weights are random, so the model's text is noise: tests assert on shapes,
token counts and audit rows, never on words. head_dim is 64 because vLLM's CPU
attention backend rejects smaller heads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tiny_tokenizer import train_tokenizer


def build(out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_tiny.py OUT_DIR")
    build(Path(sys.argv[1]))
