"""Conversion between the engine's ``StreamSnapshot`` and the snapshot format's ``CacheState``.

The engine exports K/V of the used physical prefix only, ``[num_layers, num_kv_heads,
used_slots, head_dim]``; the slot arithmetic of :mod:`worker.state.slots` matches the
engine's layout (sinks first, then the ring buffer), with ``tokens_written`` taken from
the layout's ``tokens_cached_total``.
"""

from __future__ import annotations

from typing import Any

from worker.state.snapshots import CacheState


def to_cache_state(snapshot: Any) -> CacheState:
    """Return the :class:`CacheState` of an engine ``StreamSnapshot``."""
    layout = dict(snapshot.layout)
    metadata = {
        "stream_id": snapshot.stream_id,
        "tokens_seen": snapshot.tokens_seen,
        "tokens_written": layout["tokens_cached_total"],
        "cache_fill": layout["sink_filled"] + layout["window_count"],
        "tokens_evicted": layout["tokens_evicted_total"],
        # A reset, a restart after an end, or a rebase rewrites slots that no token count shows.
        "cache_epoch": f"{layout.get('epoch', 0)}.{layout.get('rebases_total', 0)}",
        "layout": layout,
        "pending_token_ids": list(snapshot.pending_token_ids),
        "chat_started": snapshot.chat_started,
        "engine_format_version": snapshot.format_version,
        "extra": dict(snapshot.extra),
    }
    return CacheState(
        stream_id=snapshot.stream_id,
        fingerprint=snapshot.fingerprint,
        engine_config=dict(snapshot.engine_config),
        metadata=metadata,
        keys=snapshot.keys,
        values=snapshot.values,
    )


def to_engine_snapshot(state: CacheState) -> Any:
    """Return the engine ``StreamSnapshot`` of a loaded :class:`CacheState`."""
    from worker.engine import StreamSnapshot

    metadata = state.metadata
    layout = metadata["layout"]
    used_slots = layout["sink_filled"] + layout["window_count"]
    return StreamSnapshot(
        stream_id=state.stream_id,
        fingerprint=state.fingerprint,
        engine_config=dict(state.engine_config),
        layout=dict(layout),
        pending_token_ids=list(metadata["pending_token_ids"]),
        chat_started=bool(metadata["chat_started"]),
        keys=state.keys[:, :, :used_slots].contiguous(),
        values=state.values[:, :, :used_slots].contiguous(),
        tokens_seen=int(metadata["tokens_seen"]),
        format_version=int(metadata["engine_format_version"]),
        extra=dict(metadata["extra"]),
    )


def build_state_hooks(config: Any, engine: Any, metrics: Any | None = None) -> Any:
    """Return :class:`RedisStateHooks` for ``engine``, whose model and settings snapshots must match."""
    from worker.state.hooks import RedisStateHooks

    return RedisStateHooks(
        config,
        fingerprint=engine.loaded.fingerprint,
        engine_config=engine.snapshot_config(),
        to_state=to_cache_state,
        from_state=to_engine_snapshot,
        metrics=metrics,
    )
