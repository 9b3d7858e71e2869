"""The Kafka worker loop: fetch events, run them through the engine, produce outputs, commit.

One asyncio loop does all Kafka I/O. The engine runs in its own thread
(:class:`~worker.stage.runner.EngineRunner`), so heartbeats, fetches and rebalance callbacks
never wait behind a forward pass.

Life of an event:

1. ``getmany`` returns a record; its offset enters the partition's :class:`OffsetTracker`.
2. The record is parsed. A bad record goes to the dead-letter topic (step 5).
3. The event waits in the :class:`StreamDispatcher` behind earlier events of its stream,
   then goes to the engine thread as a ``Request``.
4. The engine's ``Result`` comes back; the output is produced to the outputs topic.
5. When the broker acknowledges the output (or dead letter), the event is done.
6. Every ``checkpoint.interval_s`` (or ``interval_events`` done events) each partition's
   committable offset is checkpointed (see :mod:`worker.stage.hooks`) and committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from worker.stage import messages, replay
from worker.stage.dispatcher import StreamDispatcher
from worker.stage.hooks import NoStateHooks, StreamStateHooks
from worker.stage.offsets import OffsetTracker
from worker.stage.runner import EngineRunner
from worker.stage.settings import WorkerSettings
from worker.state.tiering import offload_clean_streams

logger = logging.getLogger(__name__)

RESEND_DELAY_S = 1.0  # wait before producing an output again after the producer gave up
WARN_INTERVAL_S = 10.0  # at most one dead-letter warning per reason in this many seconds
LAG_INTERVAL_S = 5.0  # seconds between two end-offset requests for the consumer lag
ACK_WAIT_S = 30.0  # maximum seconds a checkpoint waits for the outputs it covers to be acknowledged
# Replayed events of one stream handed to the engine at a time. The engine runs one event
# of a stream at a time, so a second one waiting keeps it busy.
REPLAY_IN_FLIGHT = 2


def record_request_id(tp: TopicPartition, offset: int) -> str:
    """Return the engine request id of the record at ``offset`` of ``tp``, live or replayed."""
    return f"{tp.topic}/{tp.partition}/{offset}"


@dataclass
class PendingEvent:
    """A valid event between fetch and done."""

    tp: TopicPartition
    offset: int
    generation: int
    record: ConsumerRecord
    event: Any  # topology.schemas.Event
    fetched_at: float
    stream_id: str = ""
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        self.stream_id = self.event.stream_id

    @property
    def request_id(self) -> str:
        """The engine's event id; unique per record, unlike the producer's event id."""
        return record_request_id(self.tp, self.offset)


@dataclass
class PartitionState:
    """Bookkeeping of one assigned partition for one assignment generation."""

    tp: TopicPartition
    generation: int
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    stream_ids: set[str] = field(default_factory=set)
    # Streams with events applied since the last checkpoint -> offset of the last one.
    changed_streams: dict[str, int] = field(default_factory=dict)
    # Streams restored from a snapshot -> offset of the last event the snapshot contains.
    restored_through: dict[str, int] = field(default_factory=dict)
    # Streams with outputs or dead letters produced and not yet acknowledged -> how many.
    unacked: dict[str, int] = field(default_factory=dict)
    paused: bool = False
    unsafe: bool = False  # paused because no checkpoint succeeded for checkpoint.max_unsafe_s
    num_done_since_commit: int = 0
    revoking: bool = False


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, worker: StageWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker.handle_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker.handle_assigned(list(assigned))


class StageWorker:
    """Consumes the events topic with one engine; see the module docstring for the steps."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Any,
        hooks: StreamStateHooks | None = None,
        metrics: Any | None = None,
        health: Any | None = None,
        model_fingerprint: str = "",
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.model_fingerprint = model_fingerprint
        self.hooks: StreamStateHooks = hooks or NoStateHooks()
        self.metrics = metrics
        self.health = health
        self._stage = settings.stage
        self._limits = settings.stage.event_limits()
        self._partitions: dict[TopicPartition, PartitionState] = {}
        self._generation = 0
        self._dispatcher: StreamDispatcher[PendingEvent] = StreamDispatcher(
            max_in_flight=settings.stage.queue_max_events
        )
        self._in_engine: dict[str, PendingEvent] = {}  # request id -> event inside the engine
        self._replaying: dict[str, asyncio.Future] = {}  # request id -> result of a replayed event
        # Redis tier (snapshots enabled): streams in the engine or about to enter it, streams
        # held back until the engine has room for them, and streams dropped after a checkpoint.
        self._engine_streams: set[str] = set()
        # Waiting streams map to their partition and the offset of the event that needs them.
        self._waiting_room: OrderedDict[str, tuple[PartitionState, int]] = OrderedDict()
        self._offloaded: set[str] = set()
        # A host-tier stream needs its host entry until an idle resident stream has moved to
        # the host tier in its place, so one host entry stays free.
        self._engine_capacity = settings.engine.max_resident_streams + max(0, settings.engine.max_host_streams - 1)
        self._progress = asyncio.Event()  # set whenever something finished
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._last_commit = time.monotonic()
        self._last_warning: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._fatal: BaseException | None = None
        self._last_lag_update = -LAG_INTERVAL_S
        self._lag_task: asyncio.Task | None = None
        self._kafka_connected = False
        self._kafka_lost = False  # the broker stopped responding at least once
        self.stats = WorkerStats()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.runner: EngineRunner | None = None

    # -- public -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop fetching and shut down gracefully (safe to call from a signal handler)."""
        self._stop.set()
        self._progress.set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; then drain within the grace period, commit and leave."""
        await self._start()
        try:
            await self._consume_loop()
            await self._drain(self._stage.shutdown_grace_s, partitions=None)
        finally:
            await self._shutdown()
        if self._fatal is not None:
            raise self._fatal

    @property
    def assigned_partitions(self) -> list[TopicPartition]:
        return list(self._partitions)

    async def export_stream(self, stream_id: str) -> Any:
        return await self.runner.call(lambda engine: engine.export_stream(stream_id))

    async def import_stream(self, snapshot: Any) -> None:
        await self.runner.call(lambda engine: engine.import_stream(snapshot))

    async def committed_offset(self, tp: TopicPartition) -> int | None:
        return await self.consumer.committed(tp)

    async def find_stream_ids(self, tp: TopicPartition, end_offset: int) -> tuple[set[str], int]:
        return await replay.read_stream_ids(self.settings.kafka.aiokafka_kwargs(), tp, end_offset)

    async def replay_stream(self, stream_id: str, tp: TopicPartition, end_offset: int) -> replay.ReplayOutcome:
        """Rebuild a stream from its events on ``tp`` below ``end_offset``; see :mod:`worker.stage.replay`.

        The events run in the engine like live ones, under the request ids they had when
        they first ran, so seeded sampling generates the same tokens again. Their results
        are dropped: nothing is produced to the outputs or dead-letter topic, and offsets
        and stats are untouched. The caller keeps the stream's live events back meanwhile.
        """
        state = self._partitions.get(tp)
        history = await replay.read_stream_history(
            self.settings.kafka.aiokafka_kwargs(), tp, stream_id, end_offset,
            lambda record: messages.parse_record(record, self._limits, self._stage.raw_action),
        )
        outcome = replay.ReplayOutcome(history)
        if not history.complete or not history.events:
            return outcome
        if state is None or self._partitions.get(tp) is not state:
            outcome.abandoned = True
            return outcome
        await self._run_replayed(state, history.events, outcome)
        if outcome.num_events and not outcome.abandoned:
            # The next checkpoint stores the rebuilt cache, replacing the snapshot that failed.
            state.changed_streams.setdefault(stream_id, outcome.last_offset)
        return outcome

    async def _run_replayed(self, state: PartitionState, events: list[Any], outcome: replay.ReplayOutcome) -> None:
        """Submit replayed events in order, at most ``REPLAY_IN_FLIGHT`` at a time, and drop their results."""
        loop = asyncio.get_running_loop()
        in_flight: deque[asyncio.Future] = deque()
        for event in events:
            if self._partitions.get(state.tp) is not state:
                outcome.abandoned = True
                break
            request_id = record_request_id(state.tp, event.offset)
            future = loop.create_future()
            self._replaying[request_id] = future
            self.runner.submit(messages.to_request(event, request_id))
            in_flight.append(future)
            if len(in_flight) >= REPLAY_IN_FLIGHT:
                await self._replayed_done(in_flight.popleft(), outcome)
        while in_flight:
            await self._replayed_done(in_flight.popleft(), outcome)

    async def _replayed_done(self, future: asyncio.Future, outcome: replay.ReplayOutcome) -> None:
        try:
            result = await future
        except Exception as exc:  # engine.submit raised, as it would have for the live event
            logger.debug("a replayed event of stream %s was rejected by the engine: %s", outcome.stream_id, exc)
            outcome.num_failed += 1
        else:
            outcome.num_failed += bool(result.error)
        outcome.num_events += 1

    # -- start and stop ---------------------------------------------------------------

    async def _start(self) -> None:
        kafka = self.settings.kafka
        loop = asyncio.get_running_loop()
        self.runner = EngineRunner(self.engine, loop, self._on_results, self._on_submit_error)
        self.runner.start()
        self.hooks.bind(self)
        self.producer = AIOKafkaProducer(
            **kafka.aiokafka_kwargs(),
            acks="all",
            # Tansu rejects idempotent producers; on Kafka proper this may be turned on.
            enable_idempotence=kafka.producer_idempotence,
            linger_ms=5,
        )
        self.consumer = AIOKafkaConsumer(
            **kafka.aiokafka_kwargs(),
            group_id=kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=max(100, kafka.session_timeout_ms // 3),
            max_poll_interval_ms=kafka.max_poll_interval_ms,
        )
        await self.producer.start()
        self.consumer.subscribe([kafka.events_topic], listener=_RebalanceListener(self))
        await self.consumer.start()
        self._set_kafka_connected(True)
        logger.info(
            "worker %s started: group %s, topic %s, queue %d events",
            self._stage.worker_id, kafka.group_id, kafka.events_topic, self._stage.queue_max_events,
        )

    async def _shutdown(self) -> None:
        if self.consumer is not None:
            try:
                await self.consumer.stop()  # leaves the group
            except KafkaError as exc:
                logger.warning("stopping the consumer failed: %s", exc)
        for task in list(self._tasks):
            task.cancel()
        if self._lag_task is not None:
            self._lag_task.cancel()
        if self.producer is not None:
            try:
                await self.producer.stop()
            except KafkaError as exc:
                logger.warning("stopping the producer failed: %s", exc)
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        logger.info(
            "worker %s stopped: %d events consumed, %d outputs, %d dead letters",
            self._stage.worker_id, self.stats.consumed, self.stats.outputs, self.stats.dead_letters,
        )

    # -- the consume loop ---------------------------------------------------------------

    async def _consume_loop(self) -> None:
        while not self._stop.is_set():
            self._update_pauses()
            room = self._stage.queue_max_events - self._num_not_done()
            batches = await self.consumer.getmany(timeout_ms=100, max_records=max(1, room))
            for tp, records in batches.items():
                state = self._partitions.get(tp)
                if state is None or state.revoking:
                    continue  # fetched just before a revoke; the next owner consumes it
                for record in records:
                    self._handle_record(state, record)
            self.stats.max_not_done = max(self.stats.max_not_done, self._num_not_done())
            self._dispatch()
            await self._maybe_commit()
            self._update_health()
            if room <= 0:
                await self._wait_progress(0.1)

    def _handle_record(self, state: PartitionState, record: ConsumerRecord) -> None:
        state.tracker.add(record.offset)
        self.stats.consumed += 1
        if self.stats.first_fetch_at is None:
            self.stats.first_fetch_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.events_consumed.inc()
        try:
            event = messages.parse_record(record, self._limits, self._stage.raw_action)
        except messages.InvalidEventError as exc:
            self._dead_letter(state, record, exc)
            return
        except Exception as exc:
            # A validation bug must not crash the worker on one record, or every restart
            # would read the same record and crash again.
            logger.exception("validating the record at %s offset %d failed unexpectedly; dead-lettering it",
                             _tp_name(state.tp), record.offset)
            error = messages.InvalidEventError(messages.PARSE_ERROR, f"validation failed: {type(exc).__name__}")
            self._dead_letter(state, record, error)
            return
        pending = PendingEvent(state.tp, record.offset, state.generation, record, event, time.monotonic())
        stream_id = pending.stream_id
        state.stream_ids.add(stream_id)
        if (
            self.hooks.snapshots_enabled
            and stream_id not in self._engine_streams
            and stream_id not in self._waiting_room
        ):
            # A new stream, or one dropped to the Redis tier: restore it before its event,
            # once the engine has room for it.
            self._dispatcher.hold(stream_id)
            self._offloaded.discard(stream_id)
            self._waiting_room[stream_id] = (state, record.offset)
            self._admit_waiting()
        self._dispatcher.admit(pending)

    def _admit_waiting(self) -> None:
        """Restore waiting streams into the engine while it has fewer streams than its capacity."""
        while self._waiting_room and len(self._engine_streams) < self._engine_capacity:
            stream_id, (state, next_offset) = self._waiting_room.popitem(last=False)
            self._engine_streams.add(stream_id)
            self._spawn(self._restore(state, stream_id, next_offset))

    async def _restore(self, state: PartitionState, stream_id: str, next_offset: int) -> None:
        try:
            through = await self.hooks.restore(stream_id, state.tp, next_offset)
        except Exception:
            logger.exception("restoring stream %s on %s failed; it starts empty", stream_id, _tp_name(state.tp))
            through = None
        if through is not None:
            state.restored_through[stream_id] = through
        self._dispatcher.release(stream_id)
        self._dispatch()

    def _dispatch(self) -> None:
        """Submit queued events to the engine thread, keeping each stream's order."""
        for pending in self._dispatcher.take():
            state = self._partitions.get(pending.tp)
            if state is None or state.generation != pending.generation:
                self._dispatcher.complete(pending.stream_id)
                continue
            through = state.restored_through.get(pending.stream_id)
            if through is not None and pending.offset <= through:
                self._dispatcher.complete(pending.stream_id)
                self._mark_done(pending.tp, pending.generation, pending.offset)
                continue
            pending.submitted_at = time.monotonic()
            self._in_engine[pending.request_id] = pending
            self.runner.submit(messages.to_request(pending.event, pending.request_id))
        if self.metrics is not None:
            self.metrics.queue_events.set(self._dispatcher.num_queued)

    # -- results and outputs -------------------------------------------------------------

    def _on_results(self, results: list[Any] | None, stats: Any) -> None:
        """Called on the loop for every engine step (from the engine thread)."""
        if results is None:
            self._fatal = stats  # the engine thread failed
            self.request_stop()
            return
        if stats is not None and self.metrics is not None:
            self.metrics.observe_step(stats)
        for result in results:
            replayed = self._replaying.pop(result.event_id, None)
            if replayed is not None:
                if not replayed.done():
                    replayed.set_result(result)
                continue
            pending = self._in_engine.pop(result.event_id, None)
            if pending is None:
                continue  # abandoned by a revoke
            self._dispatcher.complete(pending.stream_id)
            if result.error:
                self._engine_failed(pending, result.error)
            else:
                self._finish(pending, result)
        self._dispatch()
        self._progress.set()

    def _on_submit_error(self, request: Any, exc: Exception) -> None:
        replayed = self._replaying.pop(request.event_id, None)
        if replayed is not None:
            if not replayed.done():
                replayed.set_exception(exc)
            return
        pending = self._in_engine.pop(request.event_id, None)
        if pending is None:
            return
        self._dispatcher.complete(pending.stream_id)
        self._engine_failed(pending, str(exc))
        self._dispatch()

    def _engine_failed(self, pending: PendingEvent, message: str) -> None:
        logger.error(
            "the engine failed on the event at %s offset %d of stream %s: %s",
            _tp_name(pending.tp), pending.offset, pending.stream_id, message,
        )
        error = messages.InvalidEventError(messages.ENGINE_ERROR, f"the engine failed on the event: {message}")
        self._dead_letter(self._partitions.get(pending.tp), pending.record, error, pending)

    def _finish(self, pending: PendingEvent, result: Any) -> None:
        state = self._partitions.get(pending.tp)
        if state is not None and state.generation == pending.generation:
            state.changed_streams[pending.stream_id] = pending.offset
        self.stats.record_result(pending, result)
        if self.metrics is not None:
            self.metrics.observe_result(result)
        now = time.monotonic()
        value, headers = messages.output_message(
            pending.event, result, self._stage.worker_id, self.model_fingerprint,
            queued_s=(pending.submitted_at or now) - pending.fetched_at, total_s=now - pending.fetched_at,
        )
        self._output_sent(pending)

        def on_done() -> None:
            self._output_acked(pending)
            self._output_done(pending, result)

        self._send(
            pending.tp, pending.generation, pending.offset,
            self.settings.kafka.outputs_topic, pending.stream_id.encode(), value, headers, on_done,
        )

    def _output_sent(self, pending: PendingEvent) -> None:
        """Count an output or dead letter of ``pending``'s stream as not yet acknowledged."""
        state = self._partitions.get(pending.tp)
        if state is not None and state.generation == pending.generation:
            state.unacked[pending.stream_id] = state.unacked.get(pending.stream_id, 0) + 1

    def _output_acked(self, pending: PendingEvent) -> None:
        state = self._partitions.get(pending.tp)
        if state is None or state.generation != pending.generation:
            return
        left = state.unacked.get(pending.stream_id, 0) - 1
        if left > 0:
            state.unacked[pending.stream_id] = left
        else:
            state.unacked.pop(pending.stream_id, None)

    def _output_done(self, pending: PendingEvent, result: Any) -> None:
        self.stats.outputs += 1
        self.stats.last_output_at = time.monotonic()
        self.stats.latencies_s.append(time.monotonic() - pending.fetched_at)
        if self.metrics is not None:
            self.metrics.events_processed.inc()
            self.metrics.observe_event_latency(pending.record.timestamp)
            if pending.submitted_at:
                self.metrics.queue_wait.observe(pending.submitted_at - pending.fetched_at)

    def _dead_letter(
        self, state: PartitionState | None, record: ConsumerRecord, error: messages.InvalidEventError,
        pending: PendingEvent | None = None,
    ) -> None:
        tp = TopicPartition(record.topic, record.partition)
        reason = error.reason
        self._warn_dead_letter(tp, record, reason)
        self.stats.dead_letter_reasons[reason] = self.stats.dead_letter_reasons.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.dead_lettered(reason)
            self.metrics.event_failed(reason)
        key, value, headers = messages.dead_letter_message(record, error)
        generation = state.generation if state is not None else -1
        if pending is not None:
            self._output_sent(pending)

        def on_done() -> None:
            if pending is not None:
                self._output_acked(pending)
            self.stats.dead_letters += 1

        self._send(tp, generation, record.offset, self.settings.kafka.dlq_topic, key, value, headers, on_done)

    def _warn_dead_letter(self, tp: TopicPartition, record: ConsumerRecord, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(reason, -WARN_INTERVAL_S) < WARN_INTERVAL_S:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        self._last_warning[reason] = now
        logger.warning(
            "dead-lettering the event at %s offset %d (key %r): %s%s; the partition continues",
            _tp_name(tp), record.offset, _short_key(record.key), reason,
            f" ({suppressed} more with this reason since the last warning)" if suppressed else "",
        )

    def _send(
        self, tp: TopicPartition, generation: int, offset: int,
        topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], on_done: Any,
    ) -> None:
        """Produce one message; the event at ``offset`` is done when the broker acknowledged it."""

        async def send() -> None:
            while True:
                try:
                    future = await self.producer.send(topic, value=value, key=key, headers=headers)
                    await future
                    break
                except KafkaError as exc:
                    if self.metrics is not None:
                        self.metrics.event_failed("publish_error")
                    logger.error(
                        "producing to %s for %s offset %d failed (%s); retrying in %.0f s",
                        topic, _tp_name(tp), offset, exc, RESEND_DELAY_S,
                    )
                    await asyncio.sleep(RESEND_DELAY_S)
            on_done()
            self._mark_done(tp, generation, offset)

        self._spawn(send())

    def _mark_done(self, tp: TopicPartition, generation: int, offset: int) -> None:
        state = self._partitions.get(tp)
        if state is not None and state.generation == generation and state.tracker.mark_done(offset):
            state.num_done_since_commit += 1
            if self.health is not None:
                self.health.record_progress(tp, offset)
        self._progress.set()

    # -- commits ------------------------------------------------------------------------

    async def _maybe_commit(self, force: bool = False) -> None:
        due = time.monotonic() - self._last_commit >= self.settings.checkpoint.interval_s
        checkpointed = False
        for state in list(self._partitions.values()):
            many = state.num_done_since_commit >= self.settings.checkpoint.interval_events
            # Streams waiting for room need changed streams checkpointed (then dropped),
            # even where the committable offset did not move.
            for_room = due and bool(self._waiting_room) and bool(state.changed_streams)
            if (force or due or many) and (state.tracker.needs_commit() or for_room) and not state.revoking:
                checkpointed |= await self._commit_partition(state)
        if due or force:
            self._last_commit = time.monotonic()
        if checkpointed and self.hooks.snapshots_enabled:
            await self._offload_clean_streams()

    async def _offload_clean_streams(self) -> None:
        """Drop clean idle streams to the Redis tier and release the places of ended streams."""
        keep = set(self._waiting_room)
        for state in self._partitions.values():
            keep.update(state.changed_streams)
            keep.update(state.unacked)
        for stream_id in self._engine_streams:
            dispatcher = self._dispatcher
            if dispatcher.queued(stream_id) or dispatcher.in_flight(stream_id) or dispatcher.is_held(stream_id):
                keep.add(stream_id)
        max_host = self.settings.engine.max_host_streams
        # Streams waiting for room need every clean host-tier stream dropped, not a quarter.
        low_watermark = 0.0 if self._waiting_room else 0.75
        waiting = len(self._waiting_room)
        dropped, known = await self.runner.call(
            lambda engine: (offload_clean_streams(engine, keep, max_host, low_watermark, waiting),
                            set(engine.known_streams()))
        )
        if dropped:
            self._engine_streams.difference_update(dropped)
            self._offloaded.update(dropped)
            logger.debug("dropped %d clean idle streams to the Redis tier: %s", len(dropped), dropped)
        # Streams that ended have left the engine. Once their end is checkpointed, their
        # snapshot is deleted and they are not in keep, so they give back their admission place.
        ended = {stream_id for stream_id in self._engine_streams if stream_id not in known and stream_id not in keep}
        if ended:
            self._engine_streams.difference_update(ended)
            logger.debug("released %d ended streams: %s", len(ended), sorted(ended))
        self._admit_waiting()

    async def _commit_partition(self, state: PartitionState) -> bool:
        """Checkpoint and commit one partition; the steps are those of :mod:`worker.stage.hooks`.

        Events below the committable offset are done: their outputs are acknowledged.
        Steps 1 and 2 (flush, snapshots) run in :meth:`_checkpoint_streams`.
        """
        tp = state.tp
        next_offset = state.tracker.committable_offset()
        if self.hooks.snapshots_enabled and state.changed_streams:
            if not await self._checkpoint_streams(state, next_offset):
                return False
        # Step 3. Commit.
        try:
            await self.consumer.commit({tp: next_offset})
        except (CommitFailedError, KafkaError) as exc:
            logger.warning("committing %s offset %d failed: %s; retrying at the next checkpoint", _tp_name(tp), next_offset, exc)
            return False
        state.tracker.set_committed(next_offset)
        state.num_done_since_commit = 0
        logger.debug("committed %s offset %d", _tp_name(tp), next_offset)
        # Step 4. Mark the snapshots committed.
        if self.hooks.snapshots_enabled:
            await self.hooks.committed(tp, next_offset)
        if self.health is not None:
            self.health.record_checkpoint()
        if self.metrics is not None:
            self.metrics.checkpoints.inc()
        return True

    async def _checkpoint_streams(self, state: PartitionState, next_offset: int) -> bool:
        """Steps 1 and 2: quiesce the changed streams, wait for their outputs, snapshot them.

        A snapshot covers every event of its stream up to the stream's last applied
        offset, and a new owner skips those events after a restore. So each of their
        outputs (or dead letters) must be acknowledged before the snapshot is written,
        or a kill -9 would lose an output still in flight. Returns False (commit
        nothing) when the outputs are not acknowledged within ``ACK_WAIT_S``.
        """
        stream_ids = list(state.changed_streams)
        for stream_id in stream_ids:
            self._dispatcher.hold(stream_id)
        try:
            deadline = time.monotonic() + ACK_WAIT_S
            while any(self._dispatcher.in_flight(stream_id) for stream_id in stream_ids):
                # Skipping is safe: nothing is committed, the next checkpoint tries again.
                if self._stop.is_set():
                    logger.info("checkpoint of %s at offset %d skipped: the worker is stopping",
                                _tp_name(state.tp), next_offset)
                    return False
                if time.monotonic() >= deadline:
                    busy = sum(1 for stream_id in stream_ids if self._dispatcher.in_flight(stream_id))
                    logger.warning(
                        "checkpoint of %s at offset %d postponed: %d of its %d changed streams still had events in "
                        "the engine after %.0f s, so the engine is behind; the offset is committed at a later "
                        "checkpoint", _tp_name(state.tp), next_offset, busy, len(stream_ids), ACK_WAIT_S,
                    )
                    return False
                await self._wait_progress(0.05)
            # Step 1. Flush the producer: the outputs of the quiesced streams are acknowledged.
            if not await self._wait_acknowledged(state, stream_ids):
                return False
            # Step 2. Snapshot the streams changed since the last checkpoint.
            stream_offsets = {stream_id: state.changed_streams[stream_id] for stream_id in stream_ids}
            try:
                ok = await self.hooks.checkpoint(state.tp, stream_offsets, next_offset)
            except Exception:
                logger.exception("checkpoint of %s at offset %d failed; not committing", _tp_name(state.tp), next_offset)
                return False
            if ok:
                for stream_id, offset in stream_offsets.items():
                    if state.changed_streams.get(stream_id) == offset:
                        del state.changed_streams[stream_id]
            return ok
        finally:
            for stream_id in stream_ids:
                self._dispatcher.release(stream_id)
            self._dispatch()

    async def _wait_acknowledged(self, state: PartitionState, stream_ids: list[str]) -> bool:
        deadline = time.monotonic() + ACK_WAIT_S
        await self.producer.flush()
        while any(state.unacked.get(stream_id) for stream_id in stream_ids):
            if time.monotonic() >= deadline:
                logger.warning(
                    "outputs of %s are still unacknowledged after %.0f s; skipping this checkpoint "
                    "and retrying at the next one", _tp_name(state.tp), ACK_WAIT_S,
                )
                return False
            await self._wait_progress(0.05)
        return True

    # -- rebalances ---------------------------------------------------------------------

    async def handle_assigned(self, tps: list[TopicPartition]) -> None:
        self._generation += 1
        for tp in tps:
            self._partitions[tp] = PartitionState(tp, self._generation)
        if self.metrics is not None:
            self.metrics.rebalances.inc()
        if self.health is not None:
            self.health.set_assignment(self._partitions)
        logger.info("assigned %s", ", ".join(_tp_name(tp) for tp in sorted(tps)) or "no partitions")
        await self.hooks.on_assign(tps)

    async def handle_revoked(self, tps: list[TopicPartition]) -> None:
        """Finish or abandon in-flight work of ``tps`` within the grace period, commit, release."""
        states = [self._partitions[tp] for tp in tps if tp in self._partitions]
        if not states:
            return
        logger.info("revoking %s", ", ".join(_tp_name(state.tp) for state in states))
        # Partitions already drained by a shutdown are not given a second grace period.
        to_drain = [state for state in states if not state.revoking]
        if to_drain:
            await self._drain(self._stage.shutdown_grace_s, partitions=to_drain)
        stream_ids: set[str] = set()
        for state in states:
            stream_ids |= state.stream_ids
            del self._partitions[state.tp]
        await self._release_streams(stream_ids)
        await self.hooks.on_revoke(tps, stream_ids)
        if self.health is not None:
            self.health.set_assignment(self._partitions)

    async def _drain(self, grace_s: float, partitions: list[PartitionState] | None) -> None:
        """Wait up to ``grace_s`` for fetched events to be done, then commit what is committable."""
        states = partitions if partitions is not None else list(self._partitions.values())
        deadline = time.monotonic() + grace_s
        while any(state.tracker.num_not_done for state in states) and time.monotonic() < deadline:
            self._dispatch()
            await self._wait_progress(min(0.1, max(0.0, deadline - time.monotonic())))
        abandoned = sum(state.tracker.num_not_done for state in states)
        for state in states:
            if state.tracker.needs_commit():
                await self._commit_partition(state)
            state.revoking = True
        if abandoned:
            logger.warning(
                "abandoned %d unfinished events after the %.0f s grace period; they run again after the committed offset",
                abandoned, grace_s,
            )

    async def _release_streams(self, stream_ids: set[str]) -> None:
        """Forget the streams of revoked partitions and free their caches in the engine."""
        self._dispatcher.discard(lambda pending: pending.stream_id in stream_ids)
        for request_id, pending in list(self._in_engine.items()):
            if pending.stream_id in stream_ids:
                del self._in_engine[request_id]
        self._dispatcher.forget(stream_ids)
        self._engine_streams.difference_update(stream_ids)
        self._offloaded.difference_update(stream_ids)
        for stream_id in stream_ids:
            self._waiting_room.pop(stream_id, None)
        self._admit_waiting()
        if stream_ids:
            await self.runner.call(lambda engine: messages.drop_streams(engine, stream_ids))

    # -- helpers ------------------------------------------------------------------------

    def _update_pauses(self) -> None:
        """Pause partitions while the queue is full; resume them below three quarters.

        A partition also stays paused while the hooks report it unsafe (``should_pause``:
        no successful checkpoint for ``checkpoint.max_unsafe_s``), so uncommitted work
        cannot grow without bound while the snapshot store is down.
        """
        limit = self._stage.queue_max_events
        total = self._num_not_done()
        should_pause = getattr(self.hooks, "should_pause", None)
        for state in self._partitions.values():
            unsafe = should_pause is not None and should_pause(state.tp)
            if unsafe and not state.unsafe:
                logger.warning(
                    "pausing %s: no successful checkpoint for %.0f s (checkpoint.max_unsafe_s); fetching "
                    "stops and /readyz fails until a checkpoint succeeds, and events already fetched "
                    "keep running; check the snapshot store (Redis)",
                    _tp_name(state.tp), self.settings.checkpoint.max_unsafe_s,
                )
            elif state.unsafe and not unsafe:
                logger.warning("resuming %s: checkpoints succeed again", _tp_name(state.tp))
            state.unsafe = unsafe
            if not state.paused and (total >= limit or unsafe):
                self.consumer.pause(state.tp)
                state.paused = True
                self.stats.pauses += 1
            elif state.paused and total < limit * 3 // 4 and not unsafe:
                self.consumer.resume(state.tp)
                state.paused = False

    def _num_not_done(self) -> int:
        return sum(state.tracker.num_not_done for state in self._partitions.values())

    def _update_health(self) -> None:
        """Start a consumer lag update every ``LAG_INTERVAL_S`` seconds.

        The lag comes from the broker's end offsets rather than ``consumer.highwater()``,
        which changes only with fetch responses and so stays stale on a consumer that
        stopped fetching.
        """
        if self.health is None and self.metrics is None:
            return
        now = time.monotonic()
        if now - self._last_lag_update < LAG_INTERVAL_S or (self._lag_task is not None and not self._lag_task.done()):
            return
        self._last_lag_update = now
        self._lag_task = asyncio.get_running_loop().create_task(self._update_lag())

    async def _update_lag(self) -> None:
        """Read the end offsets of the assigned partitions for the lag; this also probes the broker.

        A probe that fails or times out marks Kafka disconnected in the health state (so
        ``/readyz`` fails and ``sinkstream_kafka_connected`` drops to 0) until one succeeds.
        """
        tps = list(self._partitions)
        try:
            if tps:
                end_offsets = await asyncio.wait_for(self.consumer.end_offsets(tps), LAG_INTERVAL_S)
            else:
                end_offsets = {}
                await asyncio.wait_for(self.consumer.topics(), LAG_INTERVAL_S)
        except Exception as exc:  # a metric must never stop the worker
            self._set_kafka_connected(False, exc)
            logger.debug("consumer lag of %d partitions not updated: %s", len(tps), exc)
            return
        self._set_kafka_connected(True)
        for tp, end_offset in end_offsets.items():
            state = self._partitions.get(tp)
            if state is None:
                continue
            position = state.tracker.committable_offset()
            if position is None:
                position = state.tracker.committed if state.tracker.committed is not None else 0
            lag = max(0, end_offset - position)
            if self.health is not None:
                self.health.update_partition(tp, position, lag)
            if self.metrics is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    def _set_kafka_connected(self, connected: bool, error: BaseException | None = None) -> None:
        if connected == self._kafka_connected:
            return
        self._kafka_connected = connected
        if self.health is not None:
            self.health.set_kafka_connected(connected)
        if connected and self._kafka_lost:
            logger.info("the Kafka broker responds again; reporting Kafka connected")
        if not connected:
            self._kafka_lost = True
            reason = (str(error) or type(error).__name__) if error is not None else "no response"
            logger.warning(
                "the Kafka broker did not respond within %.0f s (%s); reporting Kafka disconnected until it responds",
                LAG_INTERVAL_S, reason,
            )

    async def _wait_progress(self, timeout_s: float) -> None:
        self._progress.clear()
        try:
            await asyncio.wait_for(self._progress.wait(), timeout_s)
        except TimeoutError:
            pass

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a worker task failed; the worker stops", exc_info=task.exception())
            self._fatal = task.exception()
            self.request_stop()


@dataclass
class WorkerStats:
    """Counts and latencies of one worker run, for the demo and benchmark summaries."""

    consumed: int = 0
    outputs: int = 0
    dead_letters: int = 0
    pauses: int = 0
    max_not_done: int = 0  # most events fetched and not yet done at one time
    first_fetch_at: float | None = None  # time.monotonic() of the first record fetched
    last_output_at: float | None = None  # time.monotonic() of the last output acknowledged
    prompt_tokens: int = 0
    generated_tokens: int = 0
    max_evicted_tokens: dict[str, int] = field(default_factory=dict)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    # Event-to-output latencies of the most recent outputs, bounded so memory stays flat.
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))

    def record_result(self, pending: PendingEvent, result: Any) -> None:
        self.prompt_tokens += getattr(result, "prompt_tokens", 0) or 0
        self.generated_tokens += getattr(result, "generated_tokens", 0) or 0
        evicted = getattr(result, "evicted_tokens", 0) or 0
        self.max_evicted_tokens[pending.stream_id] = max(evicted, self.max_evicted_tokens.get(pending.stream_id, 0))

    @property
    def evicted_tokens(self) -> int:
        return sum(self.max_evicted_tokens.values())


def _tp_name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _short_key(key: bytes | None) -> str | None:
    if key is None:
        return None
    return key[:64].decode("utf-8", "replace")
