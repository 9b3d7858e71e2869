"""``sinkstream worker`` (the Kafka worker) and ``sinkstream demo`` (local end-to-end demo)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from worker.stage.settings import add_settings_arguments

    worker = subparsers.add_parser(
        "worker",
        help="consume the events topic and produce outputs until SIGTERM",
        description="Run one worker of the consumer group. Every setting is also read from "
        "SINKSTREAM_<SECTION>__<FIELD> variables and from a YAML file given with --config.",
    )
    add_settings_arguments(worker)
    worker.set_defaults(func=run_worker_command)

    demo = subparsers.add_parser(
        "demo",
        help="start a local broker and Redis, stream MT-Bench and Moby-Dick through a worker, print outputs",
    )
    from worker.demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo_command)


def run_worker_command(args: argparse.Namespace) -> int:
    import asyncio

    from worker.stage.app import run_worker
    from worker.stage.settings import settings_from_args

    settings = settings_from_args(args)
    asyncio.run(run_worker(settings))
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(args)
