"""Prefect's scaled topology on one machine, as ``docs/scaling.md`` tells a user to run it.

PostgreSQL (a database made for this run and dropped afterwards) and Redis (a database number
of its own, flushed afterwards) hold Prefect's state and messages; two Prefect API servers run
without services behind HAProxy, the background services in a process of their own; two
``serve-flows`` processes serve the workflows against the load balancer (or, with
``serving="workers"``, two Prefect process workers on a work pool fed by ``prefect deploy
--all``); two orchestrator API replicas (``serve``) sit behind a second HAProxy; four runner
servers make the registry.

Every process is a real one, on 127.0.0.1, started with the commands of the docs, each in its
own process group so a test can kill one (``SIGKILL``) and start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Self

import httpx

from helpers import descendants

ROOT = Path(__file__).parents[1]
POSTGRES = os.environ.get("ORCHESTRATOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
BIN = Path(sys.executable).parent
CRASH_AFTER = 40
"""Seconds without a heartbeat before Prefect's automation crashes a run (docs say 90)."""
WORK_POOL = "default"
"""The work pool of the committed ``prefect.yaml`` (``runners-orchestrator deploy``'s default)."""
WORKER_QUERY_SECONDS = 1
"""``PREFECT_WORKER_QUERY_SECONDS`` of the workers: Prefect's 10 s would delay every start."""

HAPROXY_TEMPLATE = """\
global
    maxconn 4096
    log stdout format raw local0
defaults
    mode http
    # Only what went wrong (errors, retries, redispatches) reaches the process's log.
    log global
    option httplog
    option dontlog-normal
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 2
    option redispatch 1
    # A replica killed mid-request closes its connections without an answer: replay a GET
    # on the other one (never a POST: a start is not replayed behind the client's back).
    retry-on conn-failure empty-response response-timeout
frontend front
    bind 127.0.0.1:{port}
    default_backend back
backend back
    balance roundrobin
    http-request disable-l7-retry unless METH_GET || METH_HEAD
    option httpchk GET {health}
    default-server inter 500ms fall 2 rise 1
{servers}
"""
"""An HAProxy of two (or more) HTTP backends with a health check: what docs/scaling.md shows."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_config(port: int, health: str, backends: list[int]) -> str:
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    return HAPROXY_TEMPLATE.format(port=port, health=health, servers=servers)


async def _admin(sql: str) -> None:
    import asyncpg  # noqa: PLC0415 - Prefect's own PostgreSQL driver

    connection = await asyncpg.connect(f"{POSTGRES}/postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@dataclass
class Process:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out: IO[bytes] = self.log.open("ab")
        self.process = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    def kill(self) -> None:
        """SIGKILL it and every process below it: what a machine losing power does.

        Descendants are found through /proc, not the process group: Prefect starts each
        flow run's process in a session of its own, which a group signal would miss.
        """
        if self.process is not None and self.process.poll() is None:
            for pid in [self.process.pid, *descendants(self.process.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        """SIGSTOP: a process that hangs, its sockets still open."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_for(url: str, what: Process | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what is not None and not what.alive:
            msg = f"{what.name} exited:\n{what.tail()}"
            raise RuntimeError(msg)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == httpx.codes.OK:
                return
        time.sleep(0.2)
    msg = f"{url} did not answer within {timeout:.0f}s" + (f":\n{what.tail()}" if what else "")
    raise RuntimeError(msg)


@dataclass
class ScaledTopology:
    """The whole scaled stack; a context manager that makes and removes all of it."""

    runner_servers: int = 4
    runner_capacity: int = 4
    flow_runs_per_process: int = 8
    """``serve-flows --limit``: flow runs at once per serving process (each is a process)."""
    serving: Literal["serve-flows", "workers"] = "serve-flows"
    """Who runs the flow runs: two ``serve-flows``, or two Prefect process workers."""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="scaled-")))
    database: str = field(default_factory=lambda: f"ro_scaled_{uuid.uuid4().hex[:12]}")
    redis_db: int = field(default_factory=lambda: random.randint(2, 15))
    processes: dict[str, Process] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    # -- the environment of each kind of process --------------------------------------

    def prefect_server_env(self) -> dict[str, str]:
        """What every Prefect server process gets: docs/scaling.md, "Prefect's side"."""
        return {
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_HOST": REDIS_HOST,
            "PREFECT_REDIS_MESSAGING_PORT": str(REDIS_PORT),
            "PREFECT_REDIS_MESSAGING_DB": str(self.redis_db),
            "PREFECT_SERVER_DOCKET_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_KEEPALIVE_TIMEOUT": "75",
            "PREFECT_HOME": str(self.workdir / "prefect-home"),
        }

    def base_env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))
        }
        env["PYTHONUNBUFFERED"] = "1"
        env["PREFECT_HOME"] = str(self.workdir / "prefect-home")
        return env

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect-lb']}/api"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api-lb']}"

    @property
    def serving_processes(self) -> tuple[str, str]:
        """The names of the two processes that run flow runs."""
        if self.serving == "workers":
            return ("worker-1", "worker-2")
        return ("flows-1", "flows-2")

    def registry(self) -> str:
        servers = [
            {
                "id": f"runner-{i}",
                "url": f"http://127.0.0.1:{self.ports[f'runner-{i}']}/api/runner",
                "region": "us-east-1",
                "capacity": self.runner_capacity,
            }
            for i in range(self.runner_servers)
        ]
        return json.dumps({"type": "in-memory", "servers": servers})

    def client_env(self) -> dict[str, str]:
        """What serve-flows and the API replicas get: Prefect through its load balancer."""
        return {
            **self.base_env(),
            "PREFECT_API_URL": self.prefect_api,
            "ORCHESTRATOR_REGISTRY": self.registry(),
            "ORCHESTRATOR_CRASH_AFTER": str(CRASH_AFTER),
        }

    @property
    def database_url(self) -> str:
        """Prefect's PostgreSQL database, as SQLAlchemy's async driver names it."""
        return f"{POSTGRES.replace('postgresql://', 'postgresql+asyncpg://')}/{self.database}"

    def api_env(self) -> dict[str, str]:
        """The API replicas also keep history and alerts in Prefect's PostgreSQL."""
        return {**self.client_env(), "ORCHESTRATOR_MONITORING_DATABASE_URL": self.database_url}

    async def query(self, sql: str, *args: Any) -> list[Any]:
        """Rows of ``sql`` in Prefect's own database (the run's database)."""
        import asyncpg  # noqa: PLC0415 - Prefect's own PostgreSQL driver

        connection = await asyncpg.connect(f"{POSTGRES}/{self.database}")
        try:
            return list(await connection.fetch(sql, *args))
        finally:
            await connection.close()

    # -- processes ----------------------------------------------------------------------

    def _add(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        process = Process(name, args, env, self.workdir / f"{name}.log")
        self.processes[name] = process
        process.start()
        return process

    def _haproxy(self, name: str, health: str, backends: list[str]) -> Process:
        config = self.workdir / f"{name}.cfg"
        config.write_text(
            haproxy_config(self.ports[name], health, [self.ports[b] for b in backends])
        )
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        return self._add(name, [haproxy, "-W", "-db", "-f", str(config)], self.base_env())

    def restart(self, name: str) -> None:
        """Start a killed process again with the same command, ports and environment."""
        self.processes[name].stop()
        self.processes[name].start()

    def start(self) -> None:
        for name in (
            "prefect-1",
            "prefect-2",
            "prefect-lb",
            "api-1",
            "api-2",
            "api-lb",
            *(f"runner-{i}" for i in range(self.runner_servers)),
        ):
            self.ports[name] = free_port()
        asyncio.run(_admin(f'CREATE DATABASE "{self.database}"'))
        server_env = {**self.base_env(), **self.prefect_server_env()}
        prefect = str(BIN / "prefect")
        subprocess.run(
            [prefect, "server", "database", "upgrade", "-y"],
            env=server_env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        for name in ("prefect-1", "prefect-2"):
            # One after the other: two servers starting at once both register Prefect's
            # block types and one dies on the unique constraint.
            port = str(self.ports[name])
            args = [prefect, "server", "start", "--host", "127.0.0.1", "--port", port]
            self._add(name, [*args, "--no-services"], server_env)
            wait_for(f"http://127.0.0.1:{port}/api/health", self.processes[name])
        self._add("prefect-services", [prefect, "server", "services", "start"], server_env)
        self._haproxy("prefect-lb", "/api/health", ["prefect-1", "prefect-2"])
        cli = [sys.executable, "-m", "runners_orchestrator.cli"]
        for i in range(self.runner_servers):
            port = str(self.ports[f"runner-{i}"])
            args = ["runner-server", "--port", port, "--region", "us-east-1"]
            capacity = ["--capacity", str(self.runner_capacity), "--log-level", "warning"]
            self._add(f"runner-{i}", [*cli, *args, *capacity], self.base_env())
        wait_for(f"{self.prefect_api}/health", self.processes["prefect-lb"])
        if self.serving == "workers":
            self._start_workers()
        else:
            for name in ("flows-1", "flows-2"):
                args = ["serve-flows", "--limit", str(self.flow_runs_per_process)]
                self._add(name, [*cli, *args, "--log-level", "warning"], self.client_env())
        for name in ("api-1", "api-2"):
            args = ["serve", "--port", str(self.ports[name]), "--log-level", "warning"]
            self._add(name, [*cli, *args], self.api_env())
        self._haproxy("api-lb", "/api/orchestrator", ["api-1", "api-2"])
        for i in range(self.runner_servers):
            port = self.ports[f"runner-{i}"]
            wait_for(f"http://127.0.0.1:{port}/api/runner/health", self.processes[f"runner-{i}"])
        for name in ("api-1", "api-2"):
            wait_for(f"http://127.0.0.1:{self.ports[name]}/api/orchestrator", self.processes[name])
        wait_for(f"{self.api}/api/orchestrator", self.processes["api-lb"])
        self.wait_for_deployments(2)

    def _run(self, args: list[str], env: dict[str, str]) -> None:
        """One command to its end, its output in the log of the setup; raise if it fails."""
        with (self.workdir / "setup.log").open("ab") as log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            done = subprocess.run(
                args,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            )
        if done.returncode != 0:
            setup = (self.workdir / "setup.log").read_text(errors="replace")
            msg = f"{' '.join(args)} exited {done.returncode}:\n{setup[-3000:]}"
            raise RuntimeError(msg)

    def worker_env(self) -> dict[str, str]:
        """A worker's: heartbeats on (its flow runs inherit them), fast polling."""
        return {
            **self.client_env(),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_SECONDS),
        }

    def _start_workers(self) -> None:
        """docs/scaling.md, "Prefect workers instead of serve-flows", command for command."""
        prefect = str(BIN / "prefect")
        env = self.client_env()
        self._run([prefect, "work-pool", "create", WORK_POOL, "--type", "process"], env)
        self._run([prefect, "--no-prompt", "deploy", "--all"], env)
        self._run([sys.executable, "-m", "runners_orchestrator.crash_detection"], env)
        for name in ("worker-1", "worker-2"):
            args = [prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process"]
            limit = ["--limit", str(self.flow_runs_per_process), "--name", name]
            self._add(name, [*args, *limit], self.worker_env())

    def wait_for_deployments(self, runners: int, timeout: float = 90) -> None:
        """Until both workflows' deployments exist (each serve-flows registers them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                found = httpx.post(
                    f"{self.prefect_api}/deployments/filter",
                    json={"deployments": {"tags": {"all_": ["runners-orchestrator"]}}},
                    timeout=5,
                ).json()
                if len(found) >= runners:
                    return
            time.sleep(0.2)
        first = self.processes.get("flows-1") or self.processes["worker-1"]
        msg = "the deployments were not registered:\n" + first.tail()
        raise RuntimeError(msg)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
        with contextlib.suppress(Exception):
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        with contextlib.suppress(Exception):
            import redis  # noqa: PLC0415 - prefect-redis brings it

            redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.redis_db).flushdb()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            logs = "\n".join(f"== {p.name}\n{p.tail(15)}" for p in self.processes.values())
            self.stop()
            raise RuntimeError(f"the scaled topology did not start:\n{logs}") from None
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
