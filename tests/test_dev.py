"""``mirrorflow dev`` runs everything, shares a photo, stops, and starts again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from mirrorflow.dev import DevPorts, PortInUse, check_ports_free
from tests.fixtures.servers import free_port


def dev_ports() -> DevPorts:
    """Return four free loopback ports for one ``mirrorflow dev``."""
    return DevPorts(
        temporal=free_port(), ui=free_port(), emulator=free_port(), webhook=free_port()
    )


def test_check_ports_names_the_taken_port_and_its_flag() -> None:
    ports = dev_ports()

    with socket.socket() as taken:
        taken.bind((ports.host, ports.emulator))
        taken.listen()
        with pytest.raises(PortInUse) as caught:
            check_ports_free(ports)

    assert str(ports.emulator) in str(caught.value)
    assert "--emulator-port" in str(caught.value)


@contextmanager
def running_dev(data_dir: Path, ports: DevPorts) -> Iterator[subprocess.Popen[str]]:
    """Run ``mirrorflow dev`` until its banner is out; stop it with Ctrl-C after."""
    command = [
        sys.executable,
        "-m",
        "mirrorflow",
        "dev",
        "--data-dir",
        str(data_dir),
        *(part for flag, port in ports.flags().items() for part in (flag, str(port))),
    ]
    env = {**os.environ, "MIRRORFLOW_LOG_LEVEL": "WARNING"}
    dev = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert dev.stdout is not None
        deadline = time.monotonic() + 90
        for line in dev.stdout:
            if "Ctrl-C stops everything" in line:
                break
            assert time.monotonic() < deadline, "mirrorflow dev never said it runs"
        else:
            pytest.fail(f"mirrorflow dev exited with {dev.wait()}")
        yield dev
    finally:
        dev.send_signal(signal.SIGINT)
        dev.communicate(timeout=60)


def children_of(pid: int) -> list[int]:
    """Return the live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))

    return found


def test_dev_stores_a_shared_photo_and_restarts_on_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ports = dev_ports()
    emulator = f"http://127.0.0.1:{ports.emulator}"

    with running_dev(data_dir, ports) as dev:
        ready = httpx.get(f"http://127.0.0.1:{ports.webhook}/readyz", timeout=5)
        share = [sys.executable, "-m", "mirrorflow", "demo", "share-photo"]
        subprocess.run(
            [*share, "--emulator", emulator],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 60
        while not list((data_dir / "attachments" / "demo").rglob("*.png")):
            assert time.monotonic() < deadline, "the shared photo was never stored"
            time.sleep(0.2)
        children = children_of(dev.pid)
    left_running = [pid for pid in children if Path(f"/proc/{pid}").exists()]

    with running_dev(data_dir, ports):
        again = httpx.get(f"http://127.0.0.1:{ports.webhook}/readyz", timeout=5)

    assert ready.status_code == 200
    assert len(children) >= 4
    assert left_running == []
    assert dev.returncode == 0
    assert (data_dir / "temporal.db").exists()
    assert again.status_code == 200
