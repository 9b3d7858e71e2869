"""The ``sinkstream`` command line.

Each subcommand lives in the module that implements it; that module exposes
``add_parser(subparsers)`` which registers the subcommand and sets ``func``.
Heavy imports (torch, transformers, aiokafka) happen inside the command functions,
so ``sinkstream --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from worker.logconfig import LOG_LEVELS, configure_logging
from worker.threads import configure_openmp_waiting

# Modules that register subcommands, in the order they appear in ``--help``.
COMMAND_MODULES = (
    "worker.commands.models",
    "worker.commands.generate",
    "worker.commands.stage",
    "worker.commands.tools",
    "worker.commands.snapshots",
    "worker.commands.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinkstream",
        description="Run a language model over endless Kafka text streams with bounded KV caches.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"logging level: {', '.join(LOG_LEVELS)} (default INFO); above DEBUG, each repeated aiokafka "
        "warning or error is logged at most once a minute",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # that command group is not part of this build
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_openmp_waiting()  # before any command imports torch
    # Progress bars of model loading interleave with the log lines of a service; the
    # environment can turn them back on. Read when huggingface_hub is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from worker.exceptions import SinkstreamError

    try:
        result = args.func(args)
    except SinkstreamError as exc:
        # Errors raised on purpose name the value and the fix; a traceback adds nothing for users.
        logging.getLogger("sinkstream").debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of the output (for example `head`) has exited, so stop quietly as other
        # command-line tools do. Pointing stdout at devnull keeps the exit flush from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (OSError, UnicodeDecodeError) as exc:
        logging.getLogger("sinkstream").debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.startswith(("aiokafka", "kafka", "redis")):
            logging.getLogger("sinkstream").debug("command failed", exc_info=True)
            # aiokafka's messages start with the class name already.
            message = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
            if type(exc).__name__ == "MessageSizeTooLargeError":
                hint = "the record is larger than the producer's max_request_size; send smaller events"
            elif type(exc).__module__.startswith("redis"):
                hint = "check the Redis URL (SINKSTREAM_REDIS__URL, --redis-url or --redis.url)"
            else:
                hint = "check the broker address (--bootstrap-servers or SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS)"
            print(f"error: {message}; {hint}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
