"""Keep attachment content once and hand it out in chunks.

Content lives in one of three forms, all behind :class:`Blob`:

- :class:`MemoryBlob`: the bytes themselves, for small uploads;
- :class:`FileBlob`: a temporary file, for uploads larger than the emulator's
  ``memory_limit_bytes``; each download opens the file on its own;
- :class:`GeneratedBlob`: no stored bytes at all, only a size and a seed; the
  content is computed on the fly by :func:`generated_chunks`, so a test or a
  benchmark can ask for hundreds of megabytes and recompute their checksum
  with :func:`generated_sha256` without ever holding them.

Downloads never copy a blob whole: :meth:`Blob.chunks` yields bounded pieces
of the requested byte range.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

GENERATED_BLOCK = 1 << 20
"""Bytes per block of generated content; each block is one SHAKE-128 output."""


class Blob(Protocol):
    """Content of known size that can be read in chunks, any number of times."""

    @property
    def size(self) -> int:
        """Return the content's length in bytes."""
        ...

    @property
    def sha256(self) -> str:
        """Return the hex SHA-256 digest of the whole content."""
        ...

    def chunks(self, start: int, stop: int, chunk_size: int) -> Iterator[bytes]:
        """Yield the bytes ``[start, stop)`` in pieces of at most ``chunk_size``."""
        ...

    def discard(self) -> None:
        """Release what the content holds; later reads may fail."""
        ...


class MemoryBlob:
    """Content held in memory, as one buffer that is never copied whole."""

    def __init__(
        self, data: bytes | bytearray | memoryview, sha256: str | None = None
    ) -> None:
        self._view = memoryview(data).toreadonly()
        self._sha256 = sha256 or hashlib.sha256(self._view).hexdigest()

    def __repr__(self) -> str:
        return f"MemoryBlob(size={self.size})"

    @property
    def size(self) -> int:
        """Return the content's length in bytes."""
        return self._view.nbytes

    @property
    def sha256(self) -> str:
        """Return the hex SHA-256 digest of the whole content."""
        return self._sha256

    def chunks(self, start: int, stop: int, chunk_size: int) -> Iterator[bytes]:
        """Yield the bytes ``[start, stop)`` in pieces of at most ``chunk_size``."""
        for offset in range(start, stop, chunk_size):
            yield bytes(self._view[offset : min(offset + chunk_size, stop)])

    def discard(self) -> None:
        """Drop the reference to the buffer."""
        self._view = memoryview(b"")


class FileBlob:
    """Content kept in a file that belongs to the emulator."""

    def __init__(self, path: Path, size: int, sha256: str) -> None:
        self.path = path
        self._size = size
        self._sha256 = sha256

    def __repr__(self) -> str:
        return f"FileBlob(path={str(self.path)!r}, size={self.size})"

    @property
    def size(self) -> int:
        """Return the content's length in bytes."""
        return self._size

    @property
    def sha256(self) -> str:
        """Return the hex SHA-256 digest of the whole content."""
        return self._sha256

    def chunks(self, start: int, stop: int, chunk_size: int) -> Iterator[bytes]:
        """Yield the bytes ``[start, stop)`` in pieces of at most ``chunk_size``."""
        with self.path.open("rb") as file:
            file.seek(start)
            remaining = stop - start
            while remaining > 0:
                chunk = file.read(min(chunk_size, remaining))
                if not chunk:
                    raise OSError(f"{self.path} ended {remaining} bytes early")
                remaining -= len(chunk)
                yield chunk

    def discard(self) -> None:
        """Delete the file; downloads already under way keep their handle."""
        self.path.unlink(missing_ok=True)


class GeneratedBlob:
    """Deterministic content computed from a seed whenever it is read."""

    def __init__(self, size: int, seed: str, sha256: str) -> None:
        self.seed = seed
        self._size = size
        self._sha256 = sha256

    def __repr__(self) -> str:
        return f"GeneratedBlob(size={self.size}, seed={self.seed!r})"

    @classmethod
    def create(cls, size: int, seed: str) -> GeneratedBlob:
        """Return the content of ``size`` bytes made from ``seed``.

        This reads the content once to compute its checksum: about a second
        for 200 MB. Call it off the event loop.
        """
        if size < 0:
            raise ValueError(f"Generated content needs a size >= 0, got {size}.")

        return cls(size, seed, generated_sha256(size, seed))

    @property
    def size(self) -> int:
        """Return the content's length in bytes."""
        return self._size

    @property
    def sha256(self) -> str:
        """Return the hex SHA-256 digest of the whole content."""
        return self._sha256

    def chunks(self, start: int, stop: int, chunk_size: int) -> Iterator[bytes]:
        """Yield the bytes ``[start, stop)`` in pieces of at most ``chunk_size``."""
        return generated_chunks(self.seed, start, stop, chunk_size)

    def discard(self) -> None:
        """Do nothing: generated content holds no bytes."""


def generated_block(seed: str, index: int) -> bytes:
    """Return block ``index`` of the content generated from ``seed``.

    Block ``i`` is the first :data:`GENERATED_BLOCK` bytes of SHAKE-128 over
    the UTF-8 text ``"<seed>/<i>"``; the content is the blocks one after the
    other, cut at its size.
    """
    return hashlib.shake_128(f"{seed}/{index}".encode()).digest(GENERATED_BLOCK)


def generated_chunks(
    seed: str, start: int, stop: int, chunk_size: int = GENERATED_BLOCK
) -> Iterator[bytes]:
    """Yield the bytes ``[start, stop)`` of the content generated from ``seed``."""
    offset = start
    while offset < stop:
        index, skip = divmod(offset, GENERATED_BLOCK)
        block = memoryview(generated_block(seed, index))
        end = min(GENERATED_BLOCK, skip + (stop - offset))
        for piece in range(skip, end, chunk_size):
            yield bytes(block[piece : min(piece + chunk_size, end)])
        offset += end - skip


def generated_sha256(size: int, seed: str) -> str:
    """Return the hex SHA-256 digest of ``size`` bytes generated from ``seed``."""
    digest = hashlib.sha256()
    for chunk in generated_chunks(seed, 0, size):
        digest.update(chunk)

    return digest.hexdigest()


class BlobWriter:
    """Collect streamed content in memory, moving to a file once it grows.

    Content up to ``memory_limit`` bytes ends as a :class:`MemoryBlob`; beyond
    that the bytes so far go to a file in ``folder`` and so does the rest.
    """

    def __init__(self, folder: Path, memory_limit: int) -> None:
        self.size = 0
        self._folder = folder
        self._memory_limit = memory_limit
        self._buffer = bytearray()
        self._digest = hashlib.sha256()
        self._file: tempfile._TemporaryFileWrapper[bytes] | None = None

    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` to the content."""
        self.size += len(chunk)
        self._digest.update(chunk)
        if self._file is None and self.size > self._memory_limit:
            self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (kept open)
                dir=self._folder, prefix="content-", delete=False
            )
            self._file.write(self._buffer)
            self._buffer = bytearray()
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._buffer += chunk

    def finish(self) -> Blob:
        """Return the content written so far as a blob."""
        if self._file is None:
            return MemoryBlob(self._buffer, self._digest.hexdigest())

        self._file.close()
        return FileBlob(Path(self._file.name), self.size, self._digest.hexdigest())

    def abort(self) -> None:
        """Forget the content, deleting its file if it had one."""
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            os.unlink(self._file.name)
