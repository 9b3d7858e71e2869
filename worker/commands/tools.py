"""Hand tools: ``topics create``, ``produce``, ``tail``, ``route`` and ``dev up``.

Every command reads the same ``SINKSTREAM_*`` environment variables as the worker
(``SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS`` and so on); the connection flags override them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from worker.exceptions import ConfigError, SinkstreamError
from worker.logconfig import LOG_LEVELS, configure_logging

logger = logging.getLogger(__name__)

_KAFKA_FLAGS = (
    ("--bootstrap-servers", "bootstrap_servers", "comma-separated host:port list of brokers (default 127.0.0.1:9092)"),
    ("--security-protocol", "security_protocol", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    ("--sasl-mechanism", "sasl_mechanism", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
    ("--sasl-username", "sasl_username", "SASL user name"),
    ("--ssl-cafile", "ssl_cafile", "CA bundle (PEM) that verifies the brokers"),
    ("--ssl-certfile", "ssl_certfile", "client certificate (PEM) for mutual TLS"),
    ("--ssl-keyfile", "ssl_keyfile", "client private key (PEM) for mutual TLS"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_topics_parser(subparsers)
    _add_produce_parser(subparsers)
    _add_tail_parser(subparsers)
    _add_route_parser(subparsers)
    _add_dev_parser(subparsers)


def _add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Kafka connection", "each flag overrides its SINKSTREAM_KAFKA__* variable; set the SASL password "
        "with SINKSTREAM_KAFKA__SASL_PASSWORD"
    )
    for flag, name, help_text in _KAFKA_FLAGS:
        env_name = f"SINKSTREAM_KAFKA__{name.upper()}"
        group.add_argument(
            flag, dest=f"kafka:{name}", default=argparse.SUPPRESS, metavar=name.upper(), help=f"{help_text} (env {env_name})"
        )


def _quiet_client_info() -> None:
    """Drop aiokafka's INFO lines (subscriptions, metadata changes), which mean nothing to a user of a tool.

    Warnings and errors still show, and ``--log-level DEBUG`` shows everything.
    """
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)


def load_tool_settings(args: argparse.Namespace, **sections: dict[str, Any]):
    """Build ``TopologySettings`` from the environment, the Kafka flags and ``sections``.

    Raises ConfigError naming each invalid field and its value, as the worker does.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from topology.config import TopologySettings
    from worker.stage.settings import check_environment_names, environment_json_error, validation_problems

    values: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if dest.startswith("kafka:"):
            values.setdefault("kafka", {})[dest.split(":", 1)[1]] = value
    for section, fields in sections.items():
        set_fields = {name: value for name, value in fields.items() if value is not None}
        if set_fields:
            values.setdefault(section, {}).update(set_fields)
    check_environment_names()
    try:
        return TopologySettings(**values)
    except ValidationError as exc:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(validation_problems(exc))) from exc
    except SettingsError as exc:
        raise environment_json_error(exc, TopologySettings.model_fields) from exc


# --------------------------------------------------------------------------------------
# sinkstream topics create


def _add_topics_parser(subparsers: argparse._SubParsersAction) -> None:
    topics = subparsers.add_parser("topics", help="manage the sinkstream topics")
    actions = topics.add_subparsers(dest="topics_action", metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create the ingress, events, outputs and dead-letter topics (existing topics are kept)",
        description="Create the sinkstream topics that do not exist. Sizes come from SINKSTREAM_TOPICS__<ROLE>__"
        "PARTITIONS, __REPLICATION_FACTOR and __RETENTION_MS; names from SINKSTREAM_KAFKA__EVENTS_TOPIC, "
        "__OUTPUTS_TOPIC, __DLQ_TOPIC and SINKSTREAM_ROUTER__INGRESS_TOPIC.",
    )
    create.add_argument(
        "--partitions", type=int, default=None, help="partitions of the ingress, events and outputs topics"
    )
    _add_kafka_arguments(create)
    create.set_defaults(func=run_topics_create)
    topics.set_defaults(func=lambda args: topics.print_help() or 2)


def run_topics_create(args: argparse.Namespace) -> int:
    from topology.topics import create_topics

    sizes = {}
    if args.partitions is not None:
        sizes = {role: {"partitions": args.partitions} for role in ("ingress", "events", "outputs")}
    settings = load_tool_settings(args, topics=sizes)
    results = asyncio.run(create_topics(settings.kafka, settings.topic_specs()))
    for result in results:
        state = "created" if result.created else "exists"
        note = f" (fewer than the {result.expected_partitions} configured)" if result.has_fewer_partitions else ""
        print(f"{result.name}: {state}, {_partitions(result.partitions)}{note}")
    return 1 if any(result.has_fewer_partitions for result in results) else 0


# --------------------------------------------------------------------------------------
# sinkstream produce


def _add_produce_parser(subparsers: argparse._SubParsersAction) -> None:
    produce = subparsers.add_parser(
        "produce",
        help="send text to a stream",
        description="Send events to a stream: each TEXT argument is one event; with --file or on stdin, each "
        "line (with its newline) is one event, and blank lines are skipped. Raw events are plain UTF-8 text keyed "
        "by the stream id, sent with a text/plain content type so that text which looks like JSON stays text. "
        "--json builds JSON events from the options below; --event-json sends JSON events written by hand. An empty "
        "TEXT is an error, except with --generate, where it requests a reply without new text, and with --no-check.",
    )
    produce.add_argument("text", nargs="*", metavar="TEXT", help="event texts; none reads --file or stdin")
    produce.add_argument("--stream", required=True, metavar="ID", help="stream id, the record key")
    produce.add_argument("--file", metavar="PATH", help="read events from this file, one per line")
    produce.add_argument("--json", action="store_true", help="send JSON events instead of raw text")
    produce.add_argument(
        "--event-json",
        action="store_true",
        help="each TEXT or line is a whole JSON event (see docs/messages.md), sent unchanged as the record value",
    )
    produce.add_argument(
        "--generate", action="store_true", help="ask for a reply after each event (implies --json)"
    )
    produce.add_argument(
        "--action", choices=("append", "generate", "reset", "end"), help="JSON action of each event (implies --json)"
    )
    produce.add_argument("--role", choices=("system", "user", "assistant"), help="chat role of the text (implies --json)")
    produce.add_argument("--max-new-tokens", type=int, help="reply length limit in tokens (with --generate)")
    produce.add_argument("--temperature", type=float, help="sampling temperature, 0 for greedy (with --generate)")
    produce.add_argument("--seed", type=int, help="sampling seed (with --generate)")
    produce.add_argument("--topic", help="topic to write to (default: the events topic)")
    produce.add_argument(
        "--via-router",
        action="store_true",
        help="write JSON events with a stream_id field and no key to the ingress topic, for the router",
    )
    produce.add_argument(
        "--no-check",
        action="store_true",
        help="send events even where the worker's validation would dead-letter them (to test the dead-letter topic)",
    )
    _add_kafka_arguments(produce)
    produce.set_defaults(func=run_produce)


def run_produce(args: argparse.Namespace) -> int:
    settings = load_tool_settings(args)
    _quiet_client_info()
    if not args.stream:
        raise ConfigError("--stream is empty; pass a non-empty stream id")
    topic = args.topic or (settings.router.ingress_topic if args.via_router else settings.kafka.events_topic)
    records = _event_json_records(args) if args.event_json else _built_records(args)
    if not args.no_check:
        _check_records(settings, args, records, topic)
    return asyncio.run(_send_records(settings.kafka, topic, records))


def _built_records(args: argparse.Namespace) -> list:
    """Build one raw or JSON event per TEXT or line from the command's options."""
    if args.generate and args.action not in (None, "generate"):
        raise ConfigError(f"--generate conflicts with --action {args.action}; drop one of them")
    action = args.action or ("generate" if args.generate else None)
    as_json = args.json or args.via_router or action is not None or args.role is not None
    sampling = args.max_new_tokens is not None or args.temperature is not None or args.seed is not None
    if action != "generate" and sampling:
        raise ConfigError("--max-new-tokens, --temperature and --seed need --generate (or --action generate)")
    texts = list(_event_texts(args))
    if action in ("reset", "end") and not texts:
        texts = [None]
    if not texts:
        raise ConfigError("no events to send: give TEXT arguments, --file PATH, or lines on stdin")
    _check_event_texts(args, texts, action)
    return [_produce_record(args, text, action, as_json) for text in texts]


def _event_json_records(args: argparse.Namespace) -> list:
    """Take each TEXT or line unchanged as a JSON event value, keyed by --stream (no key with --via-router)."""
    event_options = {
        "--json": args.json, "--generate": args.generate, "--action": args.action, "--role": args.role,
        "--max-new-tokens": args.max_new_tokens, "--temperature": args.temperature, "--seed": args.seed,
    }
    conflicting = [name for name, value in event_options.items() if value not in (None, False)]
    if conflicting:
        raise ConfigError(
            f"--event-json conflicts with {', '.join(conflicting)}: write those fields into the JSON event, "
            "or drop --event-json"
        )
    texts = [text.strip() for text in _event_texts(args)]
    if not texts:
        raise ConfigError("no events to send: give TEXT arguments, --file PATH, or lines on stdin")
    key = None if args.via_router else _encode_utf8(args.stream, "--stream")
    return [(key, _encode_utf8(text, "TEXT"), [("content-type", b"application/json")]) for text in texts]


def _encode_utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{name} contains bytes that are not valid UTF-8; pass UTF-8 text, or use --file with a UTF-8 file"
        ) from None


def _check_records(settings: Any, args: argparse.Namespace, records: list, topic: str) -> None:
    """Parse each record as the worker will, with these settings' limits; reject what it would dead-letter."""
    from worker.stage import messages

    limits = settings.stage.event_limits()
    for position, (key, value, headers) in enumerate(records, start=1):
        try:
            if args.via_router:  # checked as the router does: JSON only, with a stream_id field
                messages.parse_event(None, value, headers, topic, 0, 0, limits, accept_raw=False,
                                     require_key_match=False)
            else:
                messages.parse_event(key or args.stream.encode("utf-8"), value, headers, topic, 0, 0, limits,
                                     raw_action=settings.stage.raw_action)
        except messages.InvalidEventError as exc:
            raise ConfigError(
                f"event {position} would go to the dead-letter topic with reason {exc.reason}: {exc}; fix the "
                "argument (limits come from the stage settings), or pass --no-check to send it anyway"
            ) from None


def _check_event_texts(args: argparse.Namespace, texts: list[str | None], action: str | None) -> None:
    """Reject events that the worker would send to the dead-letter topic as invalid input."""
    if action in ("reset", "end"):
        if texts != [None]:
            raise ConfigError(
                f"--action {action} takes no text, but {len(texts)} "
                f"{'event text was' if len(texts) == 1 else 'event texts were'} given; send the text in "
                "a separate append event"
            )
        if args.role:
            raise ConfigError(f"--action {action} takes no --role; drop --role {args.role}")
        return
    if action == "generate" or args.no_check:
        return  # the worker reads an empty generate text as a request for a reply with no new text
    for position, text in enumerate(texts, start=1):
        if not text:
            raise ConfigError(
                f"TEXT argument {position} is empty, and the worker sends empty events to the dead-letter topic; "
                "pass non-empty text, or use --generate to request a reply without new text"
            )


def _event_texts(args: argparse.Namespace) -> Iterator[str | None]:
    if args.text:
        yield from args.text
    elif args.file:
        # Read bytes and decode line by line, so that an error can name the line.
        with open(args.file, "rb") as raw_lines:
            for number, raw in enumerate(raw_lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ConfigError(
                        f"--file {args.file}: line {number} is not valid UTF-8; convert the file to UTF-8"
                    ) from None
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"  # as text mode reads it
                if line.strip():
                    yield line
    elif not sys.stdin.isatty():
        yield from (line for line in sys.stdin if line.strip())


def _produce_record(
    args: argparse.Namespace, text: str | None, action: str | None, as_json: bool
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    for name, value in (("--stream", args.stream), ("TEXT", text), ("--role", args.role)):
        _encode_utf8(value or "", name)
    key = None if args.via_router else args.stream.encode("utf-8")
    if not as_json:
        # The header keeps text that happens to look like a JSON event from being read as one.
        return key, text.encode("utf-8"), [("content-type", b"text/plain; charset=utf-8")]
    event: dict[str, Any] = {"schema": 1, "stream_id": args.stream, "action": action or "append"}
    if text is not None:
        event["text"] = text
    if args.role:
        event["role"] = args.role
    if action == "generate":
        options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
        event["generate"] = {name: value for name, value in options.items() if value is not None}
    value = json.dumps(event, ensure_ascii=False).encode("utf-8")
    return key, value, [("content-type", b"application/json")]


async def _send_records(kafka, topic: str, records: list) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **kafka.aiokafka_kwargs(), acks="all", enable_idempotence=kafka.producer_idempotence
    )
    try:
        await producer.start()
        for key, value, headers in records:
            metadata = await producer.send_and_wait(topic, value, key=key, headers=headers)
            print(f"{metadata.topic}[{metadata.partition}]@{metadata.offset}")
    finally:
        await producer.stop()
    return 0


# --------------------------------------------------------------------------------------
# sinkstream tail


def _add_tail_parser(subparsers: argparse._SubParsersAction) -> None:
    tail = subparsers.add_parser(
        "tail",
        help="print outputs (or dead letters) as they arrive",
        description="Print the records of the outputs topic, or with --dlq the dead-letter topic. Reads without "
        "a consumer group, so it commits nothing and never takes records from the worker.",
    )
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest record, not the newest")
    tail.add_argument("--json-lines", action="store_true", help="print one JSON object per record")
    tail.add_argument("--stream", metavar="ID", help="only records of this stream id")
    tail.add_argument("--dlq", action="store_true", help="read the dead-letter topic")
    tail.add_argument("--topic", help="read this topic instead")
    tail.add_argument("--max-messages", type=int, metavar="N", help="stop after N printed records")
    tail.add_argument(
        "--idle-timeout", type=float, metavar="SECONDS", help="stop after SECONDS without a new record"
    )
    _add_kafka_arguments(tail)
    tail.set_defaults(func=run_tail)


def run_tail(args: argparse.Namespace) -> int:
    settings = load_tool_settings(args)
    _quiet_client_info()
    topic = args.topic or (settings.kafka.dlq_topic if args.dlq else settings.kafka.outputs_topic)
    try:
        return asyncio.run(_tail(settings.kafka, topic, args))
    except KeyboardInterrupt:
        return 0


async def _tail(kafka, topic: str, args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        **kafka.aiokafka_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
    )
    await consumer.start()
    printed = 0
    try:
        while args.max_messages is None or printed < args.max_messages:
            timeout_ms = int(args.idle_timeout * 1000) if args.idle_timeout is not None else 1000
            batches = await consumer.getmany(timeout_ms=timeout_ms)
            if not batches and args.idle_timeout is not None:
                break
            for record in _in_order(batches):
                if args.stream is not None and record.key != args.stream.encode("utf-8"):
                    continue
                print(format_record(record, json_lines=args.json_lines), flush=True)
                printed += 1
                if args.max_messages is not None and printed >= args.max_messages:
                    break
    finally:
        await consumer.stop()
    return 0


def _in_order(batches: dict) -> list:
    return [record for tp in sorted(batches, key=lambda tp: tp.partition) for record in batches[tp]]


def format_record(record: Any, json_lines: bool = False) -> str:
    """Format an output, dead letter or other record for ``sinkstream tail``."""
    from topology.schemas import OutputRecord, read_dead_letter

    where = f"{record.topic}[{record.partition}]@{record.offset}"
    key = record.key.decode("utf-8", errors="replace") if record.key is not None else None
    try:
        dead_letter = read_dead_letter(record.headers)
    except ValueError:
        dead_letter = None
    try:
        output = OutputRecord.from_json(record.value, record.headers) if dead_letter is None else None
    except ValueError:
        output = None
    value_text = (record.value or b"").decode("utf-8", errors="replace")

    if json_lines:
        line: dict[str, Any] = {"topic": record.topic, "partition": record.partition, "offset": record.offset, "key": key}
        if output is not None:
            line["output"] = json.loads(record.value)
            line["timings"] = output.timings()  # from the x-sinkstream-timings header
            line["worker_id"] = output.worker_id  # from the x-sinkstream-worker-id header
        else:
            line["value"] = value_text
        if dead_letter is not None:
            line["dead_letter"] = {
                "reason": dead_letter.reason, "message": dead_letter.message,
                "source": {"topic": dead_letter.topic, "partition": dead_letter.partition, "offset": dead_letter.offset},
            }
        return json.dumps(line, ensure_ascii=False)
    if dead_letter is not None:
        return (
            f"{where} key={key} DEAD LETTER {dead_letter.reason}: {dead_letter.message}\n"
            f"  from {dead_letter.topic}[{dead_letter.partition}]@{dead_letter.offset}: {value_text[:200]!r}"
        )
    if output is None:
        return f"{where} key={key}: {value_text}"
    ttft = f"{output.time_to_first_token_s:.3f}s" if output.time_to_first_token_s is not None else "-"
    return (
        f"[{output.stream_id}] {output.text}\n"
        f"  {where} event={output.event_id} finish={output.finish_reason} tokens: prompt={output.prompt_tokens} "
        f"generated={output.generated_tokens} cached={output.cached_tokens} evicted={output.evicted_tokens} "
        f"queued={output.queued_s:.3f}s ttft={ttft} total={output.total_s:.3f}s worker={output.worker_id}"
    )


# --------------------------------------------------------------------------------------
# sinkstream route


def _add_route_parser(subparsers: argparse._SubParsersAction) -> None:
    route = subparsers.add_parser(
        "route",
        help="run the faust router: ingress JSON events -> events topic keyed by stream id, or dead letters",
        description="Read JSON events with a stream_id field from the ingress topic, whatever their key, and "
        "write each to the events topic keyed by its stream id, or to the dead-letter topic with a reason. "
        "Runs until SIGINT or SIGTERM; settings come from flags and SINKSTREAM_ROUTER__* and SINKSTREAM_KAFKA__* "
        "variables.",
    )
    route.add_argument("--ingress-topic", help="topic to read (env SINKSTREAM_ROUTER__INGRESS_TOPIC)")
    route.add_argument("--app-id", help="faust app id and consumer group (env SINKSTREAM_ROUTER__APP_ID)")
    route.add_argument(
        "--web-port", type=int, help="port of faust's web server on 127.0.0.1, 0 for none (env SINKSTREAM_ROUTER__WEB_PORT)"
    )
    _add_kafka_arguments(route)
    route.set_defaults(func=run_route)


def run_route(args: argparse.Namespace) -> int:
    from topology.router import run_router

    settings = load_tool_settings(
        args, router={"ingress_topic": args.ingress_topic, "app_id": args.app_id, "web_port": args.web_port}
    )
    run_router(settings, loglevel=logging.getLevelName(logging.getLogger().level))
    return 0


# --------------------------------------------------------------------------------------
# sinkstream dev up


def _add_dev_parser(subparsers: argparse._SubParsersAction) -> None:
    dev = subparsers.add_parser("dev", help="local development services")
    actions = dev.add_subparsers(dest="dev_action", metavar="ACTION")
    up = actions.add_parser(
        "up",
        help="start a Tansu broker and a Redis on 127.0.0.1, create the topics, and wait for Ctrl-C",
        description="Start a Tansu Kafka broker and a redis-server on 127.0.0.1 (in memory, nothing on disk), "
        "create the sinkstream topics and print the environment variables that point the worker at them. "
        "Ctrl-C or SIGTERM stops both.",
    )
    up.add_argument("--kafka-port", type=int, default=9092, help="broker port; 0 picks a free one (default 9092)")
    up.add_argument("--redis-port", type=int, default=0, help="Redis port; 0 picks a free one (default 0)")
    up.add_argument("--no-redis", action="store_true", help="start only the broker")
    up.add_argument("--partitions", type=int, default=None, help="partitions of the ingress, events and outputs topics")
    up.set_defaults(func=run_dev_up)
    dev.set_defaults(func=lambda args: dev.print_help() or 2)


def run_dev_up(args: argparse.Namespace) -> int:
    from topology.topics import create_topics
    from worker.devservices import HOST, start_broker, start_redis

    for name, port in (("--kafka-port", args.kafka_port), ("--redis-port", args.redis_port)):
        if port and not _port_is_free(port):
            raise ConfigError(f"port {port} on {HOST} is in use; pass {name} with another port, or 0 for a free one")

    stop_requested = threading.Event()
    previous_handlers = {
        signum: signal.signal(signum, lambda *_: stop_requested.set()) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    services = []
    try:
        broker = start_broker(port=args.kafka_port or None)
        services.append(broker)
        redis = None if args.no_redis else start_redis(port=args.redis_port or None)
        if redis is not None:
            services.append(redis)
        sizes = {}
        if args.partitions is not None:
            sizes = {role: {"partitions": args.partitions} for role in ("ingress", "events", "outputs")}
        settings = load_tool_settings(args, kafka={"bootstrap_servers": broker.bootstrap_servers}, topics=sizes)
        for result in asyncio.run(create_topics(settings.kafka, settings.topic_specs())):
            print(f"topic {result.name}: {_partitions(result.partitions)}")
        _print_environment(broker, redis)
        while not stop_requested.wait(0.5):
            dead = [service for service in services if not service.alive()]
            if dead:
                logger.error("%s exited; stopping the other services (log %s)", dead[0].name, dead[0].log_path)
                return 1
        print("stopping", flush=True)
        return 0
    finally:
        for service in reversed(services):
            service.stop()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _partitions(count: int) -> str:
    return f"{count} partition" if count == 1 else f"{count} partitions"


def _print_environment(broker, redis) -> None:
    print(f"Kafka (Tansu): {broker.bootstrap_servers}")
    if redis is not None:
        print(f"Redis:         {redis.url}")
    print("Use these settings in other shells:")
    print(f"export SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}")
    if redis is not None:
        # Workers snapshot stream caches only with the redis checkpoint store (default none).
        print(f"export SINKSTREAM_REDIS__URL={redis.url}")
        print("export SINKSTREAM_CHECKPOINT__STORE=redis")
    print("Press Ctrl-C to stop.", flush=True)


def _port_is_free(port: int) -> bool:
    import socket

    from worker.devservices import HOST

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Run one of these tools without the rest of the ``sinkstream`` command line."""
    parser = argparse.ArgumentParser(prog="python -m worker.commands.tools")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help=f"logging level: {', '.join(LOG_LEVELS)} (default INFO)")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SinkstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
