"""Send notifications at a fixed rate or concurrency, and summarize the answers.

Two load generators, each used for both sides of a comparison:

- :func:`run_wrk`: wrk (Debian's ``wrk`` package), closed loop at a fixed
  number of connections, every request a notification about an item of its
  own. wrk is written in C, so it leaves the most of the two cores to the
  servers it measures.
- :func:`offer` and :func:`drive`: a small asyncio HTTP/1.1 client, open loop
  at a fixed offered rate (latency counted from when each request was due,
  so a slow server cannot slow the load down and hide its own queueing), or
  closed loop at a fixed concurrency. Each answer is kept, body included.

Both are bounded in request count and in time.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.harness import BENCH_USER, BENCH_VERIFY_TOKEN, BenchError

# uvloop's loop.time() moves in whole milliseconds; latencies need better.
now = time.perf_counter

TIMEOUT = 10.0
"""Seconds a request may take: how long Mirror waited for an answer."""


@dataclass(frozen=True)
class Answer:
    """One request's fate."""

    due: float
    """Seconds after the start of the load at which the request was due."""
    latency: float
    """Seconds from when the request was due to the end of its answer."""
    status: int
    """The HTTP status; 0 for a timeout or a transport error."""
    body: bytes
    tag: str


@dataclass(frozen=True)
class Summary:
    """Throughput, latency percentiles and status counts of a load run."""

    requests: int
    seconds: float
    per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    errors: int
    """Requests not answered 200: other statuses, timeouts, transport errors."""

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as plain JSON values."""
        return dict(self.__dict__)


def summarize(answers: Sequence[Answer], seconds: float) -> Summary:
    """Summarize answers that arrived over ``seconds``."""
    latencies = sorted(answer.latency * 1000 for answer in answers)
    statuses = Counter(str(answer.status or "no answer") for answer in answers)
    ok = statuses.get("200", 0)

    return Summary(
        requests=len(answers),
        seconds=round(seconds, 2),
        per_second=round(ok / seconds, 1) if seconds else 0.0,
        p50_ms=round(percentile(latencies, 50), 2),
        p90_ms=round(percentile(latencies, 90), 2),
        p99_ms=round(percentile(latencies, 99), 2),
        max_ms=round(latencies[-1], 2) if latencies else 0.0,
        statuses=dict(sorted(statuses.items())),
        errors=len(answers) - ok,
    )


def percentile(ordered: Sequence[float], p: float) -> float:
    """Return the ``p``-th percentile of sorted values (nearest rank)."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))

    return ordered[rank]


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends POSTs and reads answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.is_open = True
        self.idle_since = now()

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        found = _CONTENT_LENGTH.search(head)
        if found is None:
            raise BenchError(f"An answer without Content-Length: {head[:200]!r}")
        body = await self.reader.readexactly(int(found.group(1)))
        if _CLOSE.search(head):
            self.close()

        return status, body

    def close(self) -> None:
        self.is_open = False
        self.writer.close()


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_CLOSE = re.compile(rb"(?i)\r\nconnection:\s*close")


IDLE_REUSE = 2.0
"""Seconds a connection may sit idle and still be reused.

uvicorn closes a keep-alive connection after 5 idle seconds. A client that
reuses one just as the server closes it sees the connection end before any
answer, through no fault of the app: HTTP clients avoid that race by
retiring idle connections sooner than the server does, and so does this one.
"""


class _Client:
    """Connections to one URL, reused while they stay open and fresh."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []

    def request(self, body: bytes) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nUser-Agent: mirrorflow-bench\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )

        return head.encode("ascii") + body

    async def send(self, body: bytes, *, within: float) -> tuple[int, bytes]:
        """POST ``body``; return the status and body, or 0 and the error's name."""
        connection = None
        while self._idle and connection is None:
            connection = self._idle.pop()
            if now() - connection.idle_since > IDLE_REUSE:
                connection.close()
                connection = None
        try:
            async with asyncio.timeout(within):
                if connection is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    connection = _Connection(reader, writer)
                    self._all.append(connection)
                status, answer = await connection.post(self.request(body))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            if connection is not None:
                connection.close()
            # No status: the body says what went wrong instead.
            return 0, type(exc).__name__.encode()

        if connection.is_open:
            connection.idle_since = now()
            self._idle.append(connection)

        return status, answer

    def close(self) -> None:
        for connection in self._all:
            if connection.is_open:
                connection.close()


Bodies = Callable[[int], tuple[bytes, str]]
"""Return the body of request number i and a tag to group answers by."""


async def offer(
    url: str,
    bodies: Bodies,
    *,
    rate: float,
    seconds: float,
    within: float = TIMEOUT,
    max_in_flight: int = 10_000,
) -> tuple[list[Answer], float]:
    """Send ``rate`` requests per second for ``seconds``, whatever the answers.

    At most ``max_in_flight`` requests wait at once; a request due while that
    many wait is sent late, and its lateness counts in its latency.

    Returns:
        The answers, and the seconds from the first request due to the last
        answer.
    """
    client = _Client(url)
    slots = asyncio.Semaphore(max_in_flight)
    answers: list[Answer] = []
    count = int(rate * seconds)
    start = now() + 0.05

    async def one(number: int, due: float) -> None:
        body, tag = bodies(number)
        async with slots:
            status, answer = await client.send(body, within=within)
        answers.append(Answer(due - start, now() - due, status, answer, tag))

    try:
        async with asyncio.TaskGroup() as group:
            for number in range(count):
                due = start + number / rate
                delay = due - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                group.create_task(one(number, due))
    finally:
        client.close()

    return answers, now() - start


async def drive(
    url: str,
    bodies: Bodies,
    *,
    concurrency: int,
    count: int,
    seconds: float,
    within: float = TIMEOUT,
) -> tuple[list[Answer], float]:
    """Keep ``concurrency`` requests waiting until ``count`` were sent or time's up.

    Returns:
        The answers, and the seconds the load lasted.
    """
    answers: list[Answer] = []
    numbers = iter(range(count))
    start = now()
    stop = start + seconds

    async def sender() -> None:
        client = _Client(url)
        try:
            for number in numbers:
                if now() > stop:
                    return
                body, tag = bodies(number)
                sent = now()
                status, answer = await client.send(body, within=within)
                answers.append(Answer(sent - start, now() - sent, status, answer, tag))
        finally:
            client.close()

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(sender())

    return answers, now() - start


_WRK_SCRIPT = """
-- One Mirror notification per request, each about an item of its own.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local counter = 0
function init(args)
  run, user, verify = args[1], args[2], args[3]
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"collection":"timeline","itemId":"%s-%d-%d","operation":"UPDATE",'
    .. '"userToken":"%s","verifyToken":"%s","userActions":[{"type":"SHARE"}]}',
    run, tid, counter, user, verify)
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,'
    .. '"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def wrk_path() -> str:
    """Return the wrk executable, or fail saying how to install it."""
    found = shutil.which("wrk")
    if found is None:
        raise BenchError(
            "This benchmark needs wrk, which is not on PATH. Install it with "
            "`apt-get install wrk` (Debian, Ubuntu) or `brew install wrk`."
        )

    return found


def run_wrk(
    url: str, *, run_id: str, connections: int, seconds: float, threads: int = 1
) -> Summary:
    """Load ``url`` with wrk at a fixed number of connections; summarize it.

    Every request is a notification about a fresh item (``<run_id>-<n>``), so
    that each one makes the webhook start a new workflow.
    """
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "notify.lua"
        script.write_text(_WRK_SCRIPT)
        completed = subprocess.run(
            [
                wrk_path(),
                f"--threads={threads}",
                f"--connections={connections}",
                f"--duration={max(1, round(seconds))}s",
                f"--timeout={TIMEOUT:g}s",
                f"--script={script}",
                url,
                "--",
                run_id,
                BENCH_USER,
                BENCH_VERIFY_TOKEN,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    line = next(
        (x for x in completed.stdout.splitlines() if x.startswith("BENCH_JSON ")),
        None,
    )
    if completed.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed with status {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    result = json.loads(line.removeprefix("BENCH_JSON "))
    elapsed = result["duration_us"] / 1e6
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    # wrk counts a request once its answer is read; a timeout is no answer.
    ok = result["requests"] - result["status"]

    return Summary(
        requests=result["requests"],
        seconds=round(elapsed, 2),
        per_second=round(max(ok, 0) / elapsed, 1),
        p50_ms=round(result["p50_us"] / 1000, 2),
        p90_ms=round(result["p90_us"] / 1000, 2),
        p99_ms=round(result["p99_us"] / 1000, 2),
        max_ms=round(result["max_us"] / 1000, 2),
        statuses={"non-2xx": result["status"], "timeout": result["timeout"]},
        errors=errors,
    )
