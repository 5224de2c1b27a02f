"""Measure what one ``timeline.get`` costs with mirrorflow's Mirror client.

Starts an emulator on a free loopback port, creates a user with one item,
and times, over many rounds: parsing the discovery document, building the
client from the cached document and from a freshly parsed one, the call
alone, and build plus call (what an activity pays). Prints a table.

    .venv/bin/python bench/mirror_client.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from importlib.resources import files

import google_auth_httplib2
from googleapiclient.discovery import Resource, build_from_document

from activities import mirror
from emulator.testing import EmulatorAdmin, EmulatorProcess


def measure(rounds: int, step: Callable[[], object]) -> list[float]:
    """Return the milliseconds each of ``rounds`` runs of ``step`` took."""
    step()
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        step()
        timings.append((time.perf_counter() - started) * 1000)

    return timings


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    rounds = parser.parse_args().rounds

    with (
        EmulatorProcess.start("--log-level", "WARNING") as process,
        EmulatorAdmin(process.url) as admin,
    ):
        user = admin.create_user()
        item_id = admin.add_item(user, text="bench")["id"]
        credentials = mirror.credentials_from_info(user.credentials)
        root = admin.root_url
        text = files("activities").joinpath("mirror_v1.json").read_text("utf-8")

        def build_cached() -> None:
            mirror.build_mirror(credentials, root_url=root).close()

        def build_parsed() -> Resource:
            document = {**json.loads(text), "rootUrl": root}
            http = google_auth_httplib2.AuthorizedHttp(
                credentials, http=mirror.OneAttemptHttp(timeout=30)
            )
            service: Resource = build_from_document(document, http=http)
            return service

        with mirror.build_mirror(credentials, root_url=root) as service:
            get = service.timeline().get

            def call_only() -> None:
                get(id=item_id).execute()

            def build_and_call() -> None:
                with mirror.build_mirror(credentials, root_url=root) as fresh:
                    fresh.timeline().get(id=item_id).execute()

            def parse_build_and_call() -> None:
                with build_parsed() as fresh:
                    fresh.timeline().get(id=item_id).execute()

            results = {
                "parse the discovery document (json.loads)": measure(
                    rounds, lambda: json.loads(text)
                ),
                "build_mirror, cached document": measure(rounds, build_cached),
                "build, document parsed each time": measure(
                    rounds, lambda: build_parsed().close()
                ),
                "timeline.get on a built client": measure(rounds, call_only),
                "build_mirror + timeline.get": measure(rounds, build_and_call),
                "parse + build + timeline.get": measure(rounds, parse_build_and_call),
            }

    print(f"timeline.get against the emulator, {rounds} rounds, milliseconds\n")
    print(f"{'step':<45} {'median':>8} {'p95':>8} {'max':>8}")
    for name, timings in results.items():
        ordered = sorted(timings)
        p95 = ordered[int(len(ordered) * 0.95) - 1]
        median = statistics.median(ordered)
        print(f"{name:<45} {median:>8.3f} {p95:>8.3f} {ordered[-1]:>8.3f}")


if __name__ == "__main__":
    main()
