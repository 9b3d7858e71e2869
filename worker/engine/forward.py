"""The batched forward over the per-stream cache pool.

This is the only code that runs the model. It executes a plan made elsewhere: for each
item, the stream's slot, the physical indices its new tokens are written to, their
positions, and the positions of every used slot. Linear layers and MLPs run once over
the tokens of all items together. Items that decode one token share one batched
attention matmul over their slots; longer items (prompt chunks) attend one by one.
Each stream's scores and softmax use only its own slot, and tests hold a stream's
logits in a mixed batch to within 1e-5 of its logits alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """Preallocated K and V for ``num_slots`` streams.

    Keys are stored rotated by their physical index (see ``BatchedForward._attention``).

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
        # The unscaled rotation for undoing a shift: yarn-style scaling multiplies cos and sin
        # by a constant, which must be applied once per query, not once per rotation.
        scale = torch.sqrt(cos[0, :1, :1] ** 2 + sin[0, :1, :1] ** 2)
        self.unit_cos = (cos[0] / scale).to(loaded.dtype)
        self.unit_sin = (sin[0] / scale).to(loaded.dtype)
        self.half = self.cos.shape[-1] // 2

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]

    def shift_angles(self, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the unscaled rotation by ``-shift`` positions, ``[1, head_dim]`` each."""
        cos = self.unit_cos[abs(shift)].unsqueeze(0)
        sin = self.unit_sin[abs(shift)].unsqueeze(0)
        return (cos, -sin) if shift > 0 else (cos, sin)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[..., head_dim]`` by angles ``cos``, ``sin`` that broadcast against it."""
        half = self.half
        out = x.new_empty(torch.broadcast_shapes(x.shape, cos.shape))
        x1, x2 = x[..., :half], x[..., half:]
        torch.mul(x1, cos[..., :half], out=out[..., :half])
        out[..., :half].addcmul_(x2, sin[..., :half], value=-1)
        torch.mul(x2, cos[..., half:], out=out[..., half:])
        out[..., half:].addcmul_(x1, sin[..., half:])
        return out


def key_segments(key_positions: list[int]) -> list[tuple[int, int, int]]:
    """Split the used physical slots into runs where ``position - physical index`` is constant.

    Returns ``(start, end, shift)`` triples in physical order. With the sink + ring layout
    there are at most three: the sinks (shift 0), the ring slots before the ring head
    (shift ``window - head``) and the ring slots from the head on (shift ``-head``).
    """
    segments: list[tuple[int, int, int]] = []
    for physical, position in enumerate(key_positions):
        shift = position - physical
        if segments and segments[-1][2] == shift and segments[-1][1] == physical:
            segments[-1] = (segments[-1][0], physical + 1, shift)
        else:
            segments.append((physical, physical + 1, shift))
    return segments


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
        decode = self._prepare_decode(items, bounds, prepared)

        hidden = self.decoder.embed_tokens(token_ids)  # [num_tokens, hidden]
        for layer_index, layer in enumerate(self.layers):
            residual = hidden
            normed = layer.input_layernorm(hidden)
            attention = self._attention(layer_index, layer.self_attn, normed, items, bounds, prepared, decode)
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
        """Compute everything of an item that is the same in every layer."""
        device = self.loaded.device
        num_new = len(item.token_ids)
        write = item.write_slots
        contiguous = write == list(range(write[0], write[0] + num_new))
        write_index = torch.tensor(write, dtype=torch.long, device=device)
        query_positions = torch.arange(item.start_position, item.start_position + num_new, device=device)
        segments = []
        for start, end, shift in key_segments(item.key_positions):
            segments.append((start, end, shift, None if shift == 0 else self.rotary.shift_angles(shift)))
        prepared = {
            "write_range": (write[0], write[0] + num_new) if contiguous else None,
            "write_index": write_index,
            "write_angles": self.rotary.angles(write_index),
            "query_angles": self.rotary.angles(query_positions),
            "segments": segments,
            "mask": None,
        }
        if num_new > 1:
            # Query i may attend to keys at positions <= its own; the rows of one KV head hold
            # its group's query heads one after another, so the mask repeats per head.
            key_positions = torch.tensor(item.key_positions, dtype=torch.long, device=device)
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

    def _prepare_decode(self, items, bounds, prepared) -> dict | None:
        """Plan one batched attention for all items that decode a single token.

        Their slots are read as one range ``[lo, hi)`` of the pool, so the cache is read
        once per layer by one batched matmul. Each stream has up to three runs of slots
        with different shifts (``key_segments``). The query is rotated for each of three
        variants, and every key takes the score of its run's variant.
        """
        decode = [index for index, item in enumerate(items) if len(item.token_ids) == 1]
        if not decode:
            return None
        device = self.loaded.device
        slots = [items[index].slot for index in decode]
        lo, hi = min(slots), max(slots) + 1
        used = max(len(items[index].key_positions) for index in decode)
        variant_index = torch.zeros((hi - lo, used), dtype=torch.long, device=device)
        invalid = torch.ones((hi - lo, used), dtype=torch.bool, device=device)
        identity_cos, identity_sin = self.rotary.shift_angles(0)
        variant_cos = identity_cos.repeat(len(decode), 3, 1)  # [decode, 3, head_dim]
        variant_sin = identity_sin.repeat(len(decode), 3, 1)
        for row, index in enumerate(decode):
            item = items[index]
            local = item.slot - lo
            invalid[local, :len(item.key_positions)] = False
            segments = prepared[index]["segments"]
            assert len(segments) <= 3, f"a slot has {len(segments)} runs of shifts; the layout allows 3"
            for variant, (start, end, shift, _angles) in enumerate(segments):
                variant_index[local, start:end] = variant
                variant_cos[row, variant], variant_sin[row, variant] = self.rotary.shift_angles(shift)
        write_slots = torch.tensor([items[index].write_slots[0] for index in decode], device=device)
        positions = torch.tensor([items[index].start_position for index in decode], device=device)
        write_cos, write_sin = self.rotary.angles(write_slots)
        query_cos, query_sin = self.rotary.angles(positions)
        return {
            "items": set(decode),
            "rows": torch.tensor([bounds[index][0] for index in decode], device=device),
            "slots": torch.tensor(slots, device=device),
            "local": torch.tensor(slots, device=device) - lo,
            "lo": lo,
            "hi": hi,
            "used": used,
            "write_slots": write_slots,
            "write_angles": (write_cos.unsqueeze(1), write_sin.unsqueeze(1)),  # [decode, 1, head_dim]
            "query_angles": (query_cos.unsqueeze(1), query_sin.unsqueeze(1)),
            "variant_angles": (variant_cos.unsqueeze(2), variant_sin.unsqueeze(2)),  # [decode, 3, 1, head_dim]
            "variant_index": variant_index.view(hi - lo, 1, 1, 1, used),
            "invalid": invalid.view(hi - lo, 1, 1, used),
        }

    def _attention(self, layer_index, attn, normed, items, bounds, prepared, decode) -> torch.Tensor:
        spec = self.spec
        q, k, v = self._project(attn, normed)
        scale = getattr(attn, "scaling", spec.head_dim ** -0.5)
        out = torch.empty((normed.shape[0], spec.num_heads * spec.head_dim), dtype=q.dtype, device=q.device)
        for index, (item, (first, last), prep) in enumerate(zip(items, bounds, prepared)):
            if decode is not None and index in decode["items"]:
                continue
            out[first:last] = self._item_attention(layer_index, item, prep, q[first:last], k[first:last],
                                                   v[first:last], scale)
        if decode is not None:
            out[decode["rows"]] = self._decode_attention(layer_index, decode, q, k, v, scale)
        return attn.o_proj(out)

    def _decode_attention(self, layer_index, decode, q, k, v, scale) -> torch.Tensor:
        spec, group = self.spec, self.group_size
        keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]
        rows = decode["rows"]
        # New keys are rotated once, by their physical index, and never rewritten.
        keys[decode["slots"], :, decode["write_slots"]] = self.rotary.rotate(k[rows], *decode["write_angles"])
        values[decode["slots"], :, decode["write_slots"]] = v[rows]

        query = self.rotary.rotate(q[rows], *decode["query_angles"])  # [decode, heads, head_dim]
        variants = self.rotary.rotate(query.unsqueeze(1), *decode["variant_angles"])  # [decode, 3, heads, dim]
        num_decode, lo, hi, used = len(rows), decode["lo"], decode["hi"], decode["used"]
        variants = variants.view(num_decode, 3, spec.num_kv_heads, group, spec.head_dim)
        variants = variants.permute(0, 2, 1, 3, 4).reshape(num_decode, spec.num_kv_heads, 3 * group, spec.head_dim)
        queries = torch.zeros((hi - lo, spec.num_kv_heads, 3 * group, spec.head_dim), dtype=q.dtype, device=q.device)
        queries[decode["local"]] = variants

        # One matmul reads every decoding slot's keys once: [slots, kv_heads, 3 * group, used].
        scores = torch.matmul(queries, keys[lo:hi, :, :used].transpose(-1, -2))
        scores = scores.view(hi - lo, spec.num_kv_heads, 3, group, used)
        index = decode["variant_index"].expand(hi - lo, spec.num_kv_heads, 1, group, used)
        scores = scores.gather(2, index).squeeze(2).float() * scale  # [slots, kv_heads, group, used]
        scores.masked_fill_(decode["invalid"], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(weights, values[lo:hi, :, :used])  # [slots, kv_heads, group, head_dim]
        return out[decode["local"]].reshape(num_decode, spec.num_heads * spec.head_dim)

    def _item_attention(self, layer_index, item, prep, q, k, v, scale) -> torch.Tensor:
        """Attention of one item's new tokens ``q``, ``k``, ``v`` ``[num_new, heads, head_dim]``."""
        spec = self.spec
        num_new = q.shape[0]
        slot_keys = self.pool.keys[layer_index, item.slot]  # [kv_heads, capacity, head_dim]
        slot_values = self.pool.values[layer_index, item.slot]
        new_keys = self.rotary.rotate(k.transpose(0, 1), *prep["write_angles"])
        new_values = v.transpose(0, 1)  # [kv_heads, num_new, head_dim]
        if prep["write_range"] is not None:
            lo, hi = prep["write_range"]
            slot_keys[:, lo:hi].copy_(new_keys)
            slot_values[:, lo:hi].copy_(new_values)
        else:
            slot_keys.index_copy_(1, prep["write_index"], new_keys)
            slot_values.index_copy_(1, prep["write_index"], new_values)

        query = self.rotary.rotate(q.transpose(0, 1), *prep["query_angles"])  # [heads, new, dim]
        # Grouped-query attention without copying K/V: the query heads that share a KV head
        # become extra query rows of that head.
        query = query.reshape(spec.num_kv_heads, self.group_size * num_new, spec.head_dim)
        scores = []
        for start, end, shift, angles in prep["segments"]:
            # A key stored at physical index p sits at position p + shift. Rotating the query
            # back by shift gives the same score as rotating the key forward to its position.
            shifted = query if angles is None else self.rotary.rotate(query, *angles)
            scores.append(torch.matmul(shifted, slot_keys[:, start:end].transpose(1, 2)))
        scores = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)  # [kv_heads, rows, used]
        scores = scores.float() * scale
        if prep["mask"] is not None:
            scores.masked_fill_(~prep["mask"], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(slot_values.dtype)
        used = weights.shape[-1]
        out = torch.matmul(weights, slot_values[:, :used])  # [kv_heads, group * num_new, head_dim]
        out = out.reshape(spec.num_heads, num_new, spec.head_dim).transpose(0, 1)
        return out.reshape(num_new, spec.num_heads * spec.head_dim)
