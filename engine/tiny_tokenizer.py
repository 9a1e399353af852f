"""A byte-level BPE tokenizer trained on the spot, for the random test models.

Shared by the model builders (run as scripts with the engine's Python, so they
import this as a sibling module). Nothing is downloaded: the vocabulary is
learnt from a few sentences, which is enough for random-weight models whose
output is noise anyway.
"""

from __future__ import annotations

from typing import Any

CORPUS = [
    "The gateway authenticates every caller before the engine sees a byte.",
    "Audit records are written to SQL and chained so that edits are detected.",
    "Hello, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "Banks, hospitals and public agencies run models on their own machines.",
]
# <think> and </think> let vLLM's reasoning parser (deepseek_r1) run on these models.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def chat_template(media: dict[str, str] | None = None) -> str:
    """ChatML, with thinking mode as Qwen3 and GLM templates do it (the answer opens with <think>).

    `media` maps a content part type (e.g. "input_audio") to the text that
    stands for it in the prompt (e.g. the model's audio placeholder tokens).
    """
    parts = "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    for kind, text in (media or {}).items():
        parts += "{% if part['type'] == '" + kind + "' %}{{ '" + text + "' }}{% endif %}"
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}" + parts + "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% if enable_thinking %}{{ '<think>\n' }}{% endif %}{% endif %}"
    )


def train_tokenizer(extra_specials: list[str] = (), template: str | None = None) -> Any:
    """A PreTrainedTokenizerFast with ~512 tokens, ChatML specials and `extra_specials`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS + list(extra_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # noqa: S106 (a token, not a password)
        pad_token="<|endoftext|>",  # noqa: S106
        bos_token=None,
    )
    fast.chat_template = template or chat_template()
    return fast
