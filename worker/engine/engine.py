"""``StreamEngine``: per-stream sink + window caches, many streams per batched forward.

One thread owns an engine. ``submit`` queues requests; each ``step`` plans one forward
across all streams with work (``planner.plan_step``), runs it (``forward.BatchedForward``)
and returns the requests that finished.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field

import torch

from worker.engine.config import EngineConfig
from worker.engine.forward import BatchedForward, CachePool, ForwardItem
from worker.engine.layout import StreamLayout, max_chunk, plan_append
from worker.engine.models import LoadedModel, check_architecture
from worker.engine.planner import Candidate, plan_step
from worker.engine.sampling import GenerationParams, Sampler
from worker.exceptions import CapacityError, ConfigError, SinkstreamError

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT_VERSION = 2
ACTIONS = ("append", "reset", "end")


class SnapshotMismatchError(SinkstreamError):
    """A snapshot was made by another model, engine configuration or format version."""


class StreamBusyError(SinkstreamError):
    """The stream has a request in progress; export it once the stream is idle."""

    retriable = True


@dataclass
class Request:
    """One event for one stream. See docs/architecture.md for the contract."""

    stream_id: str
    event_id: str
    text: str | None = None
    token_ids: list[int] | None = None
    role: str | None = None
    generate: GenerationParams | None = None
    action: str = "append"
    score: bool = False
    """Return the log-probability of every token fed (evaluation); no token is held back."""
    submitted_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"invalid action {self.action!r}: use one of {', '.join(ACTIONS)}")
        if self.text is not None and self.token_ids is not None:
            raise ConfigError("a request takes text or token_ids, not both")


@dataclass
class Result:
    """The outcome of one request."""

    stream_id: str
    event_id: str
    action: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """``eos``, ``stop``, ``length``, or None when nothing was generated."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    evicted_tokens: int = 0
    """Tokens evicted from this stream's cache so far."""
    tokens_seen: int = 0
    """Tokens this stream has consumed so far."""
    queued_s: float = 0.0
    time_to_first_token_s: float | None = None
    total_s: float = 0.0
    logprobs: torch.Tensor | None = None
    """Only for score requests: log-probability of each fed token (NaN where unknown)."""
    error: str | None = None


@dataclass
class StepStats:
    """Numbers of one ``step``, for metrics."""

    num_streams: int = 0
    batch_size: int = 0
    """Tokens in the forward."""
    tokens_prefilled: int = 0
    tokens_generated: int = 0
    tokens_evicted: int = 0
    duration_s: float = 0.0
    resident_streams: int = 0
    host_streams: int = 0
    known_streams: int = 0
    slots_total: int = 0


@dataclass
class StreamSnapshot:
    """A stream's complete state: metadata and K/V exactly as the engine stores them.

    ``keys`` and ``values``: ``[num_layers, num_kv_heads, used_slots, head_dim]`` in the
    cache dtype and physical slot order; each key is rotated by its rotation index (see
    ``layout``), so the layout's ``rotation_base`` belongs to the state.
    """

    stream_id: str
    fingerprint: str
    engine_config: dict
    layout: dict
    pending_token_ids: list[int]
    chat_started: bool
    keys: torch.Tensor
    values: torch.Tensor
    tokens_seen: int = 0
    format_version: int = SNAPSHOT_FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    """Free-form metadata owned by callers (for example the last applied offset)."""


@dataclass
class _Active:
    request: Request
    to_feed: list[int]
    prompt_tokens: int
    sampler: Sampler | None
    started_at: float
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    logprobs: list[torch.Tensor] = field(default_factory=list)
    score_carry: torch.Tensor | None = None


@dataclass
class _Stream:
    stream_id: str
    layout: StreamLayout
    slot: int | None = None
    host: StreamSnapshot | None = None
    pending: list[int] = field(default_factory=list)
    chat_started: bool = False
    tokens_seen: int = 0
    queue: deque = field(default_factory=deque)
    active: _Active | None = None
    score_carry: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    # MemAvailable counts the page cache that the kernel can reclaim. Free pages alone
    # (sysconf's SC_AVPHYS_PAGES) can read a few GiB on a machine with many GiB to spare.
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _new_epoch() -> int:
    """Return a random identity for a new incarnation of a stream's cache (see ``StreamLayout.epoch``)."""
    return secrets.randbits(62)


class StreamEngine:
    """Per-stream attention-sink + window caches; one batched forward per ``step``."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        config.check_model(loaded.spec.max_positions)
        check_architecture(loaded.model.config, config.capacity)
        if str(loaded.dtype).removeprefix("torch.") != config.dtype:
            raise ConfigError(
                f"engine dtype {config.dtype} differs from the loaded model's {loaded.dtype}; "
                f"load the model with dtype={config.dtype!r}"
            )
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.slot_bytes = CachePool.bytes_per_slot(loaded, config.capacity)
        pool_bytes = self.slot_bytes * config.max_resident_streams
        available = _available_memory(loaded.device)
        if available is not None and pool_bytes > 0.9 * available:
            raise CapacityError(
                f"{config.max_resident_streams} cache slots of {self.slot_bytes / 2**20:.1f} MiB need "
                f"{pool_bytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB is free on {loaded.device}; "
                f"lower max_resident_streams to {max(1, int(0.9 * available // self.slot_bytes))} or the window"
            )
        self.pool = CachePool(loaded, config.max_resident_streams, config.capacity)
        self.forward = BatchedForward(loaded, self.pool, config.sink_tokens, config.window_tokens,
                                      prepack=config.prepack_weights)
        self.free_slots = list(range(config.max_resident_streams))
        self.streams: dict[str, _Stream] = {}
        self.resident_lru: OrderedDict[str, None] = OrderedDict()
        self.host_lru: OrderedDict[str, None] = OrderedDict()
        self._sequence = itertools.count()
        self._abandoned: list[Result] = []
        self._order: dict[int, int] = {}
        self.last_step_stats = StepStats(slots_total=config.max_resident_streams)
        logger.info(
            "engine ready: %d slots of %.1f MiB (%d sinks + %d window tokens), dtype %s, model %s, "
            "linear weights %s",
            config.max_resident_streams, self.slot_bytes / 2**20, config.sink_tokens,
            config.window_tokens, config.dtype, loaded.fingerprint,
            "prepacked for oneDNN" if self.forward.prepacked else "not prepacked",
        )

    # ----------------------------------------------------------------- requests

    def submit(self, request: Request) -> None:
        """Queue a request behind the earlier requests of its stream."""
        stream = self.streams.get(request.stream_id)
        if stream is None:
            stream = _Stream(request.stream_id, StreamLayout(self.config.sink_tokens, self.config.window_tokens,
                                                             epoch=_new_epoch()))
            self.streams[request.stream_id] = stream
        self._order[id(request)] = next(self._sequence)
        stream.queue.append(request)

    def has_work(self) -> bool:
        return bool(self._abandoned) or any(stream.active or stream.queue for stream in self.streams.values())

    def run_until_idle(self) -> list[Result]:
        results = []
        while self.has_work():
            results.extend(self.step())
        return results

    def score(self, token_ids_by_stream: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Feed tokens to streams and return each token's log-probability given everything before it."""
        for stream_id, token_ids in token_ids_by_stream.items():
            self.submit(Request(stream_id, f"score-{next(self._sequence)}", token_ids=list(token_ids), score=True))
        scores = {}
        for result in self.run_until_idle():
            if result.error:
                raise SinkstreamError(f"scoring stream {result.stream_id!r} failed: {result.error}")
            scores[result.stream_id] = result.logprobs
        return scores

    # ----------------------------------------------------------------- stream state

    def known_streams(self) -> list[str]:
        return list(self.streams)

    def resident_stream_ids(self) -> list[str]:
        """Streams in device slots, least recently used first."""
        return list(self.resident_lru)

    def host_stream_ids(self) -> list[str]:
        """Streams in the host tier, least recently used first."""
        return list(self.host_lru)

    def is_idle(self, stream_id: str) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and stream.active is None and not stream.queue

    def stream_layout(self, stream_id: str) -> StreamLayout:
        return self.streams[stream_id].layout

    def reset_stream(self, stream_id: str) -> None:
        """Empty a stream's cache now (the ``reset`` action does the same in request order)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.active is not None:
            raise StreamBusyError(f"stream {stream_id!r} has a request in progress; submit a reset action instead")
        self._reset(stream)

    def drop_stream(self, stream_id: str) -> None:
        """Forget a stream and free its slot.

        A request in progress and queued requests of the stream are abandoned: the next
        ``step`` returns each of them as a ``Result`` with ``error`` set, so every submitted
        request still gets exactly one result.
        """
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        abandoned = ([stream.active.request] if stream.active is not None else []) + list(stream.queue)
        for request in abandoned:
            self._abandoned.append(self._result(stream, request, request.submitted_at,
                                                error="the stream was dropped before this request finished"))
        if stream.slot is not None:
            self.free_slots.append(stream.slot)
            self.resident_lru.pop(stream_id, None)
        self.host_lru.pop(stream_id, None)

    def export_stream(self, stream_id: str) -> StreamSnapshot:
        """Copy a stream's state out of the engine (the stream must have no request in progress)."""
        stream = self.streams[stream_id]
        if stream.active is not None:
            raise StreamBusyError(f"stream {stream_id!r} has a request in progress")
        if stream.host is not None:
            keys, values = stream.host.keys.clone(), stream.host.values.clone()
        elif stream.slot is not None:
            keys, values = self.pool.read_slot(stream.slot, stream.layout.used_slots)
            keys, values = keys.cpu(), values.cpu()
        else:
            keys, values = self._empty_kv()
        return StreamSnapshot(
            stream_id=stream_id,
            fingerprint=self.loaded.fingerprint,
            engine_config=self.snapshot_config(),
            layout=asdict(stream.layout),
            pending_token_ids=list(stream.pending),
            chat_started=stream.chat_started,
            keys=keys,
            values=values,
            tokens_seen=stream.tokens_seen,
            extra=dict(stream.extra),
        )

    def import_stream(self, snapshot: StreamSnapshot) -> None:
        """Load a stream's state, replacing any state of that stream; reject foreign snapshots."""
        self.check_snapshot(snapshot)
        self.drop_stream(snapshot.stream_id)
        layout = StreamLayout(**snapshot.layout)
        stream = _Stream(snapshot.stream_id, layout, pending=list(snapshot.pending_token_ids),
                         chat_started=snapshot.chat_started, tokens_seen=snapshot.tokens_seen,
                         extra=dict(snapshot.extra))
        self.streams[snapshot.stream_id] = stream
        if self.free_slots:
            stream.slot = self.free_slots.pop()
            self.pool.write_slot(stream.slot, snapshot.keys.to(self.loaded.device), snapshot.values.to(self.loaded.device))
            self.resident_lru[snapshot.stream_id] = None
        else:
            stream.host = snapshot
            self._add_host(stream)

    def snapshot_config(self) -> dict:
        return {
            "sink_tokens": self.config.sink_tokens,
            "window_tokens": self.config.window_tokens,
            "dtype": self.config.dtype,
        }

    def check_snapshot(self, snapshot: StreamSnapshot) -> None:
        """Raise ``SnapshotMismatchError`` unless the snapshot fits this model and configuration."""
        if snapshot.format_version != SNAPSHOT_FORMAT_VERSION:
            raise SnapshotMismatchError(
                f"snapshot of stream {snapshot.stream_id!r} has format version {snapshot.format_version}, "
                f"this engine reads {SNAPSHOT_FORMAT_VERSION}"
            )
        if snapshot.fingerprint != self.loaded.fingerprint:
            raise SnapshotMismatchError(
                f"snapshot of stream {snapshot.stream_id!r} was made by model {snapshot.fingerprint}, "
                f"this engine runs {self.loaded.fingerprint}"
            )
        if snapshot.engine_config != self.snapshot_config():
            raise SnapshotMismatchError(
                f"snapshot of stream {snapshot.stream_id!r} has engine config {snapshot.engine_config}, "
                f"this engine runs {self.snapshot_config()}"
            )
        used = StreamLayout(**snapshot.layout).used_slots
        spec = self.loaded.spec
        expected = (spec.num_layers, spec.num_kv_heads, used, spec.head_dim)
        for name, tensor in (("keys", snapshot.keys), ("values", snapshot.values)):
            if tuple(tensor.shape) != expected or tensor.dtype != self.loaded.dtype:
                raise SnapshotMismatchError(
                    f"snapshot of stream {snapshot.stream_id!r} has {name} {tuple(tensor.shape)} {tensor.dtype}, "
                    f"expected {expected} {self.loaded.dtype}"
                )

    def _empty_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.loaded.spec
        shape = (spec.num_layers, spec.num_kv_heads, 0, spec.head_dim)
        return torch.zeros(shape, dtype=self.loaded.dtype), torch.zeros(shape, dtype=self.loaded.dtype)

    def _reset(self, stream: _Stream) -> None:
        stream.layout = stream.layout.reset(epoch=_new_epoch())
        stream.pending = []
        stream.chat_started = False
        stream.score_carry = None
        if stream.host is not None:
            stream.host = None
            self.host_lru.pop(stream.stream_id, None)

    # ----------------------------------------------------------------- residency

    def _offload(self, stream_id: str) -> None:
        """Move an idle resident stream to the host tier."""
        stream = self.streams[stream_id]
        keys, values = self.pool.read_slot(stream.slot, stream.layout.used_slots)
        self.free_slots.append(stream.slot)
        stream.slot = None
        self.resident_lru.pop(stream_id, None)
        stream.host = StreamSnapshot(
            stream_id, self.loaded.fingerprint, self.snapshot_config(), asdict(stream.layout),
            list(stream.pending), stream.chat_started, keys.cpu(), values.cpu(), stream.tokens_seen,
        )
        self._add_host(stream)

    def _add_host(self, stream: _Stream) -> None:
        if len(self.host_lru) >= self.config.max_host_streams and stream.stream_id not in self.host_lru:
            raise CapacityError(
                f"host tier full: {self.config.max_host_streams} idle streams already held in host memory; "
                f"raise max_host_streams or max_resident_streams, or end idle streams"
            )
        self.host_lru[stream.stream_id] = None

    def _admit(self, stream_id: str) -> None:
        stream = self.streams[stream_id]
        stream.slot = self.free_slots.pop()
        if stream.host is not None:
            self.pool.write_slot(stream.slot, stream.host.keys.to(self.loaded.device),
                                 stream.host.values.to(self.loaded.device))
            stream.host = None
            self.host_lru.pop(stream_id, None)
        self.resident_lru[stream_id] = None

    # ----------------------------------------------------------------- stepping

    def step(self) -> list[Result]:
        """Run one batched forward over the streams with work; return finished requests."""
        started = time.perf_counter()
        results = self._start_requests()
        candidates = []
        for stream in self.streams.values():
            if stream.active is None or not stream.active.to_feed:
                continue
            active = stream.active
            candidates.append(Candidate(
                stream_id=stream.stream_id,
                pending_tokens=len(active.to_feed),
                decoding=bool(active.generated),
                submitted_order=self._order.get(id(active.request), 0),
                resident=stream.slot is not None,
                max_chunk=max_chunk(stream.layout, self.config.prefill_chunk_tokens),
            ))
        if not candidates:
            return results
        busy = {c.stream_id for c in candidates}
        idle_lru = [sid for sid in self.resident_lru if sid not in busy and self.streams[sid].active is None]
        host_room = self.config.max_host_streams - len(self.host_lru)
        plan = plan_step(candidates, len(self.free_slots), idle_lru, self.config.max_batch_tokens, host_room)
        if not plan.items:
            return results + self._fail_stuck(plan.waiting)
        for stream_id in plan.offload:
            self._offload(stream_id)
        for stream_id in plan.admit:
            self._admit(stream_id)

        items, chunks, stats = [], [], StepStats(slots_total=self.config.max_resident_streams)
        for stream_id, num_tokens in plan.items:
            stream = self.streams[stream_id]
            active = stream.active
            chunk = active.to_feed[:num_tokens]
            append = plan_append(stream.layout, num_tokens)
            items.append(ForwardItem.from_plan(stream.slot, chunk, append, all_logits=active.request.score))
            chunks.append((stream, chunk, append))
            self.resident_lru.move_to_end(stream_id)
        logits = self.forward(items)

        for (stream, chunk, append), item_logits in zip(chunks, logits):
            active = stream.active
            stream.layout = append.after
            stream.tokens_seen += len(chunk)
            del active.to_feed[:len(chunk)]
            stats.tokens_evicted += append.num_evicted
            if not active.generated:  # generated tokens are counted when sampled
                stats.tokens_prefilled += len(chunk)
            finished = self._after_forward(stream, active, chunk, item_logits, stats)
            if finished is not None:
                results.append(finished)

        stats.num_streams = len(items)
        stats.batch_size = sum(len(item.token_ids) for item in items)
        stats.duration_s = time.perf_counter() - started
        stats.resident_streams = len(self.resident_lru)
        stats.host_streams = len(self.host_lru)
        stats.known_streams = len(self.streams)
        self.last_step_stats = stats
        return results

    def _fail_stuck(self, waiting: tuple[str, ...]) -> list[Result]:
        """Fail the requests of streams that cannot get a slot while no other stream runs.

        Every slot contains an idle stream and the host tier is full, so no step would ever
        free a slot. The requests fail with the reason instead of waiting for ever.
        """
        message = (
            f"no cache slot: all {self.config.max_resident_streams} device slots hold idle streams and the host "
            f"tier is full ({self.config.max_host_streams} streams); raise max_host_streams or "
            f"max_resident_streams, end idle streams, or enable the Redis tier"
        )
        results = []
        for stream_id in waiting:
            stream = self.streams[stream_id]
            active = stream.active
            stream.active = None
            stream.pending = []
            logger.error("stream %s event %s failed: %s", stream_id, active.request.event_id, message)
            results.append(self._result(stream, active.request, active.started_at, error=message))
        return results

    def _start_requests(self) -> list[Result]:
        results, self._abandoned = self._abandoned, []
        for stream_id in list(self.streams):
            while True:
                # Looked up each time: an ``end`` replaces the stream's entry.
                stream = self.streams.get(stream_id)
                if stream is None or stream.active is not None or not stream.queue:
                    break
                result = self._start(stream, stream.queue.popleft())
                if result is not None:
                    results.append(result)
        return results

    def _start(self, stream: _Stream, request: Request) -> Result | None:
        now = time.monotonic()
        if request.action == "reset":
            self._reset(stream)
            return self._result(stream, request, now, action="reset")
        if request.action == "end":
            result = self._result(stream, request, now, action="end")
            later = list(stream.queue)
            stream.queue.clear()
            self.drop_stream(stream.stream_id)
            if later:  # requests after an end start the stream afresh
                fresh = _Stream(stream.stream_id, stream.layout.reset(epoch=_new_epoch()))
                fresh.queue.extend(later)
                self.streams[stream.stream_id] = fresh
            return result
        try:
            new_tokens = self._encode(stream, request)
        except Exception as exc:  # a tokenizer or template failure must not stop the engine
            logger.warning("stream %s event %s: encoding failed: %s", stream.stream_id, request.event_id, exc)
            return self._result(stream, request, now, error=f"encoding failed: {exc}")
        sampler = None
        if request.generate is not None:
            sampler = Sampler(request.generate, stream.stream_id, request.event_id)
        to_feed = stream.pending + new_tokens
        stream.pending = []
        if request.generate is None and not request.score:
            # Hold the last token back: it is fed with the next event, whose logits need it.
            stream.pending = to_feed[-1:]
            to_feed = to_feed[:-1]
        elif request.generate is not None and not to_feed:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                return self._result(stream, request, now, error="nothing to generate from: the stream is empty")
            to_feed = [bos]
        active = _Active(request, to_feed, len(new_tokens), sampler, now)
        if request.score:
            active.score_carry = stream.score_carry
        stream.active = active
        if not to_feed:
            stream.active = None
            return self._result(stream, request, now, prompt_tokens=len(new_tokens))
        return None

    def _encode(self, stream: _Stream, request: Request) -> list[int]:
        if request.token_ids is not None:
            return list(request.token_ids)
        text = request.text or ""
        if request.role is not None:
            rendered = self._render_turn(stream, request.role, text, request.generate is not None)
            stream.chat_started = True
            return self.tokenizer.encode(rendered, add_special_tokens=False)
        if not text:
            return []
        first = stream.layout.tokens_cached_total == 0 and not stream.pending
        return self.tokenizer.encode(text, add_special_tokens=first)

    def _render_turn(self, stream: _Stream, role: str, text: str, generation_prompt: bool) -> str:
        """Render one chat turn with the model's template, alone, as the next piece of the stream."""
        tokenizer = self.tokenizer
        message = [{"role": role, "content": text}]
        if not getattr(tokenizer, "chat_template", None):
            return f"{role}: {text}\n" + ("assistant: " if generation_prompt else "")
        if not stream.chat_started:
            return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=generation_prompt)
        # Later turns: render after a placeholder turn and keep only the new part, so that
        # template preambles (a default system prompt, say) appear once per stream.
        placeholder = [{"role": "system", "content": "-"}]
        prefix = tokenizer.apply_chat_template(placeholder, tokenize=False)
        full = tokenizer.apply_chat_template(placeholder + message, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        if full.startswith(prefix):
            return full[len(prefix):]
        return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=generation_prompt)

    def _after_forward(self, stream, active, chunk, logits, stats) -> Result | None:
        request = active.request
        if request.score:
            logprobs = torch.log_softmax(logits, dim=-1)
            chunk_ids = torch.tensor(chunk, dtype=torch.long)
            scores = torch.full((len(chunk),), math.nan)
            if active.score_carry is not None:
                scores[0] = active.score_carry[chunk_ids[0]]
            if len(chunk) > 1:
                scores[1:] = logprobs[:-1].gather(1, chunk_ids[1:].unsqueeze(1)).squeeze(1).cpu()
            active.logprobs.append(scores)
            active.score_carry = logprobs[-1].cpu()
            if active.to_feed:
                return None
            stream.score_carry = active.score_carry
            stream.active = None
            result = self._result(stream, request, active.started_at, prompt_tokens=active.prompt_tokens)
            result.logprobs = torch.cat(active.logprobs) if active.logprobs else torch.empty(0)
            result.logprobs = result.logprobs[-active.prompt_tokens:] if active.prompt_tokens else result.logprobs[:0]
            return result
        if active.to_feed:
            return None  # more prompt chunks to go
        if active.sampler is None:
            stream.active = None
            return self._result(stream, request, active.started_at, prompt_tokens=active.prompt_tokens)

        token = active.sampler.select(logits[-1])
        stats.tokens_generated += 1
        if active.first_token_at is None:
            active.first_token_at = time.monotonic()
        active.generated.append(token)
        params = active.sampler.params
        finish = None
        text = None
        if token in self.loaded.spec.eos_token_ids:
            finish = "eos"
        else:
            if params.stop:
                text = self.tokenizer.decode(active.generated, skip_special_tokens=True)
                if any(stop in text for stop in params.stop):
                    finish = "stop"
            if finish is None and len(active.generated) >= params.max_new_tokens:
                finish = "length"
        if finish is None:
            active.to_feed = [token]
            return None
        # The last sampled token is part of the stream; it is fed with the next event.
        stream.pending = [token]
        stream.active = None
        visible = [t for t in active.generated if t not in self.loaded.spec.eos_token_ids]
        text = self.tokenizer.decode(visible, skip_special_tokens=True)
        if finish == "stop":
            cut = min(text.index(stop) for stop in params.stop if stop in text)
            text = text[:cut]
        return self._result(stream, request, active.started_at, prompt_tokens=active.prompt_tokens,
                            text=text, token_ids=list(active.generated), finish_reason=finish,
                            first_token_at=active.first_token_at)

    def _result(self, stream: _Stream, request: Request, started_at: float, action: str | None = None,
                prompt_tokens: int = 0, text: str = "", token_ids: list[int] | None = None,
                finish_reason: str | None = None, first_token_at: float | None = None,
                error: str | None = None) -> Result:
        now = time.monotonic()
        self._order.pop(id(request), None)
        return Result(
            stream_id=stream.stream_id,
            event_id=request.event_id,
            action=action or request.action,
            text=text,
            token_ids=token_ids or [],
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            generated_tokens=len(token_ids or []),
            cached_tokens=stream.layout.num_cached,
            evicted_tokens=stream.layout.tokens_evicted_total,
            tokens_seen=stream.tokens_seen,
            queued_s=max(0.0, started_at - request.submitted_at),
            time_to_first_token_s=(first_token_at - request.submitted_at) if first_token_at else None,
            total_s=now - request.submitted_at,
            error=error,
        )
