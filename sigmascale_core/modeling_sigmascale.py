"""A SigmaScale-compressed causal LM as plain transformers code: LowRankLinear, the latent KV cache and
one SigmaScale<Family>ForCausalLM per supported family.

This file imports only torch and transformers: save_compressed copies it into every saved folder and
names it in the config's auto_map, so AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
loads the compressed model where sigmascale_core is not installed. The config carries the plan as
`sigmascale_ranks` ({module name: rank}); the class builds the base architecture and swaps those linears
for LowRankLinear shells before the weights load.

Latent KV cache (`config.sigmascale_latent_kv`, default off): when k_proj and v_proj of a layer are both
low rank r below their output width, that layer caches the rank-r latents x·Rᵀ instead of K and V. K is
rebuilt from them at every step (latent·Lᵀ + bias), then normed (Qwen3) and rotated with the position each
cached token had, so the cache keeps those positions beside the latents. V is never rebuilt: attention
weights the V latents and v_proj's left factor is applied to that weighted sum, per head.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half


class LowRankLinear(nn.Module):
    """y = left(right(x)) + bias: an nn.Linear(in, out) replaced by rank-k factors (two thin matmuls)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.right = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # (k, n)
        self.left = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # (m, k)

    @classmethod
    def from_weights(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """The module holding W ≈ left (m, k) @ right (k, n), plus `bias` (m,) if given."""
        (m, k), n = left.shape, right.shape[1]
        if right.shape[0] != k:
            raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} do not chain")
        module = cls(n, m, k, bias=bias is not None, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            module.left.weight.copy_(left)
            module.right.weight.copy_(right)
            if bias is not None:
                module.left.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_with_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap each named nn.Linear for an uninitialised LowRankLinear of its rank (same device, dtype, bias),
    for weights to be loaded into."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        shell = LowRankLinear(
            old.in_features,
            old.out_features,
            int(rank),
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, shell)


class LatentKVLayer(DynamicLayer):
    """One attention layer's cache of latents: keys (B, 1, T, r_k) = x·R_kᵀ, values (B, 1, T, r_v) = x·R_vᵀ,
    and positions (B, T), the RoPE position of every cached token. Grows, crops and reorders like
    DynamicLayer, keeping the three aligned."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions=None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            raise ValueError("a latent KV layer needs the positions of the tokens it caches")
        first = not self.is_initialized
        keys, values = super().update(key_states, value_states)
        self.positions = positions if first else torch.cat([self.positions, positions], dim=-1)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized:
            self.positions = self.positions[:, : self.keys.shape[-2]]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.get_seq_length() > 0:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.get_seq_length() > 0:
            self.positions = self.positions[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.get_seq_length() > 0:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))


def _latent_layer(cache: Cache, layer_idx: int) -> LatentKVLayer:
    """This layer's LatentKVLayer in `cache`, put in place of the empty DynamicLayer transformers made."""
    if cache.layer_class_to_replicate is not None:
        while len(cache.layers) <= layer_idx:
            cache.layers.append(cache.layer_class_to_replicate())
    layer = cache.layers[layer_idx]
    if type(layer) is DynamicLayer and not layer.is_initialized:
        layer = cache.layers[layer_idx] = LatentKVLayer()
    if not isinstance(layer, LatentKVLayer):
        raise ValueError(
            f"the latent KV cache needs a DynamicCache of full-attention layers; layer {layer_idx} of this "
            f"{type(cache).__name__} is a {type(layer).__name__} (a static, sliding or quantised cache?)"
        )
    return layer


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, d) rotated by cos, sin (B, T, d), as transformers' apply_rotary_pos_emb."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def latent_kv_attention(
    attn: nn.Module,
    decoder: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Cache | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward of a Llama/Mistral/Qwen2/Qwen3 attention `attn` whose cache holds the K/V latents.

    Same result as the family's own forward: Q as there; K rebuilt from all cached latents, then
    normed (Qwen3's k_norm) and rotated by `decoder.rotary_emb` (the family's *Model, looked up at each call
    as loading may rebuild it) at the cached positions; V applied in latent space (below).
    """
    batch, length = hidden_states.shape[:2]
    head_dim = attn.head_dim
    query = attn.q_proj(hidden_states).view(batch, length, -1, head_dim)
    if hasattr(attn, "q_norm"):
        query = attn.q_norm(query)
    cos, sin = position_embeddings
    query = _rope(query.transpose(1, 2), cos, sin)  # (B, H, T, d)

    latent_k = attn.k_proj.right(hidden_states).unsqueeze(1)  # (B, 1, T, r_k)
    latent_v = attn.v_proj.right(hidden_states).unsqueeze(1)  # (B, 1, T, r_v)
    if position_ids is None:
        position_ids = torch.arange(length, device=hidden_states.device).unsqueeze(0)
    positions = position_ids.expand(batch, length)  # (B, T)
    if cache is not None:
        layer = _latent_layer(cache, attn.layer_idx)
        latent_k, latent_v = cache.update(latent_k, latent_v, attn.layer_idx, positions=positions)
        positions = layer.positions  # (B, T_all)
    total = latent_k.shape[-2]

    key = attn.k_proj.left(latent_k.squeeze(1)).view(batch, total, -1, head_dim)
    if hasattr(attn, "k_norm"):
        key = attn.k_norm(key)
    key_cos, key_sin = decoder.rotary_emb(key, positions)
    key = _rope(key.transpose(1, 2), key_cos, key_sin)  # (B, KV, T_all, d)
    # V stays latent: each head's softmax row sums to 1, so softmax(QKᵀ)·(Z·Lᵀ + b) = (softmax(QKᵀ)·Z)·Lᵀ + b,
    # with L the head's rows of v_proj.left (H·T·r multiply-adds per step instead of T·r·width)
    kv_heads = key.shape[1]
    value = latent_v.expand(batch, kv_heads, total, latent_v.shape[-1])  # (B, KV, T_all, r_v), no copy

    implementation = attn.config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"the latent KV cache runs with eager or sdpa attention, not {implementation!r}")
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    output, weights = attention(
        attn,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        position_ids=position_ids,
        **kwargs,
    )  # (B, T, H, r_v)
    groups = attn.num_key_value_groups  # query head h reads K/V head h // groups
    left = attn.v_proj.left.weight.view(kv_heads, head_dim, -1).repeat_interleave(
        groups, dim=0
    )  # (H, d, r_v)
    output = torch.einsum("bthr,hdr->bthd", output, left)
    if attn.v_proj.left.bias is not None:
        output = output + attn.v_proj.left.bias.view(kv_heads, head_dim).repeat_interleave(groups, dim=0)
    return attn.o_proj(output.reshape(batch, length, -1)), weights


def latent_kv_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose k_proj and v_proj are both low rank below their width."""
    return [
        i
        for i, layer in enumerate(model.model.layers)
        if all(
            isinstance(proj, LowRankLinear) and proj.rank < proj.out_features
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj)
        )
    ]


def enable_latent_kv(model: nn.Module) -> list[int]:
    """Make every eligible layer cache K/V latents (see latent_kv_layers); returns those layers.
    Refused for sliding-window attention, whose cache drops old tokens on its own terms."""
    layer_types, _ = get_layer_types_and_kwargs(model.config)  # what DynamicCache(config) builds
    layers = latent_kv_layers(model)
    if any(layer_types[i] != "full_attention" for i in layers):
        raise ValueError(
            "the latent KV cache does not support sliding-window attention (config.sliding_window)"
        )
    for i in layers:
        attn = model.model.layers[i].self_attn
        attn.forward = functools.partial(latent_kv_attention, attn, model.model)
    return layers


class SigmaScaleMixin:
    """Builds the base family's model, then swaps in LowRankLinear shells per config.sigmascale_ranks
    (and the latent KV cache if config.sigmascale_latent_kv), before from_pretrained loads the weights."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        replace_with_low_rank(self, getattr(config, "sigmascale_ranks", None) or {})
        if getattr(config, "sigmascale_latent_kv", False):
            enable_latent_kv(self)


class SigmaScaleLlamaForCausalLM(SigmaScaleMixin, LlamaForCausalLM):
    pass


class SigmaScaleMistralForCausalLM(SigmaScaleMixin, MistralForCausalLM):
    pass


class SigmaScaleQwen2ForCausalLM(SigmaScaleMixin, Qwen2ForCausalLM):
    pass


class SigmaScaleQwen3ForCausalLM(SigmaScaleMixin, Qwen3ForCausalLM):
    pass


# config.model_type -> the class save_compressed names in the config's auto_map
CLASS_OF_MODEL_TYPE: dict[str, str] = {
    "llama": SigmaScaleLlamaForCausalLM.__name__,
    "mistral": SigmaScaleMistralForCausalLM.__name__,
    "qwen2": SigmaScaleQwen2ForCausalLM.__name__,
    "qwen3": SigmaScaleQwen3ForCausalLM.__name__,
}
