"""Compare the two ways an activity can call Mirror, in one run.

    python -m bench.mirror_calls [--quick] [--rounds 300]

Before: a client built per activity (:func:`activities.mirror.build_mirror`),
whose ``timeline()`` rebuilds the resource's methods on every call. After:
resources built once per process (:func:`activities.mirror.shared_resource`)
and each request sent with the user's own HTTP client. Both fetch a
timeline item and an attachment's metadata from the emulator, as
``fetch_item`` and ``fetch_attachment`` do; the table gives milliseconds
per call (wall clock, one thread) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from activities import mirror
from bench.report import Cell, markdown_table, ratio, save
from emulator.testing import EmulatorAdmin, EmulatorProcess


def measure(rounds: int, step: Callable[[], object]) -> float:
    """Return the median milliseconds of ``rounds`` runs of ``step``."""
    step()
    timings = []
    for _ in range(rounds):
        began = time.perf_counter()
        step()
        timings.append((time.perf_counter() - began) * 1000)

    return round(statistics.median(timings), 3)


def main() -> None:
    """Run both ways against the emulator and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="50 rounds")
    args = parser.parse_args()
    rounds = 50 if args.quick else args.rounds

    with (
        EmulatorProcess.start("--log-level", "WARNING") as process,
        EmulatorAdmin(process.url) as admin,
    ):
        user = admin.create_user()
        item, attachment = admin.add_item_with_attachment(user, b"\xff\xd8" + b"0" * 99)
        credentials = mirror.credentials_from_info(user.credentials)
        root = admin.root_url

        def item_before() -> Any:
            with mirror.build_mirror(credentials, root_url=root) as service:
                return service.timeline().get(id=item["id"]).execute()

        def item_after() -> Any:
            request = mirror.shared_resource(root, "timeline").get(id=item["id"])
            http = mirror.user_http(credentials)
            try:
                return request.execute(http=http)
            finally:
                http.close()

        ids = {"itemId": item["id"], "attachmentId": attachment["id"]}

        def attachment_before() -> Any:
            with mirror.build_mirror(credentials, root_url=root) as service:
                return service.timeline().attachments().get(**ids).execute()

        def attachment_after() -> Any:
            resource = mirror.shared_resource(root, "timeline", "attachments")
            http = mirror.user_http(credentials)
            try:
                return resource.get(**ids).execute(http=http)
            finally:
                http.close()

        rows: list[list[Cell]] = []
        results = {}
        for name, before, after in (
            ("timeline.get (fetch_item)", item_before, item_after),
            ("attachments.get (fetch_attachment)", attachment_before, attachment_after),
        ):
            assert before() == after()
            was, now = measure(rounds, before), measure(rounds, after)
            results[name] = {"before_ms": was, "after_ms": now}
            rows.append([name, was, now, ratio(now, was)])

    text = markdown_table(
        ["Mirror call", "before ms", "after ms", "after ÷ before"], rows
    )
    print(f"{rounds} rounds each, median\n\n{text}")
    save("mirror_calls", {"rounds": rounds, "calls": results, "table": text})


if __name__ == "__main__":
    main()
