"""``mirrorflow dev`` runs everything, shares a photo, stops, and starts again."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

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


@dataclass
class Dev:
    """A running ``mirrorflow dev`` and the banner it printed."""

    process: subprocess.Popen[str]
    banner: str


@contextmanager
def running_dev(data_dir: Path, ports: DevPorts) -> Iterator[Dev]:
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
        banner: list[str] = []
        for line in dev.stdout:
            if "Ctrl-C stops everything" in line or banner:
                banner.append(line)
            if "mirrorflow demo share-photo" in line:
                break
            assert time.monotonic() < deadline, "mirrorflow dev never said it runs"
        else:
            pytest.fail(f"mirrorflow dev exited with {dev.wait()}")
        yield Dev(dev, "".join(banner))
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


async def demo_runs(address: str) -> list[str]:
    """Return the ids of the demo user's workflows on a Temporal server."""
    client = await Client.connect(address)

    return [
        execution.id
        async for execution in client.list_workflows("MirrorUserToken = 'demo'")
    ]


def test_dev_stores_a_shared_photo_and_restarts_on_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ports = dev_ports()
    emulator = f"http://127.0.0.1:{ports.emulator}"
    temporal = f"127.0.0.1:{ports.temporal}"

    with running_dev(data_dir, ports) as running:
        dev = running.process
        ready = httpx.get(f"http://127.0.0.1:{ports.webhook}/readyz", timeout=5)
        ui = httpx.get(f"http://127.0.0.1:{ports.ui}/", timeout=10)
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
        first_runs = asyncio.run(demo_runs(temporal))
    left_running = [pid for pid in children if Path(f"/proc/{pid}").exists()]

    with running_dev(data_dir, ports):
        again = httpx.get(f"http://127.0.0.1:{ports.webhook}/readyz", timeout=5)
        runs_after_restart = asyncio.run(demo_runs(temporal))

    for place in (
        f"http://127.0.0.1:{ports.webhook}/notify",
        f"http://127.0.0.1:{ports.ui}/namespaces/default/workflows",
        f"{emulator}/mirror/v1/",
        str((data_dir / "attachments").resolve()),
        str((data_dir / "intake.db").resolve()),
        f"mirrorflow demo share-photo --emulator {emulator}",
    ):
        assert place in running.banner
    assert ui.status_code == 200
    assert ready.json()["intake"]["backlog"] >= 0
    # The photo's run is still known to the dev server after the restart.
    assert len(first_runs) >= 1
    assert set(first_runs) <= set(runs_after_restart)

    assert ready.status_code == 200
    assert len(children) >= 4
    assert left_running == []
    assert dev.returncode == 0
    assert (data_dir / "temporal.db").exists()
    assert again.status_code == 200
