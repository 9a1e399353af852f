"""Build a tiny random audio-language model (Qwen2-Audio architecture, ~2.3 MB) for tests.

    ENGINE_PYTHON engine/build_tiny_audio.py OUT_DIR

A Whisper-style audio encoder (2 layers, 64 wide) in front of the same tiny
Qwen2 text model as build_tiny.py. The chat template puts the model's audio
placeholder where an audio part stands; vLLM's Qwen2-Audio processor then
expands it to one token per encoder frame, so a longer clip costs more prompt
tokens (which the tests check). Random weights: the text is noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tiny_tokenizer import chat_template, train_tokenizer

AUDIO = "Audio: <|audio_bos|><|AUDIO|><|audio_eos|>"
# vLLM hands the template an audio part as "audio" (its own content format) or,
# depending on the version, under the OpenAI name; both mean the same here.
AUDIO_PARTS = {"audio": AUDIO, "input_audio": AUDIO, "audio_url": AUDIO}


def build(out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    torch.manual_seed(0)
    template = chat_template(AUDIO_PARTS)
    tokenizer = train_tokenizer(["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"], template)
    config = Qwen2AudioConfig(
        audio_config={"num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2,
                      "encoder_ffn_dim": 128, "d_model": 64, "max_source_positions": 1500},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": 128,
                     "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "max_position_embeddings": 4096, "tie_word_embeddings": True,
                     "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )  # fmt: skip
    model = Qwen2AudioForConditionalGeneration(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=tokenizer,
        chat_template=template,
    )
    processor.save_pretrained(out)
    # transformers 5 nests the text model one level deeper than vLLM's loader
    # expects ("language_model.model.model.*" for "language_model.model.*").
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    renamed = {k.replace("language_model.model.model.", "language_model.model."): v for k, v in tensors.items()}
    save_file(renamed, weights, metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_tiny_audio.py OUT_DIR")
    build(Path(sys.argv[1]))
