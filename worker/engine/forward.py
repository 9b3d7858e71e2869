"""The batched forward over the per-stream cache pool.

This is the only code that runs the model. It executes a plan made elsewhere (see
``layout.plan_append``): for each item, the stream's slot, the physical indices and
rotation indices its new tokens are written with, their positions, and the stream's
``rotation_base``. Linear layers and MLPs run once over the tokens of all items
together. Items that decode one token share one batched attention matmul over their
slots; longer items (prompt chunks) attend one by one. Each stream's scores and softmax
use only its own slot, and tests hold a stream's logits in a mixed batch to within 1e-5
of its logits alone.

On CPU the linear weights are fused (q, k and v in one matrix, gate and up in another)
and prepacked for oneDNN once, at start; decode on this path reads the weights about
1.5x faster than ``torch.nn.functional.linear`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine.layout import AppendPlan, max_rotation_base, slot_positions
from worker.engine.models import LoadedModel

logger = logging.getLogger(__name__)

PACK_BATCH_HINT = 32
"""Rows per call that the oneDNN weight layout is tuned for. Other row counts give the same
results, and a 1-to-200-row measurement on this project's CPU showed no slowdown."""


@dataclass
class ForwardItem:
    """One stream's share of a forward."""

    slot: int
    token_ids: list[int]
    write_slots: list[int]
    """Physical index of each new token."""
    write_rotations: list[int]
    """Rotation index of each new token's key (see ``layout``)."""
    start_position: int
    used: int
    """Used physical slots ``[0, used)`` once the new tokens are written."""
    rotation_base: int = 0
    """The stream's ``rotation_base`` once the new tokens are written."""
    rebase_by: int = 0
    """Rotate the stored window keys by ``-rebase_by`` before this forward (0: no rebase)."""
    key_positions: list[int] | None = None
    """Position of each used physical slot; needed only when the item has several tokens."""
    all_logits: bool = False
    """Return logits for every new token rather than the last one only."""

    @classmethod
    def from_plan(cls, slot: int, token_ids: list[int], plan: AppendPlan, all_logits: bool = False) -> ForwardItem:
        """Build the item that writes ``token_ids`` into ``slot`` as ``plan`` specifies."""
        after = plan.after
        return cls(
            slot=slot,
            token_ids=list(token_ids),
            write_slots=list(plan.write_slots),
            write_rotations=list(plan.write_rotations),
            start_position=plan.start_position,
            used=after.used_slots,
            rotation_base=after.rotation_base,
            rebase_by=plan.rebase_by,
            key_positions=slot_positions(after) if len(token_ids) > 1 else None,
            all_logits=all_logits,
        )


class CachePool:
    """Preallocated K and V for ``num_slots`` streams.

    Keys are stored rotated by their rotation index (see ``layout``).

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
    """cos and sin of every rotation index ``[0, capacity + max_rotation_base(window))``.

    The angles come from the model's own rotary module (its ``inv_freq`` and
    ``attention_scaling``), computed in float64 and rounded once to the cache dtype.
    """

    def __init__(self, loaded: LoadedModel, sink_tokens: int, window_tokens: int) -> None:
        rotary = loaded.model.model.rotary_emb
        device = loaded.device
        self.size = sink_tokens + window_tokens + max_rotation_base(window_tokens)
        self.inv_freq = rotary.inv_freq.detach().to(device=device, dtype=torch.float64)
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))
        indices = torch.arange(self.size, device=device, dtype=torch.float64)
        cos, sin = self._unit(indices)
        self.cos = (cos * self.scaling).to(loaded.dtype)  # [size, head_dim]
        self.sin = (sin * self.scaling).to(loaded.dtype)
        self.half = self.cos.shape[-1] // 2

    def _unit(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = indices.unsqueeze(-1) * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def angles(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[indices], self.sin[indices]

    def unit_angles(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the unscaled rotation by ``index`` (may be negative), ``[head_dim]`` each."""
        cos, sin = self._unit(torch.tensor(float(index), device=self.inv_freq.device, dtype=torch.float64))
        return cos.to(dtype), sin.to(dtype)

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


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """Return ``weight`` prepacked for oneDNN, or None where this CPU or dtype has no such path."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        probe = torch.ones((1, weight.shape[1]), dtype=weight.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError) as exc:
        logger.debug("no oneDNN linear for %s weights on this CPU: %s", weight.dtype, exc)
        return None
    return packed


class Linear:
    """One or more of the model's linear layers fused along their outputs, prepacked on CPU."""

    def __init__(self, modules: list[torch.nn.Module], prepack: bool) -> None:
        weights = [module.weight.detach() for module in modules]
        biases = [module.bias for module in modules]
        self.weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.bias = None
        if any(bias is not None for bias in biases):
            self.bias = torch.cat([
                bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])
                for bias, weight in zip(biases, weights)
            ])
        self.packed = _pack(self.weight) if prepack else None
        if self.packed is not None:
            self.weight = None  # the packed copy replaces the fused one

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm:
    """The model's RMSNorm module, as one fused op where the result is the same (float32)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        self.fused = (eps is not None and weight is not None and weight.dtype == torch.float32
                      and type(module).__name__.endswith("RMSNorm"))
        self.eps = eps
        self.shape = tuple(weight.shape) if weight is not None else ()
        self.weight = weight.detach() if weight is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.module(x)


def _activation(module: torch.nn.Module):
    return F.silu if isinstance(module, torch.nn.SiLU) else module


@dataclass
class _LayerWeights:
    input_norm: RMSNorm
    post_norm: RMSNorm
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    act: object
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    scale: float


def _layer_weights(layer: torch.nn.Module, family: str, head_dim: int, prepack: bool) -> _LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    if family == "phi3":
        qkv, gate_up = Linear([attn.qkv_proj], prepack), Linear([mlp.gate_up_proj], prepack)
    else:
        qkv = Linear([attn.q_proj, attn.k_proj, attn.v_proj], prepack)
        gate_up = Linear([mlp.gate_proj, mlp.up_proj], prepack)
    return _LayerWeights(
        input_norm=RMSNorm(layer.input_layernorm),
        post_norm=RMSNorm(layer.post_attention_layernorm),
        qkv=qkv,
        o=Linear([attn.o_proj], prepack),
        gate_up=gate_up,
        down=Linear([mlp.down_proj], prepack),
        act=_activation(mlp.activation_fn if family == "phi3" else mlp.act_fn),
        q_norm=RMSNorm(attn.q_norm) if family == "qwen3" else None,
        k_norm=RMSNorm(attn.k_norm) if family == "qwen3" else None,
        scale=getattr(attn, "scaling", head_dim ** -0.5),
    )


class BatchedForward:
    """Runs one forward for many streams' items over a ``CachePool``."""

    def __init__(self, loaded: LoadedModel, pool: CachePool, sink_tokens: int, window_tokens: int,
                 prepack: bool = True) -> None:
        self.loaded = loaded
        self.pool = pool
        self.spec = loaded.spec
        self.sink_tokens = sink_tokens
        self.rotary = RotaryTable(loaded, sink_tokens, window_tokens)
        self.decoder = loaded.model.model
        self.final_norm = RMSNorm(self.decoder.norm)
        with torch.inference_mode():
            self.layers = [_layer_weights(layer, self.spec.family, self.spec.head_dim, prepack)
                           for layer in self.decoder.layers]
            self.lm_head = Linear([loaded.model.lm_head], prepack)
        self.prepacked = self.lm_head.packed is not None
        scales = {weights.scale for weights in self.layers}
        # Decode folds the attention scale into the query rotation where that rounds nothing away.
        self.query_scale = scales.pop() if len(scales) == 1 and loaded.dtype == torch.float32 else 1.0
        self.group_size = self.spec.num_heads // self.spec.num_kv_heads

    @torch.inference_mode()
    def __call__(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Run the items and return float32 logits per item: ``[1 or len(tokens), vocab]``."""
        device = self.loaded.device
        for item in items:
            if item.rebase_by:
                self.rebase(item.slot, item.rebase_by)
        token_ids = torch.tensor([t for item in items for t in item.token_ids], dtype=torch.long, device=device)
        bounds = []
        start = 0
        for item in items:
            bounds.append((start, start + len(item.token_ids)))
            start += len(item.token_ids)
        decode = self._prepare_decode(items, bounds)
        prepared = [None if decode is not None and index in decode["items"] else self._prepare(item)
                    for index, item in enumerate(items)]

        hidden = self.decoder.embed_tokens(token_ids)  # [num_tokens, hidden]
        for layer_index, weights in enumerate(self.layers):
            attention = self._attention(layer_index, weights, weights.input_norm(hidden), items, bounds,
                                        prepared, decode)
            hidden = hidden + attention
            gate_up = weights.gate_up(weights.post_norm(hidden))
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = hidden + weights.down(weights.act(gate).mul_(up))

        if all(not item.all_logits and last - first == 1 for item, (first, last) in zip(items, bounds)):
            selected, rows = hidden, [1] * len(items)
        else:
            pieces = [hidden[first:last] if item.all_logits else hidden[last - 1:last]
                      for item, (first, last) in zip(items, bounds)]
            selected, rows = torch.cat(pieces), [piece.shape[0] for piece in pieces]
        logits = self.lm_head(self.final_norm(selected)).float()
        return list(logits.split(rows))

    def rebase(self, slot: int, rebase_by: int) -> None:
        """Rotate a slot's stored window keys by ``-rebase_by`` (see ``layout``)."""
        start = self.sink_tokens
        keys = self.pool.keys[:, slot, :, start:]  # [layers, kv_heads, window, head_dim]
        cos, sin = self.rotary.unit_angles(-rebase_by, torch.float32)
        keys.copy_(self.rotary.rotate(keys.float(), cos, sin))

    def _prepare(self, item: ForwardItem) -> dict:
        """Compute everything of a multi-token item that is the same in every layer."""
        device = self.loaded.device
        num_new = len(item.token_ids)
        write = item.write_slots
        contiguous = write == list(range(write[0], write[0] + num_new))
        query_positions = torch.arange(item.start_position, item.start_position + num_new, device=device)
        sink_end = min(self.sink_tokens, item.used)
        segments = [(0, sink_end, 0)] if sink_end > 0 else []
        if item.used > self.sink_tokens:
            if item.rotation_base == 0 and segments:
                segments = [(0, item.used, 0)]
            else:
                segments.append((self.sink_tokens, item.used, item.rotation_base))
        prepared = {
            "write_range": (write[0], write[0] + num_new) if contiguous else None,
            "write_index": torch.tensor(write, dtype=torch.long, device=device),
            "write_angles": self.rotary.angles(torch.tensor(item.write_rotations, dtype=torch.long, device=device)),
            "segments": [(start, end, self.rotary.angles(query_positions + base)) for start, end, base in segments],
            "mask": None,
        }
        if num_new > 1:
            # Query i may attend to keys at positions <= its own; the rows of one KV head hold
            # its group's query heads one after another, so the mask repeats per head.
            key_positions = torch.tensor(item.key_positions, dtype=torch.long, device=device)
            visible = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)  # [num_new, used]
            prepared["mask"] = visible.repeat(self.group_size, 1)  # [group * num_new, used]
        return prepared

    def _project(self, weights: _LayerWeights, normed: torch.Tensor):
        spec = self.spec
        qkv = weights.qkv(normed)
        query_size = spec.num_heads * spec.head_dim
        kv_size = spec.num_kv_heads * spec.head_dim
        q, k, v = qkv.split([query_size, kv_size, kv_size], dim=-1)
        num_tokens = normed.shape[0]
        q = q.view(num_tokens, spec.num_heads, spec.head_dim)
        k = k.view(num_tokens, spec.num_kv_heads, spec.head_dim)
        v = v.view(num_tokens, spec.num_kv_heads, spec.head_dim)
        if weights.q_norm is not None:
            q = weights.q_norm(q)
            k = weights.k_norm(k)
        return q, k, v

    def _prepare_decode(self, items, bounds) -> dict | None:
        """Plan one batched attention for all items that decode a single token.

        Their slots are read as one range ``[lo, hi)`` of the pool, so the cache is read
        once per layer by one batched matmul. The query of each stream is rotated by its
        position plus the stream's ``rotation_base`` for the window keys. The sink columns
        are then scored again with the query rotated by its position alone.
        """
        decode = [index for index, item in enumerate(items) if len(item.token_ids) == 1]
        if not decode:
            return None
        device = self.loaded.device
        spec = self.spec
        slots = [items[index].slot for index in decode]
        rows = [bounds[index][0] for index in decode]
        used = [items[index].used for index in decode]
        lo, hi = min(slots), max(slots) + 1
        max_used = max(used)
        # Every slot in [lo, hi) decodes, in slot order, with the same fill: no scatter, no mask.
        dense = slots == list(range(lo, hi)) and min(used) == max_used
        invalid = None
        if not dense:
            invalid = torch.ones((hi - lo, max_used), dtype=torch.bool)
            for slot, count in zip(slots, used):
                invalid[slot - lo, :count] = False
            invalid = invalid.view(hi - lo, 1, 1, max_used).to(device)
        positions = [items[index].start_position for index in decode]
        bases = [items[index].rotation_base for index in decode]
        write_rotations = [items[index].write_rotations[0] for index in decode]
        # Flat row of each (stream, kv head) of the new token in a layer's keys viewed as [-1, head_dim].
        capacity, num_kv = self.pool.capacity, spec.num_kv_heads
        flat = [(slot * num_kv + head) * capacity + items[index].write_slots[0]
                for slot, index in zip(slots, decode) for head in range(num_kv)]
        sink_fix = self.sink_tokens > 0 and any(bases)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        # One rotation per layer covers the query heads (by position + rotation_base), the new
        # keys (by their rotation index) and, where a stream has a rotation_base, the query
        # heads again by position alone for the sink columns. In float32 the attention scale
        # is folded into the query angles.
        num_heads, num_decode = spec.num_heads, len(decode)
        ring_cos, ring_sin = self.rotary.angles(as_tensor([p + b for p, b in zip(positions, bases)]))
        write_cos, write_sin = self.rotary.angles(as_tensor(write_rotations))
        parts = [(ring_cos, ring_sin, num_heads, True), (write_cos, write_sin, num_kv, False)]
        if sink_fix:
            sink_cos, sink_sin = self.rotary.angles(as_tensor(positions))
            parts.append((sink_cos, sink_sin, num_heads, True))
        cos, sin = [], []
        for part_cos, part_sin, heads, is_query in parts:
            factor = self.query_scale if is_query else 1.0
            cos.append((part_cos * factor).unsqueeze(1).expand(num_decode, heads, -1))
            sin.append((part_sin * factor).unsqueeze(1).expand(num_decode, heads, -1))
        return {
            "items": set(decode),
            "rows": None if rows == list(range(len(items))) else as_tensor(rows),
            "local": None if dense else as_tensor([slot - lo for slot in slots]),
            "lo": lo,
            "hi": hi,
            "used": max_used,
            "flat_write": as_tensor(flat),
            "angles": (torch.cat(cos, dim=1), torch.cat(sin, dim=1)),  # [decode, heads..., head_dim]
            "sink_fix": sink_fix,
            "invalid": invalid,
        }

    def _attention(self, layer_index, weights, normed, items, bounds, prepared, decode) -> torch.Tensor:
        spec = self.spec
        q, k, v = self._project(weights, normed)
        if decode is not None and len(decode["items"]) == len(items):
            return weights.o(self._decode_attention(layer_index, decode, q, k, v, weights.scale))
        out = torch.empty((normed.shape[0], spec.num_heads * spec.head_dim), dtype=q.dtype, device=q.device)
        for item, (first, last), prep in zip(items, bounds, prepared):
            if prep is None:
                continue
            out[first:last] = self._item_attention(layer_index, item, prep, q[first:last], k[first:last],
                                                   v[first:last], weights.scale)
        if decode is not None:
            out[decode["rows"]] = self._decode_attention(layer_index, decode, q, k, v, weights.scale)
        return weights.o(out)

    def _decode_attention(self, layer_index, decode, q, k, v, scale) -> torch.Tensor:
        spec, group = self.spec, self.group_size
        keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]
        rows = decode["rows"]
        if rows is not None:
            q, k, v = q[rows], k[rows], v[rows]
        num_decode, num_heads, num_kv = q.shape[0], spec.num_heads, spec.num_kv_heads
        # New keys are rotated once, by their rotation index, and never rewritten per step.
        rotated = self.rotary.rotate(torch.cat([q, k, q] if decode["sink_fix"] else [q, k], dim=1), *decode["angles"])
        flat = decode["flat_write"]
        keys.view(-1, spec.head_dim).index_copy_(0, flat, rotated[:, num_heads:num_heads + num_kv].flatten(0, 1))
        values.view(-1, spec.head_dim).index_copy_(0, flat, v.flatten(0, 1))

        lo, hi, used = decode["lo"], decode["hi"], decode["used"]
        shape = (num_decode, num_kv, group, spec.head_dim)
        query = self._to_slot_rows(rotated[:, :num_heads].reshape(shape), decode)
        # One matmul reads every decoding slot's keys once: [slots, kv_heads, group, used].
        scores = torch.matmul(query, keys[lo:hi, :, :used].transpose(-1, -2))
        if decode["sink_fix"]:
            sinks = min(self.sink_tokens, used)
            sink_query = self._to_slot_rows(rotated[:, num_heads + num_kv:].reshape(shape), decode)
            scores[..., :sinks] = torch.matmul(sink_query, keys[lo:hi, :, :sinks].transpose(-1, -2))
        if self.query_scale == 1.0:
            scores = scores.float().mul_(scale)
        if decode["invalid"] is not None:
            scores.masked_fill_(decode["invalid"], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(weights, values[lo:hi, :, :used])  # [slots, kv_heads, group, head_dim]
        if decode["local"] is not None:
            out = out[decode["local"]]
        return out.reshape(num_decode, spec.num_heads * spec.head_dim)

    @staticmethod
    def _to_slot_rows(query: torch.Tensor, decode: dict) -> torch.Tensor:
        """Return ``query`` (one row per decoding stream) as one row per slot of ``[lo, hi)``, zeros elsewhere."""
        if decode["local"] is None:
            return query
        scattered = query.new_zeros((decode["hi"] - decode["lo"], *query.shape[1:]))
        scattered[decode["local"]] = query
        return scattered

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

        query = q.transpose(0, 1)  # [heads, new, dim]
        scores = []
        for start, end, angles in prep["segments"]:
            # Sink keys are rotated by their positions and window keys by position plus
            # rotation_base. Rotating the query the same way scores each key at its position.
            rotated = self.rotary.rotate(query, *angles)
            # Grouped-query attention without copying K/V: the query heads that share a KV head
            # become extra query rows of that head.
            rotated = rotated.reshape(spec.num_kv_heads, self.group_size * num_new, spec.head_dim)
            scores.append(torch.matmul(rotated, slot_keys[:, start:end].transpose(1, 2)))
        scores = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)  # [kv_heads, rows, used]
        scores = scores.float() * scale
        if prep["mask"] is not None:
            scores.masked_fill_(~prep["mask"], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(slot_values.dtype)
        used = weights.shape[-1]
        out = torch.matmul(weights, slot_values[:, :used])  # [kv_heads, group * num_new, head_dim]
        out = out.reshape(spec.num_heads, num_new, spec.head_dim).transpose(0, 1)
        return out.reshape(num_new, spec.num_heads * spec.head_dim)
