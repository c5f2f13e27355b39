"""A private redis-server for tests and benchmarks: started in a directory, stopped after.

Nothing here is storage-specific, so other test suites can use it too::

    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.unix_url)

It listens on a UNIX socket and on a free 127.0.0.1 port, persists with
``appendonly yes`` and ``appendfsync always`` (so a put that returned survives a kill),
and can be killed and restarted on the same directory, socket and port.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port P with P + 10000 free too: a cluster node's bus listens there."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server process with a generated configuration in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port() if port is None else port
        # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="wsd-redis-"))
        self.socket = self._socket_dir / "redis.sock"
        self.settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "dir": str(directory),
            "appendonly": "yes",
            "appendfsync": "always",
            "save": '""',
            "daemonize": "no",
            "logfile": str(directory / "redis.log"),
            **(settings or {}),
        }
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}?db=0"

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if not Path(REDIS_SERVER).exists():
            raise FileNotFoundError(f"redis-server not found at {REDIS_SERVER}")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "redis.conf"
        config.write_text("".join(f"{k} {v}\n" for k, v in self.settings.items()))
        self._process = subprocess.Popen(
            [REDIS_SERVER, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read() if self._process.stderr else b""
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited: {stderr.decode()} {tail}")
            try:
                with redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1) as client:
                    client.ping()
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"redis-server did not answer within {timeout} s") from None
                time.sleep(0.02)

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM (a clean shutdown), or SIGKILL to simulate a crash."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()

    def restart(self) -> None:
        """Start again on the same directory, socket and port, with its data."""
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        """A synchronous client on the UNIX socket, for test set-up and inspection."""
        return redis.Redis(unix_socket_path=str(self.socket))

    def cleanup(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._socket_dir)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()
