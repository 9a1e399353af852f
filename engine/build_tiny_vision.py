"""Build a tiny random vision-language model (LLaVA architecture, ~2 MB).

    ENGINE_PYTHON engine/build_tiny_vision.py OUT_DIR

A CLIP vision tower (2 layers, 64 wide, 112-pixel input in 14-pixel patches)
and a projector in front of a tiny Llama text model. The chat template puts
`<image>` where an image part stands; the LLaVA processor expands it to one
token per patch (65 with the class token).

vLLM's LLaVA module imports transformers' Pixtral image processor, which needs
torchvision; PyPI has only CUDA builds of torchvision, so this model serves on
the GPU machine (bench/gpu/), not on vLLM CPU. Random weights: the text is noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tiny_tokenizer import chat_template, train_tokenizer

IMAGE = "<image>"
# vLLM hands the template an image part as "image" (its own content format) or
# under the OpenAI name; both mean the same here.
IMAGE_PARTS = {"image": IMAGE, "image_url": IMAGE}


def build(out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(0)
    template = chat_template(IMAGE_PARTS)
    tokenizer = train_tokenizer([IMAGE], template)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
                       "projection_dim": 64},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 128,
                     "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "max_position_embeddings": 4096, "tie_word_embeddings": True,
                     "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")},
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=IMAGE,
        num_additional_image_tokens=1,
        chat_template=template,
    )
    processor.save_pretrained(out)
    # transformers 5 saves the CLIP tower without its "vision_model." level;
    # vLLM's loader wants "vision_tower.vision_model.*".
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    fixed = {
        (k.replace("vision_tower.", "vision_tower.vision_model.", 1)
         if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
        for k, v in tensors.items()
    }  # fmt: skip
    save_file(fixed, weights, metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_tiny_vision.py OUT_DIR")
    build(Path(sys.argv[1]))
