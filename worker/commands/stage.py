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
    from worker.stage.settings import check_files_exist, settings_from_args

    settings = settings_from_args(args)
    check_files_exist(settings)
    check_device(settings.engine.device)
    if settings.checkpoint.store == "redis":
        from worker.state.hooks import state_config

        state_config(settings)  # validates the SINKSTREAM_STATE_* variables before the model loads
    asyncio.run(run_worker(settings))
    return 0


def check_device(device: str) -> None:
    """Raise ConfigError unless ``device`` exists here, before the worker starts loading the model."""
    import torch

    from worker.exceptions import ConfigError

    parsed = torch.device(device)  # the settings allow only cpu, cuda and cuda:N
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"engine.device={device!r}: CUDA is not available here; set --engine.device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(
            f"engine.device={device!r}: this machine has {count} CUDA device(s), numbered from 0; "
            f"set --engine.device cuda:0 to cuda:{count - 1}"
        )


def run_demo_command(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(args)
