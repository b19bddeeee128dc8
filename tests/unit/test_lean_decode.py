"""The lean decode step (services/inference/lean_decode.py) against the Hugging Face forward it
stands in for: per-step logits over the same slot cache, with rows joining and leaving, on the
built tiny LM, the users' Llama and Qwen2 test folders, and small random Llama (GQA and not),
Mistral and Qwen2 models; models it does not recognise keep the HF forward."""

from __future__ import annotations

import pytest
import torch

from services.inference.generation import CausalLMRuntime, _Slots

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
LATE = [[40, 41, 42], [43, 44, 45, 46, 47]]
TOLERANCE = 1e-4


def steps(runtime: CausalLMRuntime, n: int = 24, prompts=PROMPTS) -> list[torch.Tensor]:
    """Greedy decode-step logits of `prompts` in one slot batch; with PROMPTS a row leaves at
    step 6, two newcomers join at step 9 (a window that widens left), the first row leaves at
    step 15. One prompt alone has no padding (no mask, GQA inside SDPA, as transformers does)."""
    logits, layers, mask, _ = runtime.prefill_batch(prompts)
    slots = _Slots(torch, 8, runtime.max_context)
    slots.join(layers, mask)
    tokens, out = logits.argmax(-1).tolist(), []
    for step in range(n):
        logits = runtime.decode_slots(tokens, slots)
        out.append(logits)
        tokens = logits.argmax(-1).tolist()
        if prompts is not PROMPTS:
            continue
        if step in (6, 15):
            row = 1 if step == 6 else 0
            slots.remove(row)
            last = tokens.pop()
            if row < len(tokens):
                tokens[row] = last
            slots.trim()
        if step == 9:
            first, late_layers, late_mask, _ = runtime.prefill_batch(LATE)
            slots.join(late_layers, late_mask)
            tokens += first.argmax(-1).tolist()
    return out


def assert_same_steps(folder) -> None:
    hf, lean = CausalLMRuntime(folder, lean=False), CausalLMRuntime(folder, lean=True)
    assert hf.lean is None and lean.lean is not None
    for prompts in (PROMPTS, PROMPTS[:1]):
        for step, (a, b) in enumerate(zip(steps(hf, prompts=prompts), steps(lean, prompts=prompts), strict=True)):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) < TOLERANCE, step
            assert torch.equal(a.argmax(-1), b.argmax(-1)), step


def random_folder(tmp_path, family: str, **overrides):
    import transformers

    torch.manual_seed(0)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    shape = {
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "eos_token_id": 96, "bos_token_id": 1, "pad_token_id": 0,
    }  # fmt: skip
    model = model_class(config_class(**(shape | overrides))).eval()
    with torch.no_grad():  # biases and norms away from their zero / one init, so that they count
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = tmp_path / family
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("llama", {"num_key_value_heads": 4}),  # no GQA
        ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
        ("mistral", {"sliding_window": None}),
        ("qwen2", {}),  # q/k/v biases
    ],
)
def test_lean_steps_equal_the_hf_forward_on_random_models(tmp_path, family, overrides):
    assert_same_steps(random_folder(tmp_path, family, **overrides))


def test_lean_steps_equal_the_hf_forward_on_the_built_tiny_lm(catalog, models_dir):
    from services.common.modelstore import model_dir

    assert_same_steps(model_dir(catalog.get("meshserve/tiny-llama-chat"), models_dir))


@pytest.mark.parametrize("model_id", ["test/llama-chat", "test/qwen2-chat"])
def test_lean_steps_equal_the_hf_forward_on_user_folders(model_id):
    from tests.usermodels.factory import all_builders, built

    assert_same_steps(built(model_id, all_builders()[model_id]))


def test_the_hf_forward_is_unchanged_by_the_fused_weights(tmp_path):
    """Building the lean step turns the HF modules' q/k/v and gate/up weights into views of the
    fused matrices: the HF forward still computes what it did (and the memory is not doubled)."""
    folder = random_folder(tmp_path, "qwen2")
    before = CausalLMRuntime(folder, lean=False)
    after = CausalLMRuntime(folder, lean=True)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        assert torch.equal(before.model(input_ids=ids).logits, after.model(input_ids=ids).logits)
    attn = after.model.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
        ("mistral", {"sliding_window": 16}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
        ("llama", {"hidden_act": "gelu"}),
    ],
)
def test_models_it_does_not_recognise_keep_the_hf_forward(tmp_path, family, overrides):
    runtime = CausalLMRuntime(random_folder(tmp_path, family, **overrides), lean=True)
    assert runtime.lean is None
    assert len(steps(runtime, 4)) == 4


def test_the_setting_turns_it_off(tmp_path, monkeypatch):
    folder = random_folder(tmp_path, "llama")
    monkeypatch.setenv("MESHSERVE_INFERENCE_LEAN_DECODE", "false")
    assert CausalLMRuntime(folder).lean is None
    monkeypatch.setenv("MESHSERVE_INFERENCE_LEAN_DECODE", "true")
    assert CausalLMRuntime(folder).lean is not None


def test_the_cpu_products_go_through_onednn_only_where_it_agrees_with_mkl(tmp_path):
    from services.inference.lean_decode import _onednn_linear

    runtime = CausalLMRuntime(random_folder(tmp_path, "llama"), lean=True)
    if torch.backends.mkldnn.is_available():
        assert runtime.lean.linear is not torch.nn.functional.linear
    weight = torch.randn(48, 64)
    x = torch.randn(5, 64)
    linear = _onednn_linear(torch, weight) or torch.nn.functional.linear
    with torch.inference_mode():
        assert torch.allclose(linear(x, weight), torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert _onednn_linear(torch, weight.double()) is None  # float32 only; the rest keeps F.linear
