"""The tinylm builder's pieces with a tiny model and corpus: the saved folder is a Hugging Face
causal LM whose tokenizer renders the chat template and whose generation stops at <|end|>."""

from __future__ import annotations

import json

import pytest

from services.models import builders
from services.models.builders import tinylm

pytest.importorskip("transformers")

TINY = tinylm.Spec(
    vocab_size=320,
    hidden_size=32,
    layers=1,
    heads=2,
    kv_heads=1,
    intermediate_size=64,
    max_positions=64,
    seq_len=32,
    batch=4,
    steps=4,
    warmup=2,
    sample_tokens=6,
)

DOCS = [
    "Return the sum of a sequence of numbers, starting from zero.",
    "Open a file and return a stream. Raise an error when the file cannot be opened.",
    "A queue of items waiting to be processed, first in, first out.",
    "Split the string at every separator and return a list of the parts.",
] * 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinylm") / "model"
    dialogues = [tinylm._dialogue(f"demo.f{i}", i % 3 == 0, doc, i) for i, doc in enumerate(DOCS)]
    text = tinylm.Corpus(documents=DOCS, dialogues=dialogues, modules=["demo"])
    metrics = tinylm.make(out, TINY, text)
    return out, metrics


def test_registered():
    assert "tinylm" in builders.BUILDERS
    assert builders.get("tinylm") is tinylm


def test_folder_is_hugging_face_format(folder):
    out, metrics = folder
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "loss.png",
        "losses.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "losses.json").read_text())) == TINY.steps == metrics["steps"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == TINY.max_positions
    assert config["num_key_value_heads"] == TINY.kv_heads
    assert "{{ bos_token }}" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert metrics["special_token_ids"] == {t: i for i, t in enumerate(tinylm.SPECIAL_TOKENS)}
    assert metrics["parameters"] > 0 and metrics["final_loss"] > 0
    assert len(metrics["samples"]) == len(tinylm.PROMPTS)


def test_chat_template_renders_the_trained_format(folder):
    from transformers import AutoTokenizer

    out, _ = folder
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does demo.f1 do?"},
        {"role": "assistant", "content": "It opens a file."},
        {"role": "user", "content": "And demo.f2?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s><|system|>Answer briefly.<|end|><|user|>What does demo.f1 do?<|end|>"
        "<|assistant|>It opens a file.<|end|><|user|>And demo.f2?<|end|><|assistant|>"
    )
    assert text == tinylm.render_chat(messages, add_generation_prompt=True)
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    special = {tokenizer.convert_tokens_to_ids(t) for t in tinylm.SPECIAL_TOKENS}
    assert ids[0] == tokenizer.convert_tokens_to_ids("<s>")
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids if i in special] == [
        "<s>", "<|system|>", "<|end|>", "<|user|>", "<|end|>", "<|assistant|>", "<|end|>", "<|user|>", "<|end|>", "<|assistant|>",
    ]  # fmt: skip
    # Byte-level BPE round-trips any text, and plain encoding prepends <s>.
    assert tokenizer.decode(tokenizer("naïve café → 𝜋")["input_ids"], skip_special_tokens=True) == "naïve café → 𝜋"
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id


def test_generation_stops_at_end(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = folder
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert set(model.generation_config.eos_token_id) == {end, tokenizer.convert_tokens_to_ids("</s>")}
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt = ids["input_ids"].shape[1]
    vocab = list(range(len(tokenizer)))

    def allowed(_batch, sequence):  # free for two tokens, then only <|end|>
        return [end] if len(sequence) >= prompt + 2 else [t for t in vocab if t != end]

    with torch.inference_mode():
        generated = model.generate(**ids, max_new_tokens=20, do_sample=False, prefix_allowed_tokens_fn=allowed)
    new = generated[0, prompt:].tolist()
    assert new[-1] == end and len(new) == 3  # stopped at <|end|> by the saved generation config
    with torch.inference_mode():
        free = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert 0 < free.shape[1] - prompt <= 5


def test_training_is_deterministic():
    text = tinylm.Corpus(documents=DOCS, dialogues=[], modules=["demo"])
    spec = tinylm.Spec(**{**TINY.__dict__, "chat_fraction": 0.0, "steps": 3})
    runs = []
    for _ in range(2):
        tokenizer = tinylm.train_tokenizer(DOCS, spec.vocab_size)
        stream, share = tinylm.token_stream(text, tokenizer, spec)
        assert share == 0
        _, losses, _ = tinylm.train(spec, tokenizer, stream)
        runs.append((tokenizer.to_str(), stream, losses))
    assert runs[0] == runs[1]


def test_corpus_and_inputs_are_deterministic():
    first, second = tinylm.corpus(), tinylm.corpus()
    assert first.documents == second.documents and first.modules == second.modules
    tops = [m for m in first.modules if "." not in m]
    assert tops == sorted(tops, key=tinylm.MODULES.index)
    assert "json" in first.modules and not any(
        m.split(".")[0] in {"this", "antigravity", "tkinter"} for m in first.modules
    )
    assert not any("test" in m.split(".") for m in first.modules)
    assert len(first.documents) > 1000 and first.characters > 500_000
    assert tinylm.inputs() == tinylm.inputs() and tinylm.inputs()[0].name == "tinylm.py"
