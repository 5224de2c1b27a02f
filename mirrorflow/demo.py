"""Act as a Glass user on the emulator, for demos: ``mirrorflow demo``."""

from __future__ import annotations

import struct
import zlib
from typing import Any

from emulator.testing import EmulatorAdmin


def demo_photo(width: int = 160, height: int = 120) -> bytes:
    """Return a small PNG picture (a colour gradient) made on the spot."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # no filter on this scanline
        for x in range(width):
            rows += bytes((x * 255 // width, y * 255 // height, 160))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(bytes(rows), 9)),
            chunk(b"IEND", b""),
        ]
    )


def share_photo(emulator_url: str, user: str) -> dict[str, Any]:
    """Make a user take a photo on Glass and share it; return what happened."""
    with EmulatorAdmin(emulator_url) as admin:
        return admin.share(
            user, demo_photo(), content_type="image/png", text="Shared from Glass"
        )
