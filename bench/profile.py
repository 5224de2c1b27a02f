"""Sample a running process with py-spy and say where its CPU time goes.

:func:`record` attaches py-spy to a process for a while (non-blocking, so
the process runs at its own speed) and keeps the sampled stacks in py-spy's
"raw" format, one collapsed stack per line, which flame graph tools read.
:func:`where_time_goes` turns them into two tables: CPU time by the code it
was spent in (the innermost frame's package or project file), and the share
of samples that passed through each of mirrorflow's own functions.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.harness import BenchError

PROJECT_FOLDERS = ("webhook/", "activities/", "workflows/", "mirrorflow/", "bench/")

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def py_spy() -> str:
    """Return the py-spy executable, or fail saying how to install it."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError(
            "Profiling needs py-spy: install it with `pip install py-spy` into "
            "the environment that runs the benchmark."
        )

    return found


def record(
    pid: int, output: Path, *, seconds: float | None = None
) -> subprocess.Popen[bytes]:
    """Start sampling ``pid``, for ``seconds`` or until :func:`stop`."""
    command = [py_spy(), "record", "--pid", str(pid), "--rate", "200"]
    # Only samples that hold the GIL: Python's CPU time, not its waiting.
    command += ["--gil", "--format", "raw", "--nonblocking", "--output", str(output)]
    if seconds is not None:
        command += ["--duration", str(max(1, round(seconds)))]

    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(recording: subprocess.Popen[bytes], output: Path) -> Breakdown:
    """Stop sampling (py-spy writes its output on SIGINT); break it down."""
    if recording.poll() is None:
        recording.send_signal(signal.SIGINT)
    try:
        recording.wait(timeout=60)
    except subprocess.TimeoutExpired:
        recording.kill()
        recording.wait()

    return where_time_goes(output)


@dataclass(frozen=True)
class Breakdown:
    """Where the sampled CPU time went, as shares of all samples."""

    samples: int
    by_code: list[tuple[str, float]]
    """The innermost frame's package or project file, and its share."""
    through: list[tuple[str, float]]
    """mirrorflow's own functions, and the share of samples inside each."""
    hottest: list[tuple[str, float]]
    """Innermost functions, and their share."""


def where_time_goes(raw: Path, *, top: int = 12) -> Breakdown:
    """Read py-spy's raw output and break the samples down."""
    by_code: Counter[str] = Counter()
    through: Counter[str] = Counter()
    hottest: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse(frame) for frame in stack.split(";")]
        total += count
        function, file = frames[-1]
        by_code[_area(file)] += count
        hottest[f"{function} ({_area(file)})"] += count
        seen = {
            f"{function} ({file})"
            for function, file in frames
            if file.startswith(PROJECT_FOLDERS) or file == "worker.py"
        }
        for name in seen:
            through[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [
            (name, round(100 * count / total, 1))
            for name, count in counter.most_common(top)
        ]

    if total == 0:
        raise BenchError(f"py-spy recorded no samples in {raw}.")

    return Breakdown(total, shares(by_code), shares(through), shares(hottest))


def _parse(frame: str) -> tuple[str, str]:
    matched = _FRAME.match(frame)
    if matched is None:
        return frame, ""
    file = matched["file"]
    for folder in PROJECT_FOLDERS:
        at = file.find("/" + folder)
        if at != -1 and "site-packages" not in file:
            file = file[at + 1 :]
            break

    return matched["function"], file


def _area(file: str) -> str:
    """Return the project file, or else the top-level package, of a file.

    py-spy shows files relative to ``sys.path``: ``temporalio/client.py``,
    ``socket.py``, ``asyncio/events.py``.
    """
    if file.startswith(PROJECT_FOLDERS) or file == "worker.py":
        return file
    if not file:
        return "native"

    return file.split("/", 1)[0].removesuffix(".py")
