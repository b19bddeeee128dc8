"""A lean decode step for Llama-family causal LMs (Llama, Mistral, Qwen2): the same arithmetic as
the Hugging Face forward over the scheduler's KV slots (`generation._Slots`), without the per-layer
module dispatch, the mask builder or a `Cache` object.

Built once from the loaded HF model's own weights: q/k/v as one matrix and gate/up as one (the HF
modules' weights become views into them, so memory does not double), rotary cos/sin from the
model's own rotary module in a table indexed by each row's position, SDPA over the slot buffers
with GQA heads packed as transformers' `sdpa_attention_forward` packs them for one query token.
The decoder layers' weights are taken at build time (an in-place change to them shows, as the HF
modules' weights are views of the fused ones; a replaced Parameter does not); the LM head's weight
and bias are read from the module at each step.
On the CPU its matrix products go through oneDNN (`_onednn_linear`) rather than MKL's sgemm.
`LeanDecoder.build` returns None for a model it does not recognise (another architecture, a
sliding window, a rope type that depends on the sequence length, eager attention): those keep the
HF forward. Tested against the HF forward step by step (tests/unit/test_lean_decode.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

# model_type -> the HF class whose decoder layers have the Llama shape (RMSNorm, attention with
# rotary, SiLU-gated MLP); Qwen2 adds q/k/v biases, which the fused projection carries.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Rope types whose cos/sin depend only on the position (not on the sequence length).
STATIC_ROPE = ("default", "linear", "llama3")


@dataclass
class _Layer:
    norm_in: object  # RMSNorm weight
    norm_post: object
    qkv: object  # [(heads + 2 kv heads) * dim, hidden]
    qkv_bias: object  # or None
    o: object
    o_bias: object
    gate_up: object  # [2 * intermediate, hidden]
    gate_up_bias: object
    down: object
    down_bias: object


def _unsupported(model) -> str | None:
    """Why the lean step cannot stand in for this model's forward, or None when it can."""
    config = model.config
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or type(model).__name__ != family:
        return f"architecture {type(model).__name__}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention {getattr(config, '_attn_implementation', None)}"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope}"
    layers = model.model.layers
    if any(getattr(layer.self_attn, "sliding_window", None) is not None for layer in layers):
        return "sliding-window attention"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    return None


def _onednn_linear(torch, weight):
    """oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU fusion
    calls) for float32 weights on a CPU whose torch has it, else None. On this AMD EPYC, MKL's
    sgemm for few rows and wide weights (fused gate/up of the 107M model at 8 rows) was 25-35 %
    slower; the results differ from MKL's in the last bits only (a probe checks them here)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return None

    def linear(x, w, b=None):
        return op(x, w, b, "none", [], "")

    try:
        with torch.inference_mode():
            x = torch.randn(3, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
            if torch.allclose(linear(x, weight), torch.nn.functional.linear(x, weight), rtol=1e-4, atol=1e-4):
                return linear
    except RuntimeError:
        pass
    return None


def _fuse(torch, modules):
    """One weight (and bias, or None) for several Linear modules, whose own weights become views
    into it (the HF forward keeps working on the same memory)."""
    weight = torch.cat([m.weight.detach() for m in modules], dim=0).contiguous()
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else weight.new_zeros(m.weight.shape[0]) for m, b in zip(modules, biases, strict=True)]
    )  # fmt: skip
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


class LeanDecoder:
    """One decode step of a Llama-family model over `_Slots` (see the module docstring)."""

    def __init__(self, torch, model) -> None:
        self.torch, self.F = torch, torch.nn.functional
        config, inner = model.config, model.model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.rep = self.heads // self.kv_heads
        self.scale = self.head_dim**-0.5
        self.eps = float(inner.norm.variance_epsilon)
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head  # the module: its weight and bias are read at each step
        self.rotary = inner.rotary_emb
        self.max_positions = int(getattr(config, "max_position_embeddings", 2048))
        self.cos = self.sin = None
        self.layers = [self._layer(layer) for layer in inner.layers]
        self.linear = _onednn_linear(torch, self.layers[0].qkv) or self.F.linear

    @classmethod
    def build(cls, model) -> LeanDecoder | None:
        import torch

        reason = _unsupported(model)
        if reason is not None:
            log.info("lean decode off for this model: %s", reason)
            return None
        with torch.no_grad():
            return cls(torch, model)

    def _layer(self, layer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if float(norm.variance_epsilon) != self.eps:
                raise ValueError("per-layer RMSNorm eps differs")
        qkv, qkv_bias = _fuse(self.torch, [attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up, gate_up_bias = _fuse(self.torch, [mlp.gate_proj, mlp.up_proj])
        return _Layer(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, qkv, qkv_bias,
            attn.o_proj.weight, attn.o_proj.bias, gate_up, gate_up_bias, mlp.down_proj.weight, mlp.down_proj.bias,
        )  # fmt: skip

    def _rope(self, need: int):
        """cos and sin tables [positions, dim] covering `need` positions (grown by doubling), from
        the model's rotary module itself; sin carries rotate_half's sign (x * -s == -x * s exactly)."""
        if self.cos is None or self.cos.shape[0] < need:
            torch = self.torch
            size = max(need, 64, 0 if self.cos is None else 2 * self.cos.shape[0])
            size = min(size, max(need, self.max_positions))
            positions = torch.arange(size, device=self.embed.device).unsqueeze(0)
            cos, sin = self.rotary(self.embed[:1].unsqueeze(0), positions)
            half = self.head_dim // 2
            sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
            self.cos, self.sin = cos[0].contiguous(), sin.contiguous()
        return self.cos, self.sin

    def _norm(self, x, weight):
        """HF's LlamaRMSNorm in float32 (the fused op; for other dtypes the HF formula)."""
        if x.dtype == self.torch.float32:
            return self.F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return weight * (x.float() * self.torch.rsqrt(variance + self.eps)).to(x.dtype)

    def decode(self, tokens: list[int], mask, positions, slots):
        """Logits [n, vocab] (float32) of one step for the n running rows; the step's keys and
        values go into column `slots.hi` of the slot buffers. `mask` [n, width + 1] and `positions`
        [n] are `_Slots.step_inputs()`'s."""
        torch, F = self.torch, self.F
        n, lo, hi = slots.n, slots.lo, slots.hi
        cos, sin = self._rope(hi - lo + 1)  # a row's position is below its window's width + 1
        with torch.inference_mode():
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [n, 1, dim]
            attn_mask, gqa = self._attention_mask(mask)
            h = F.embedding(torch.tensor(tokens, device=self.embed.device), self.embed)
            for layer, keys, values in zip(self.layers, slots.keys, slots.values, strict=True):
                h = self._block(h, layer, cos, sin, keys[:n], values[:n], lo, hi, attn_mask, gqa)
            h = self._norm(h, self.norm)
            return self.linear(h, self.lm_head.weight, self.lm_head.bias).float()

    def _attention_mask(self, mask):
        """(SDPA's mask, whether to use enable_gqa): as transformers decides for one query token,
        no mask at all when no row has padding, else a boolean [n, 1, 1, width]."""
        if bool(mask.all()):
            return None, self.rep > 1 and self.head_dim <= 256
        return mask.bool()[:, None, None, :], False

    def _block(self, h, layer: _Layer, cos, sin, keys, values, lo: int, hi: int, attn_mask, gqa: bool):
        """One decoder layer for one token per row: h [n, hidden] -> [n, hidden]."""
        torch, F, linear = self.torch, self.F, self.linear
        n, heads, kv, dim = h.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = linear(self._norm(h, layer.norm_in), layer.qkv, layer.qkv_bias)
        qk = qkv[:, : (heads + kv) * dim].view(n, heads + kv, dim)
        qk = qk * cos + torch.roll(qk, dim // 2, dims=-1) * sin  # rotate_half's sign is in sin
        keys[:, :, hi] = qk[:, heads:]
        values[:, :, hi] = qkv[:, (heads + kv) * dim :].view(n, kv, dim)
        if gqa or self.rep == 1:
            query = qk[:, :heads].unsqueeze(2)  # [n, heads, 1, dim]
        else:  # transformers' pack_gqa: the query heads of one kv head attend as its rows
            query = qk[:, :heads].reshape(n, kv, self.rep, dim)
        out = F.scaled_dot_product_attention(
            query, keys[:, :, lo : hi + 1], values[:, :, lo : hi + 1], attn_mask=attn_mask, scale=self.scale,
            enable_gqa=gqa,
        )  # fmt: skip
        h = h + linear(out.reshape(n, heads * dim), layer.o, layer.o_bias)
        gate, up = linear(self._norm(h, layer.norm_post), layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
        return h + linear(F.silu(gate) * up, layer.down, layer.down_bias)
