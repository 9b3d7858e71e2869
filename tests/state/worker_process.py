"""A worker process for the failover tests: the tiny test model, Redis snapshots, optional fault points.

Run as ``python -m tests.state.worker_process SETTINGS_JSON``. With ``FAULT_POINT`` set to
``forward``, ``checkpoint`` or ``snapshot_write``, the process creates the file named by
``FAULT_MARKER`` the ``FAULT_AFTER``-th time it reaches that point and then sleeps
there, so the test can kill it with SIGKILL at exactly that point:

- ``forward``: inside an engine step (a batched forward in progress);
- ``checkpoint``: after outputs were produced and before the snapshot and commit;
- ``snapshot_write``: between two chunk writes of a snapshot record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from tests.stage.conftest import ENGINE_CONFIG


def fault_reached(point: str) -> None:
    if os.environ.get("FAULT_POINT") != point:
        return
    count = int(os.environ.get("_FAULT_COUNT", "0")) + 1
    os.environ["_FAULT_COUNT"] = str(count)
    if count == int(os.environ.get("FAULT_AFTER", "1")):
        Path(os.environ["FAULT_MARKER"]).write_text(point)
        time.sleep(3600)  # blocks the thread the fault is in, until the test kills the process


def install_faults(engine, hooks) -> None:
    step = engine.step

    def faulty_step():
        if engine.has_work():
            fault_reached("forward")
        return step()

    engine.step = faulty_step

    checkpoint = hooks.checkpoint

    async def faulty_checkpoint(tp, stream_offsets, next_offset):
        fault_reached("checkpoint")
        return await checkpoint(tp, stream_offsets, next_offset)

    hooks.checkpoint = faulty_checkpoint

    store = hooks.store
    write_record = store.write_record

    async def faulty_write_record(stream_id, data, kind):
        # Write the first half of the chunks, reach the fault point, then write the rest.
        half = data[: len(data) // 2]
        await write_record(stream_id, half, kind)
        fault_reached("snapshot_write")
        return await write_record(stream_id, data, kind)

    store.write_record = faulty_write_record


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tests.models import load_tokenizer, tiny_model
    from worker.engine import EngineConfig, StreamEngine, load_from_model
    from worker.stage.app import run_worker
    from worker.stage.settings import load_settings
    from worker.state.hooks import from_worker_settings

    import torch

    torch.set_num_threads(1)
    settings = load_settings(values=json.loads(sys.argv[1]))
    engine = StreamEngine(load_from_model(tiny_model("llama"), load_tokenizer()), EngineConfig(**ENGINE_CONFIG))
    hooks = from_worker_settings(settings, engine)
    install_faults(engine, hooks)
    asyncio.run(run_worker(settings, engine=engine, hooks=hooks))


if __name__ == "__main__":
    main()
