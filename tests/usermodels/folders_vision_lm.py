"""Users' image classifiers (ViT, ConvNeXt, ResNet, each with its own image processor) and chat
LMs (Llama, Qwen2, with a chat template and a generation_config.json): small, random-initialised."""

from __future__ import annotations

import json
from pathlib import Path

from tests.usermodels.factory import Builder, byte_bpe

# A ChatML template (Qwen2's shape) and a Llama-3-like one: both render the generation prompt.
CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
HEADERS = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]:{% endif %}"
)


def _labels(names: list[str]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def vit(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, **_labels(["cat", "dog", "bird", "fish", "frog", "horse", "ship"]),
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        str(folder)
    )


def convnext(folder: Path) -> None:
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    config = ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **_labels([f"class_{i}" for i in range(6)])
    )
    ConvNextForImageClassification(config).save_pretrained(str(folder))
    # shortest_edge < 384: resize to shortest_edge / crop_pct, then centre-crop (ConvNeXt's recipe).
    ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.8).save_pretrained(str(folder))


def resnet(folder: Path) -> None:
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], problem_type="multi_label_classification",
        **_labels(["indoor", "outdoor", "person", "vehicle", "animal"]),
    )  # fmt: skip
    ResNetForImageClassification(config).save_pretrained(str(folder))
    # microsoft/resnet-50 ships a ConvNextImageProcessor (crop_pct 0.875, shortest_edge 224).
    ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=0.875, resample=3).save_pretrained(str(folder))


def _chat_lm(folder: Path, model, template: str, generation: dict) -> None:
    tokenizer = byte_bpe(folder, encoder=False)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2))
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def llama_chat(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    # Llama-3's generation_config.json shape: sampling on, two end ids (</s> and <unk> here).
    generation = {"bos_token_id": 0, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    _chat_lm(folder, LlamaForCausalLM(config), HEADERS, generation)


def qwen2_chat(folder: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    # Qwen2.5's shape. The repetition penalty applies to greedy decoding too (generate() and here), and
    # with tied embeddings this model repeats its last token without it.
    generation = {
        "eos_token_id": [2], "pad_token_id": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
        "repetition_penalty": 2.0,
    }  # fmt: skip
    _chat_lm(folder, Qwen2ForCausalLM(config), CHATML, generation)


FOLDERS: dict[str, Builder] = {
    "test/vit": vit,
    "test/convnext": convnext,
    "test/resnet": resnet,
    "test/llama-chat": llama_chat,
    "test/qwen2-chat": qwen2_chat,
}
