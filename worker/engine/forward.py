"""The batched forward over the per-stream cache pool.

This is the only code that runs the model. It executes a plan made elsewhere: for each
item, the stream's slot, the physical indices its new tokens are written to, their
positions, and the positions of every used slot. Linear layers and MLPs run once over
the tokens of all items together; attention runs per item against that item's slot,
so one stream's result never depends on which other streams share the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine.models import LoadedModel


@dataclass
class ForwardItem:
    """One stream's share of a forward."""

    slot: int
    token_ids: list[int]
    write_slots: list[int]
    start_position: int
    key_positions: list[int]
    """Position of each used physical slot ``[0, len)`` once the new tokens are written."""
    all_logits: bool = False
    """Return logits for every new token rather than the last one only."""


class CachePool:
    """Preallocated K and V for ``num_slots`` streams, keys stored before rotation.

    ``keys`` and ``values``: ``[num_layers, num_slots, num_kv_heads, capacity, head_dim]``.
    """

    def __init__(self, loaded: LoadedModel, num_slots: int, capacity: int) -> None:
        spec = loaded.spec
        shape = (spec.num_layers, num_slots, spec.num_kv_heads, capacity, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=loaded.dtype, device=loaded.device)
        self.values = torch.zeros(shape, dtype=loaded.dtype, device=loaded.device)
        self.num_slots = num_slots
        self.capacity = capacity

    @staticmethod
    def bytes_per_slot(loaded: LoadedModel, capacity: int) -> int:
        spec = loaded.spec
        return 2 * spec.num_layers * spec.num_kv_heads * capacity * spec.head_dim * loaded.dtype.itemsize

    def read_slot(self, slot: int, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the used prefix of a slot: K, V ``[num_layers, num_kv_heads, used, head_dim]``."""
        return self.keys[:, slot, :, :used].clone(), self.values[:, slot, :, :used].clone()

    def write_slot(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        used = keys.shape[2]
        self.keys[:, slot, :, :used].copy_(keys)
        self.values[:, slot, :, :used].copy_(values)

    def write_slots(self, slot: int, indices: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write K, V ``[num_layers, num_kv_heads, len(indices), head_dim]`` at physical ``indices``."""
        index = torch.tensor(indices, dtype=torch.long, device=self.keys.device)
        self.keys[:, slot].index_copy_(2, index, keys.to(self.keys.dtype))
        self.values[:, slot].index_copy_(2, index, values.to(self.values.dtype))


class RotaryTable:
    """cos and sin of every in-cache position ``[0, capacity)``, from the model's own rotary module."""

    def __init__(self, loaded: LoadedModel, capacity: int) -> None:
        rotary = loaded.model.model.rotary_emb
        positions = torch.arange(capacity, device=loaded.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32, device=loaded.device)
        cos, sin = rotary(probe, positions)
        self.cos = cos[0].to(loaded.dtype)  # [capacity, head_dim]
        self.sin = sin[0].to(loaded.dtype)
        self.half = self.cos.shape[-1] // 2

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the rotary embedding to ``x`` ``[..., len(positions), head_dim]``."""
        cos = self.cos[positions]
        sin = self.sin[positions]
        half = self.half
        if out is None:
            out = torch.empty_like(x)
        x1, x2 = x[..., :half], x[..., half:]
        out1, out2 = out[..., :half], out[..., half:]
        torch.mul(x1, cos[:, :half], out=out1)
        out1.addcmul_(x2, sin[:, :half], value=-1)
        torch.mul(x2, cos[:, half:], out=out2)
        out2.addcmul_(x1, sin[:, half:])
        return out


class BatchedForward:
    """Runs one forward for many streams' items over a ``CachePool``."""

    def __init__(self, loaded: LoadedModel, pool: CachePool) -> None:
        self.loaded = loaded
        self.pool = pool
        self.spec = loaded.spec
        self.rotary = RotaryTable(loaded, pool.capacity)
        self.decoder = loaded.model.model
        self.layers = list(self.decoder.layers)
        self.lm_head = loaded.model.lm_head
        self.group_size = self.spec.num_heads // self.spec.num_kv_heads
        # Rotated keys of one stream and layer; small enough to stay in the CPU cache.
        self._rotated = torch.empty(
            (self.spec.num_kv_heads, pool.capacity, self.spec.head_dim), dtype=loaded.dtype, device=loaded.device
        )

    @torch.inference_mode()
    def __call__(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Run the items and return float32 logits per item: ``[1 or len(tokens), vocab]``."""
        device = self.loaded.device
        token_ids = torch.tensor([t for item in items for t in item.token_ids], dtype=torch.long, device=device)
        bounds = []
        start = 0
        for item in items:
            bounds.append((start, start + len(item.token_ids)))
            start += len(item.token_ids)
        prepared = [self._prepare(item) for item in items]

        hidden = self.decoder.embed_tokens(token_ids)  # [num_tokens, hidden]
        for layer_index, layer in enumerate(self.layers):
            residual = hidden
            normed = layer.input_layernorm(hidden)
            attention = self._attention(layer_index, layer.self_attn, normed, items, bounds, prepared)
            hidden = residual + attention
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        rows = []
        for item, (first, last) in zip(items, bounds):
            rows.append(hidden[first:last] if item.all_logits else hidden[last - 1:last])
        selected = self.decoder.norm(torch.cat(rows))
        logits = self.lm_head(selected).float()
        outputs, offset = [], 0
        for row in rows:
            outputs.append(logits[offset:offset + row.shape[0]])
            offset += row.shape[0]
        return outputs

    def _prepare(self, item: ForwardItem) -> dict:
        device = self.loaded.device
        num_new = len(item.token_ids)
        key_positions = torch.tensor(item.key_positions, dtype=torch.long, device=device)
        query_positions = torch.arange(item.start_position, item.start_position + num_new, device=device)
        write = item.write_slots
        contiguous = write == list(range(write[0], write[0] + num_new))
        prepared = {
            "key_positions": key_positions,
            "query_positions": query_positions,
            "write_range": (write[0], write[0] + num_new) if contiguous else None,
            "write_index": None if contiguous else torch.tensor(write, dtype=torch.long, device=device),
            "mask": None,
        }
        if num_new > 1:
            # Query i may attend to keys at positions <= its own; repeated for each query head of a group.
            visible = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)  # [num_new, used]
            prepared["mask"] = visible.repeat(self.group_size, 1)  # [group * num_new, used]
        return prepared

    def _project(self, attn, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec = self.spec
        if self.spec.family == "phi3":
            qkv = attn.qkv_proj(normed)
            query_size = spec.num_heads * spec.head_dim
            kv_size = spec.num_kv_heads * spec.head_dim
            q, k, v = qkv.split([query_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
        num_tokens = normed.shape[0]
        q = q.view(num_tokens, spec.num_heads, spec.head_dim)
        k = k.view(num_tokens, spec.num_kv_heads, spec.head_dim)
        v = v.view(num_tokens, spec.num_kv_heads, spec.head_dim)
        if self.spec.family == "qwen3":
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        return q, k, v

    def _attention(self, layer_index, attn, normed, items, bounds, prepared) -> torch.Tensor:
        spec = self.spec
        q, k, v = self._project(attn, normed)
        scale = getattr(attn, "scaling", spec.head_dim ** -0.5)
        outputs = []
        for item, (first, last), prep in zip(items, bounds, prepared):
            num_new = last - first
            slot_keys = self.pool.keys[layer_index, item.slot]  # [kv_heads, capacity, head_dim]
            slot_values = self.pool.values[layer_index, item.slot]
            new_keys = k[first:last].transpose(0, 1)  # [kv_heads, num_new, head_dim]
            new_values = v[first:last].transpose(0, 1)
            if prep["write_range"] is not None:
                lo, hi = prep["write_range"]
                slot_keys[:, lo:hi].copy_(new_keys)
                slot_values[:, lo:hi].copy_(new_values)
            else:
                slot_keys.index_copy_(1, prep["write_index"], new_keys)
                slot_values.index_copy_(1, prep["write_index"], new_values)

            used = len(item.key_positions)
            rotated = self.rotary.rotate(slot_keys[:, :used], prep["key_positions"], out=self._rotated[:, :used])
            query = self.rotary.rotate(q[first:last].transpose(0, 1), prep["query_positions"])  # [heads, new, dim]
            # Grouped-query attention without copying K/V: the query heads that share a KV head
            # become extra query rows of that head.
            query = query.reshape(spec.num_kv_heads, self.group_size * num_new, spec.head_dim)
            out = F.scaled_dot_product_attention(
                query, rotated, slot_values[:, :used], attn_mask=prep["mask"], scale=scale
            )  # [kv_heads, group * num_new, head_dim]
            out = out.reshape(spec.num_heads, num_new, spec.head_dim).transpose(0, 1)
            outputs.append(out.reshape(num_new, spec.num_heads * spec.head_dim))
        return attn.o_proj(torch.cat(outputs))
