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

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    # Thinking mode as Qwen3 and GLM templates do it: the answer opens with <think>.
    "{% if enable_thinking %}{{ '<think>\n' }}{% endif %}{% endif %}"
)

CORPUS = [
    "The gateway authenticates every caller before the engine sees a byte.",
    "Audit records are written to SQL and chained so that edits are detected.",
    "Hello, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "Banks, hospitals and public agencies run models on their own machines.",
]
# <think> and </think> let vLLM's reasoning parser (deepseek_r1) run on this model.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # noqa: S106 (a token, not a password)
        pad_token="<|endoftext|>",  # noqa: S106
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_tiny.py OUT_DIR")
    build(Path(sys.argv[1]))
