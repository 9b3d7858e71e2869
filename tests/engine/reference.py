"""A deliberately naive reference of the sink + window cache, for one stream.

It keeps every token's key (before the rotary embedding) and value as computed when the
token was inserted, and for every chunk selects the first ``sink_tokens`` tokens plus the
most recent window tokens, rotates the selected keys to their in-cache positions
``0 .. n-1`` and attends with eager math (explicit matmul and softmax, K/V repeated per
query head). It shares no code with worker/engine.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


class NaiveSinkCache:
    def __init__(self, model, sink_tokens: int, window_tokens: int) -> None:
        self.model = model
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.layers = model.model.layers
        # One entry per token ever inserted: per layer, K [kv_heads, head_dim] (un-rotated) and V.
        self.keys: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.values: list[list[torch.Tensor]] = [[] for _ in self.layers]

    def _retained(self, num_new: int) -> list[int]:
        """Indices of earlier tokens kept when ``num_new`` tokens arrive."""
        total = len(self.keys[0])
        sinks = list(range(min(self.sink_tokens, total)))
        room = self.window_tokens - max(0, num_new - max(0, self.sink_tokens - total))
        recent_start = max(self.sink_tokens, total - max(room, 0))
        return sinks + list(range(recent_start, total))

    def _qkv(self, attn, x):
        config = self.model.config
        if hasattr(attn, "qkv_proj"):
            qkv = attn.qkv_proj(x)
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        n = x.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        del config
        return q, k, v

    @torch.no_grad()
    def feed(self, token_ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Append one chunk and return float32 logits for each of its tokens (or the last one)."""
        num_new = len(token_ids)
        retained = self._retained(num_new)
        num_old = len(retained)
        positions = torch.arange(num_old + num_new).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = self.model.model.rotary_emb(probe, positions)
        dtype = next(self.model.parameters()).dtype
        cos, sin = cos.to(dtype), sin.to(dtype)

        hidden = self.model.model.embed_tokens(torch.tensor(token_ids))
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q, k, v = self._qkv(attn, x)
            self.keys[index].extend(k.unbind(0))
            self.values[index].extend(v.unbind(0))
            chosen = retained + list(range(len(self.keys[index]) - num_new, len(self.keys[index])))
            keys = torch.stack([self.keys[index][i] for i in chosen], dim=1).unsqueeze(0)  # [1, kv, n, d]
            values = torch.stack([self.values[index][i] for i in chosen], dim=1).unsqueeze(0)
            query = q.transpose(0, 1).unsqueeze(0)  # [1, heads, new, d]
            query, _ = apply_rotary_pos_emb(query, query, cos[:, num_old:], sin[:, num_old:])
            _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
            keys = repeat_kv(keys, self.num_heads // self.num_kv_heads)
            values = repeat_kv(values, self.num_heads // self.num_kv_heads)
            scores = query @ keys.transpose(-1, -2) * attn.scaling  # [1, heads, new, n]
            causal = torch.ones(num_new, num_old + num_new, dtype=torch.bool).tril(diagonal=num_old)
            scores = scores.masked_fill(~causal, float("-inf"))
            weights = torch.softmax(scores.float(), dim=-1).to(dtype)
            out = (weights @ values).transpose(1, 2).reshape(num_new, self.num_heads * self.head_dim)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if last_only:
            hidden = hidden[-1:]
        return self.model.lm_head(self.model.model.norm(hidden)).float()
