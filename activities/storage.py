"""Keep attachment content in a local folder or a Google Cloud Storage bucket.

:func:`open_storage` chooses the backend from ``MIRRORFLOW_STORAGE_URL``:
``file:///abs/folder`` or ``file://./relative/folder`` for a folder on this
machine, ``gs://bucket/prefix`` for a bucket. Both backends keep one contract,
:class:`Storage`:

- Content arrives as an iterable of chunks and is streamed, never held whole;
  its size, SHA-256 and CRC32C are computed on the way.
- A write never overwrites. The first writer of a name wins; a later or
  concurrent writer gets the stored object back with ``created=False``.
- An object appears under its name only once it is complete and checked, and
  with its content type, SHA-256 and source metadata from the start.

Object names come from the functions below, so that every worker names the
same attachment the same way::

    {user}/timeline/{item}/{attachment}{ext}   an attachment's content
    {user}/locations/{location}.json           a location
    {user}/deleted/{item}                      the tombstone of a deleted item

The calls are synchronous and may block for as long as a transfer takes: call
them from a thread, never from an event loop.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import mimetypes
import os
import re
import string
import tempfile
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import unquote, urlsplit

import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage  # type: ignore[import-untyped]
from google.cloud.storage.exceptions import (  # type: ignore[import-untyped]
    DataCorruption,
)

from mirrorflow.errors import (
    ChecksumMismatch,
    ObjectNotFound,
    StorageError,
    StorageRejected,
)
from workflows.models import StoredObject

MiB = 1024 * 1024

# Content types seen on Glass, with the extension every worker must agree on.
_EXTENSIONS = {
    "application/json": ".json",
    "application/octet-stream": ".bin",
    "application/pdf": ".pdf",
    "audio/aac": ".aac",
    "audio/amr": ".amr",
    "audio/mp4": ".m4a",
    "audio/mpeg": ".mp3",
    "audio/ogg": ".ogg",
    "audio/wav": ".wav",
    "image/bmp": ".bmp",
    "image/gif": ".gif",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "text/html": ".html",
    "text/plain": ".txt",
    "video/3gpp": ".3gp",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
}
_CONTENT_TYPES = {ext: kind for kind, ext in reversed(_EXTENSIONS.items())}
_DEFAULT_CONTENT_TYPE = "application/octet-stream"

# A MimeTypes instance holds Python's built-in table only, not the machine's
# /etc/mime.types: workers on different hosts (same Python) agree on names.
_PYTHON_TYPES = mimetypes.MimeTypes()
_PLAIN_EXTENSION = re.compile(r"\.[a-z0-9]{1,8}")

_SAFE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "._-")
# Leaves room in a 255-byte file name for the extension, the sidecar's and the
# temporary file's suffixes.
_MAX_SEGMENT = 180
_SEGMENT_DIGEST = 32

# What link() fails with where a file system has no hard links.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})

_SIDECAR_SUFFIX = ".meta.json"
_PARTIAL_SUFFIX = ".partial"
_RESERVED_KEY = "sha256"

# Up to this size an upload to GCS is one request that carries the object's
# metadata; larger objects are streamed to a temporary object first.
_ONE_REQUEST_LIMIT = 8 * MiB
_READ_BLOCK = 1 * MiB


def extension_for(content_type: str) -> str:
    """Return the file extension for a content type, ``.bin`` when unknown."""
    kind = content_type.partition(";")[0].strip().lower()
    if kind in _EXTENSIONS:
        return _EXTENSIONS[kind]

    guessed = _PYTHON_TYPES.guess_extension(kind)
    if guessed is not None and _PLAIN_EXTENSION.fullmatch(guessed):
        return guessed

    return ".bin"


def object_name(
    user_token: str, item_id: str, attachment_id: str, content_type: str
) -> str:
    """Return the object name of an attachment's content."""
    user = _segment(user_token, "user_token")
    item = _segment(item_id, "item_id")
    attachment = _segment(attachment_id, "attachment_id")

    return f"{user}/timeline/{item}/{attachment}{extension_for(content_type)}"


def item_prefix(user_token: str, item_id: str) -> str:
    """Return the prefix shared by every attachment of one timeline item."""
    user = _segment(user_token, "user_token")
    item = _segment(item_id, "item_id")

    return f"{user}/timeline/{item}/"


def location_object_name(user_token: str, location_id: str) -> str:
    """Return the object name of a location, stored as JSON."""
    user = _segment(user_token, "user_token")
    location = _segment(location_id, "location_id")

    return f"{user}/locations/{location}.json"


def tombstone_name(user_token: str, item_id: str) -> str:
    """Return the object name that marks a timeline item as deleted.

    The tombstone lives outside :func:`item_prefix`, so that removing an item's
    content keeps the mark that it was deleted.
    """
    user = _segment(user_token, "user_token")
    item = _segment(item_id, "item_id")

    return f"{user}/deleted/{item}"


def _segment(value: str, what: str) -> str:
    """Return ``value`` as one safe, non-empty segment of an object name.

    Every byte of its UTF-8 form outside ``[A-Za-z0-9._-]`` is percent-encoded,
    and so is a leading dot, which rules out ``.``, ``..`` and hidden files. A
    segment that would be longer than ``_MAX_SEGMENT`` keeps its start and ends
    with ``~`` and a digest of the whole value; ``~`` is otherwise encoded, so
    such a segment never equals an encoded one.
    """
    if not value:
        raise ValueError(f"{what} is {value!r}; expected a non-empty string.")

    raw = value.encode("utf-8", errors="surrogatepass")
    encoded = "".join(
        chr(byte) if chr(byte) in _SAFE_CHARACTERS else f"%{byte:02X}" for byte in raw
    )
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded) <= _MAX_SEGMENT:
        return encoded

    head = encoded[: _MAX_SEGMENT - _SEGMENT_DIGEST - 1]
    escape = head.find("%", len(head) - 2)
    if escape != -1:
        head = head[:escape]
    digest = hashlib.sha256(raw).hexdigest()[:_SEGMENT_DIGEST]

    return f"{head}~{digest}"


class Storage(Protocol):
    """Where stored objects live: a local folder or a GCS bucket."""

    @property
    def url(self) -> str:
        """Return the storage URL this store was opened from."""
        ...

    def write_if_absent(
        self,
        name: str,
        chunks: Iterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
        expected_size: int | None = None,
    ) -> StoredObject:
        """Stream ``chunks`` into a new object, unless ``name`` is already taken.

        Nothing of ``chunks`` is read when the object exists already.

        Args:
            name: the object's name, as made by :func:`object_name`.
            chunks: the content, in pieces of any size.
            content_type: recorded with the object.
            metadata: string pairs recorded with the object, such as the
                user token and ids it came from; the key ``sha256`` is taken.
            expected_size: the size announced by the source, if any.

        Returns:
            The stored object; ``created`` is False when it existed before,
            and then describes what was stored first.

        Raises:
            ChecksumMismatch: the content is not ``expected_size`` bytes long,
                or the store holds other bytes than were read. Nothing is
                left under ``name``.
            StorageRejected: the store refused for a reason a retry cannot
                fix, such as a missing bucket or no permission.
            StorageError: the store failed or could not be reached.
            ValueError: ``name`` or ``metadata`` is malformed.
        """
        ...

    def describe(self, name: str) -> StoredObject | None:
        """Return what is stored under ``name`` (``created`` False), or None."""
        ...

    def read_metadata(self, name: str) -> dict[str, str] | None:
        """Return the metadata written with an object, or None if it is absent."""
        ...

    def read(self, name: str) -> bytes:
        """Return an object's whole content; meant for small objects and tests."""
        ...

    def exists(self, name: str) -> bool:
        """Return whether an object is stored under ``name``."""
        ...

    def delete(self, name: str) -> bool:
        """Delete an object; return whether there was one to delete."""
        ...

    def delete_prefix(self, prefix: str) -> list[str]:
        """Delete every object whose name starts with ``prefix``.

        ``prefix`` must end with ``/``, so that deleting item ``1`` cannot
        touch item ``10``. Unfinished uploads under it go too.

        Returns:
            The names of the deleted objects, sorted.
        """
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted names of the objects whose names start with ``prefix``."""
        ...


def open_storage(url: str) -> Storage:
    """Open the store named by a ``file://`` or ``gs://`` URL.

    A ``file://`` folder is created, owner-only, if it is missing. A ``gs://``
    bucket must exist; it is reached with Application Default Credentials, or
    anonymously through the emulator named by ``STORAGE_EMULATOR_HOST``.
    """
    parts = urlsplit(url)
    if parts.scheme == "file" and (parts.netloc or parts.path):
        host = "" if parts.netloc == "localhost" else parts.netloc
        return LocalStorage(Path(unquote(host + parts.path)))
    if parts.scheme == "gs" and parts.netloc:
        return GcsStorage(parts.netloc, unquote(parts.path))

    raise StorageRejected(
        f"Storage URL {url!r} is not supported: expected file:///path/to/folder, "
        "file://./relative/folder or gs://bucket/prefix."
    )


class _SourceFailed(Exception):
    """Carries an error of the chunks' source through the storage layer."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _marking_errors(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield ``chunks``, wrapping what their source raises in _SourceFailed.

    A source that fails (Mirror hung up, say) must not read as a storage
    failure, even when the storage client is the one pulling the chunks.
    """
    source = iter(chunks)
    while True:
        try:
            chunk = next(source)
        except StopIteration:
            return
        except Exception as exc:
            raise _SourceFailed(exc) from exc
        yield chunk


@contextmanager
def _source_errors_untouched() -> Iterator[None]:
    """Re-raise an error of the chunks' source as the source raised it."""
    try:
        yield
    except _SourceFailed as failed:
        raise failed.error from failed.error.__cause__


class _Digest:
    """The size, SHA-256 and CRC32C of content, updated chunk by chunk."""

    def __init__(self, name: str, expected_size: int | None) -> None:
        self.name = name
        self.expected_size = expected_size
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._crc32c = 0

    def update(self, chunk: bytes) -> None:
        """Account for the next chunk; fail as soon as it is one too many."""
        self.size += len(chunk)
        if self.expected_size is not None and self.size > self.expected_size:
            raise self._wrong_size("more than")

        self._sha256.update(chunk)
        self._crc32c = google_crc32c.extend(self._crc32c, chunk)

    def finish(self) -> None:
        """Check that the content ended at the expected size."""
        if self.expected_size is not None and self.size != self.expected_size:
            raise self._wrong_size("only")

    def _wrong_size(self, how: str) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"The source of {self.name!r} announced {self.expected_size} bytes "
            f"but sent {how} {self.size}; nothing was stored. A retry fetches "
            "the content again."
        )

    @property
    def sha256(self) -> str:
        """Return the hex SHA-256 digest of the content so far."""
        return self._sha256.hexdigest()

    @property
    def crc32c(self) -> str:
        """Return the CRC32C of the content so far, encoded the way GCS shows it."""
        return base64.b64encode(self._crc32c.to_bytes(4, "big")).decode("ascii")


def _check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise ValueError."""
    segments = name.split("/")
    if (
        "\x00" in name
        or any(not segment or segment.startswith(".") for segment in segments)
        or name.endswith((_SIDECAR_SUFFIX, _PARTIAL_SUFFIX))
    ):
        raise ValueError(
            f"Object name {name!r} is not valid: expected non-empty segments "
            "joined by '/', none starting with '.', and no name ending in "
            f"{_SIDECAR_SUFFIX!r} or {_PARTIAL_SUFFIX!r}; object_name() makes "
            "such names."
        )

    return name


def _check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid prefix to delete, else raise ValueError."""
    if not prefix.endswith("/"):
        raise ValueError(
            f"Prefix {prefix!r} does not end with '/'; expected a folder-like "
            "prefix such as item_prefix() returns."
        )

    _check_name(prefix[:-1])

    return prefix


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Return ``metadata`` as a dict if its keys and values are strings."""
    if _RESERVED_KEY in metadata:
        raise ValueError(
            f"Metadata key {_RESERVED_KEY!r} is reserved for the content's digest."
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ValueError(
                f"Metadata entry {key!r}: {value!r} is not valid; expected a "
                "non-empty string key and a string value."
            )

    return dict(metadata)


def _is_hidden(name: str) -> bool:
    """Return whether ``name`` is a sidecar or an unfinished upload."""
    base = name.rpartition("/")[2]

    return base.startswith(".") or base.endswith((_SIDECAR_SUFFIX, _PARTIAL_SUFFIX))


def _guess_content_type(name: str) -> str:
    """Return the content type implied by a name's extension."""
    extension = os.path.splitext(name)[1].lower()
    if extension in _CONTENT_TYPES:
        return _CONTENT_TYPES[extension]

    return _PYTHON_TYPES.guess_type(name)[0] or _DEFAULT_CONTENT_TYPE


class LocalStorage:
    """Objects as files under one folder, each with a JSON sidecar.

    An object ``a/b.jpg`` is the file ``<root>/a/b.jpg``; its content type,
    size, SHA-256 and metadata are in ``<root>/a/b.jpg.meta.json``. Files are
    written to a hidden temporary file in the same folder, flushed to disk,
    checked, and then hard-linked to their name, which fails if the name is
    taken: a crash or a concurrent writer never leaves a partial file under an
    object's name, and never replaces one. Files and folders are readable by
    their owner only.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        with _local_errors("create the storage folder", str(self.root)):
            _make_folders(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    @property
    def url(self) -> str:
        """Return the ``file://`` URL of the folder."""
        return self.root.as_uri()

    def write_if_absent(
        self,
        name: str,
        chunks: Iterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
        expected_size: int | None = None,
    ) -> StoredObject:
        """Stream ``chunks`` into a new file, unless ``name`` is already taken."""
        path = self._path(name)
        extra = _check_metadata(metadata)

        with _source_errors_untouched(), _local_errors("write", name):
            if path.is_file():
                return self._existing(name, path, content_type, extra)

            digest = _Digest(name, expected_size)
            with _temporary_file(path) as (partial, file):
                for chunk in _marking_errors(chunks):
                    digest.update(chunk)
                    file.write(chunk)
                digest.finish()
                file.flush()
                os.fsync(file.fileno())
                self._verify(name, partial, digest)

                try:
                    os.link(partial, path)
                except FileExistsError:
                    return self._existing(name, path, content_type, extra)
                except FileNotFoundError as exc:
                    raise StorageError(
                        f"The temporary file of {name!r} vanished before it was "
                        "complete, most likely removed by a concurrent delete; "
                        "a retry writes it again."
                    ) from exc
                except OSError as exc:
                    if exc.errno not in _NO_HARD_LINKS:
                        raise
                    raise StorageRejected(
                        f"Could not write {name!r}: the file system under "
                        f"{str(self.root)!r} does not support hard links, which "
                        "keep concurrent writers from replacing each other's "
                        "files. Choose a folder on a local disk."
                    ) from exc

            record = _Record(digest.size, digest.sha256, content_type, extra)
            _write_sidecar(path, record)
            _fsync_folder(path.parent)

        return StoredObject(
            name=name,
            size=digest.size,
            sha256=digest.sha256,
            content_type=content_type,
        )

    def describe(self, name: str) -> StoredObject | None:
        """Return what is stored under ``name``, or None."""
        path = self._path(name)
        with _local_errors("describe", name):
            if not path.is_file():
                return None
            record = _read_sidecar(path) or _record_from_file(path)

        return record.stored(name)

    def read_metadata(self, name: str) -> dict[str, str] | None:
        """Return the metadata written with an object, or None if it is absent."""
        path = self._path(name)
        with _local_errors("read the metadata of", name):
            if not path.is_file():
                return None
            record = _read_sidecar(path)

        return dict(record.metadata) if record else {}

    def read(self, name: str) -> bytes:
        """Return an object's whole content."""
        path = self._path(name)
        with _local_errors("read", name):
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise ObjectNotFound(f"No object {name!r} in {self.url}.") from None

    def exists(self, name: str) -> bool:
        """Return whether an object is stored under ``name``."""
        return self._path(name).is_file()

    def delete(self, name: str) -> bool:
        """Delete an object and its sidecar; return whether there was one."""
        path = self._path(name)
        with _local_errors("delete", name):
            # The sidecar goes first: a file without one is still described
            # correctly, a sidecar without its file would be a stray.
            _sidecar(path).unlink(missing_ok=True)
            try:
                path.unlink()
            except FileNotFoundError:
                return False

        return True

    def delete_prefix(self, prefix: str) -> list[str]:
        """Delete every file under ``prefix``, then its empty folders."""
        folder = self.root / _check_prefix(prefix)
        removed = []

        with _local_errors("delete", prefix):
            for parent, _, files in os.walk(folder, topdown=False):
                for file in files:
                    path = Path(parent, file)
                    path.unlink(missing_ok=True)
                    if not _is_hidden(file):
                        removed.append(path.relative_to(self.root).as_posix())
                # Fails, and keeps the folder, if a concurrent writer is using it.
                with suppress(OSError):
                    Path(parent).rmdir()

        return sorted(removed)

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted names of the objects whose names start with ``prefix``."""
        folder_name = prefix.rpartition("/")[0]
        folder = self.root / _check_name(folder_name) if folder_name else self.root
        names = []

        with _local_errors("list", prefix):
            for parent, _, files in os.walk(folder):
                for file in files:
                    name = Path(parent, file).relative_to(self.root).as_posix()
                    if name.startswith(prefix) and not _is_hidden(name):
                        names.append(name)

        return sorted(names)

    def _path(self, name: str) -> Path:
        return self.root / _check_name(name)

    def _existing(
        self, name: str, path: Path, content_type: str, metadata: dict[str, str]
    ) -> StoredObject:
        """Describe a file an earlier writer stored, completing its sidecar.

        A writer that crashed, or is still running, between linking the file
        and writing its sidecar leaves a file without one; this writer knows
        what the sidecar should say, so it writes it.
        """
        record = _read_sidecar(path)
        if record is None:
            record = _record_from_file(path, content_type, metadata)
            _write_sidecar(path, record)

        return record.stored(name)

    def _verify(self, name: str, partial: Path, digest: _Digest) -> None:
        """Check that the file on disk holds exactly the bytes that were read."""
        size, sha256 = _hash_file(partial)
        if size != digest.size or sha256 != digest.sha256:
            raise ChecksumMismatch(
                f"The file written for {name!r} holds {size} bytes with SHA-256 "
                f"{sha256}, but {digest.size} bytes with SHA-256 {digest.sha256} "
                "were read; it was discarded. Check the disk under "
                f"{str(self.root)!r}."
            )


class _Record:
    """What a sidecar says about its object."""

    def __init__(
        self, size: int, sha256: str, content_type: str, metadata: dict[str, str]
    ) -> None:
        self.size = size
        self.sha256 = sha256
        self.content_type = content_type
        self.metadata = metadata

    def stored(self, name: str) -> StoredObject:
        """Return the object described, as found in storage."""
        return StoredObject(
            name=name,
            size=self.size,
            sha256=self.sha256,
            content_type=self.content_type,
            created=False,
        )

    def to_json(self) -> str:
        """Return the record as the sidecar's JSON text."""
        fields = {
            "size": self.size,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "metadata": self.metadata,
        }

        return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _read_sidecar(path: Path) -> _Record | None:
    """Return the sidecar's record if it matches the file beside it."""
    try:
        fields = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        record = _Record(
            size=int(fields["size"]),
            sha256=str(fields["sha256"]),
            content_type=str(fields["content_type"]),
            metadata={str(k): str(v) for k, v in fields["metadata"].items()},
        )
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None  # Missing or damaged: the caller falls back to the file.
    # A sidecar left over from an earlier object of the same name.
    if record.size != path.stat().st_size:
        return None

    return record


def _record_from_file(
    path: Path, content_type: str | None = None, metadata: dict[str, str] | None = None
) -> _Record:
    """Return a record computed from the file itself."""
    size, sha256 = _hash_file(path)

    return _Record(
        size=size,
        sha256=sha256,
        content_type=content_type or _guess_content_type(path.name),
        metadata=metadata or {},
    )


def _write_sidecar(path: Path, record: _Record) -> None:
    """Write the sidecar of ``path`` atomically, replacing any earlier one."""
    sidecar = _sidecar(path)
    with _temporary_file(sidecar) as (partial, file):
        file.write(record.to_json().encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())
        os.replace(partial, sidecar)


def _hash_file(path: Path) -> tuple[int, str]:
    """Return the size and hex SHA-256 of a file, read block by block."""
    sha256 = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while block := file.read(_READ_BLOCK):
            sha256.update(block)
            size += len(block)

    return size, sha256.hexdigest()


@contextmanager
def _temporary_file(path: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """Open a hidden, owner-only file beside ``path``; remove it afterwards."""
    _make_folders(path.parent)
    try:
        fd, partial = _make_hidden_file(path)
    except FileNotFoundError:
        # A concurrent delete_prefix removed the new folder: make it again.
        _make_folders(path.parent)
        fd, partial = _make_hidden_file(path)

    try:
        with os.fdopen(fd, "wb") as file:
            yield Path(partial), file
    finally:
        Path(partial).unlink(missing_ok=True)


def _make_hidden_file(path: Path) -> tuple[int, str]:
    """Create an owner-only file named ``.<name>.<random>.partial`` beside ``path``."""
    prefix = f".{path.name}."

    return tempfile.mkstemp(prefix=prefix, suffix=_PARTIAL_SUFFIX, dir=path.parent)


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each owner-only."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with suppress(FileExistsError):
            path.mkdir(mode=0o700)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk, so a new name survives a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _local_errors(action: str, name: str) -> Iterator[None]:
    """Turn the operating system's errors into storage errors."""
    try:
        yield
    except (StorageError, ValueError):
        raise
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        raise StorageRejected(
            f"Could not {action} {name!r}: {exc}. Check that the worker's user "
            "may write there and that no file stands where a folder should, or "
            "choose another folder with MIRRORFLOW_STORAGE_URL."
        ) from exc
    except OSError as exc:
        raise StorageError(f"Could not {action} {name!r}: {exc}.") from exc


class GcsStorage:
    """Objects in a Google Cloud Storage bucket, under an optional prefix.

    The content type, SHA-256 and metadata are the object's own. An object of
    up to 8 MiB is sent in one request that carries all of them, on condition
    that the name is free (``if_generation_match=0``). A larger one is streamed
    in ``chunk_size`` pieces to a temporary object ``<name>.<hex>.partial``,
    checked, and then rewritten to its name with its metadata under the same
    condition, a copy that GCS makes inside the bucket.
    A crash may leave a ``.partial`` object behind: :meth:`delete_prefix`
    removes them, and so can a lifecycle rule on the suffix.

    The client's own retries are off: Temporal retries the activity, and each
    attempt shows in the workflow's history.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        chunk_size: int = 8 * MiB,
        timeout: float = 60.0,
    ) -> None:
        if chunk_size <= 0 or chunk_size % (256 * 1024):
            raise ValueError(
                f"chunk_size is {chunk_size}; expected a positive multiple of "
                "256 KiB, as GCS requires."
            )

        self.bucket_name = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._client = client if client is not None else _default_client()
        self._bucket = self._client.bucket(bucket)

    def __repr__(self) -> str:
        return f"GcsStorage({self.url!r})"

    @property
    def url(self) -> str:
        """Return the ``gs://`` URL of the bucket and prefix."""
        return f"gs://{self.bucket_name}/{self.prefix}"

    def write_if_absent(
        self,
        name: str,
        chunks: Iterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
        expected_size: int | None = None,
    ) -> StoredObject:
        """Stream ``chunks`` into a new object, unless ``name`` is already taken."""
        key = self._key(name)
        extra = _check_metadata(metadata)

        with _source_errors_untouched(), self._errors("write", name):
            # The emulator ignores if_generation_match on resumable uploads, so
            # look first; the condition still decides races on real GCS.
            found = self._bucket.get_blob(key, retry=None, timeout=self.timeout)
            if found is not None:
                return self._stored(name, found)

            digest = _Digest(name, expected_size)
            stream = _ChunkStream(_marking_errors(chunks), digest)
            small = expected_size is None or expected_size <= _ONE_REQUEST_LIMIT
            if small and stream.fill(_ONE_REQUEST_LIMIT):
                return self._upload_whole(
                    name, stream.read(), digest, content_type, extra
                )

            return self._upload_streamed(name, stream, digest, content_type, extra)

    def describe(self, name: str) -> StoredObject | None:
        """Return what is stored under ``name``, or None."""
        key = self._key(name)
        with self._errors("describe", name):
            blob = self._bucket.get_blob(key, retry=None, timeout=self.timeout)
            if blob is None:
                return None

            return self._stored(name, blob)

    def read_metadata(self, name: str) -> dict[str, str] | None:
        """Return the metadata written with an object, or None if it is absent."""
        key = self._key(name)
        with self._errors("read the metadata of", name):
            blob = self._bucket.get_blob(key, retry=None, timeout=self.timeout)
        if blob is None:
            return None
        metadata: dict[str, str] = dict(blob.metadata or {})
        metadata.pop(_RESERVED_KEY, None)

        return metadata

    def read(self, name: str) -> bytes:
        """Return an object's whole content."""
        blob = self._bucket.blob(self._key(name))
        with self._errors("read", name):
            try:
                content: bytes = blob.download_as_bytes(
                    retry=None, timeout=self.timeout
                )
            except api_exceptions.NotFound:
                self._raise_if_no_bucket()
                raise ObjectNotFound(f"No object {name!r} in {self.url}.") from None

        return content

    def exists(self, name: str) -> bool:
        """Return whether an object is stored under ``name``."""
        blob = self._bucket.blob(self._key(name))
        with self._errors("look for", name):
            found: bool = blob.exists(retry=None, timeout=self.timeout)

        return found

    def delete(self, name: str) -> bool:
        """Delete an object; return whether there was one."""
        blob = self._bucket.blob(self._key(name))
        with self._errors("delete", name):
            try:
                blob.delete(retry=None, timeout=self.timeout)
            except api_exceptions.NotFound:
                self._raise_if_no_bucket()
                return False

        return True

    def delete_prefix(self, prefix: str) -> list[str]:
        """Delete every object under ``prefix``, unfinished uploads included."""
        full_prefix = self.prefix + _check_prefix(prefix)
        removed = []

        with self._errors("delete", prefix):
            blobs = self._client.list_blobs(
                self._bucket, prefix=full_prefix, retry=None, timeout=self.timeout
            )
            for blob in blobs:
                with suppress(api_exceptions.NotFound):
                    blob.delete(retry=None, timeout=self.timeout)
                name = blob.name.removeprefix(self.prefix)
                if not _is_hidden(name):
                    removed.append(name)

        return sorted(removed)

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted names of the objects whose names start with ``prefix``."""
        names = []
        with self._errors("list", prefix):
            blobs = self._client.list_blobs(
                self._bucket,
                prefix=self.prefix + prefix,
                retry=None,
                timeout=self.timeout,
            )
            for blob in blobs:
                name = blob.name.removeprefix(self.prefix)
                if not _is_hidden(name):
                    names.append(name)

        return sorted(names)

    def _key(self, name: str) -> str:
        return self.prefix + _check_name(name)

    def _upload_whole(
        self,
        name: str,
        content: bytes,
        digest: _Digest,
        content_type: str,
        metadata: dict[str, str],
    ) -> StoredObject:
        """Send a small object and its metadata in one conditional request."""
        blob = self._bucket.blob(self._key(name))
        blob.metadata = {**metadata, _RESERVED_KEY: digest.sha256}
        try:
            blob.upload_from_file(
                io.BytesIO(content),
                size=len(content),
                content_type=content_type,
                if_generation_match=0,
                checksum="crc32c",
                retry=None,
                timeout=self.timeout,
            )
        except api_exceptions.PreconditionFailed:
            return self._existing(name)

        self._verify(name, blob, digest)

        return StoredObject(
            name=name,
            size=digest.size,
            sha256=digest.sha256,
            content_type=content_type,
        )

    def _upload_streamed(
        self,
        name: str,
        stream: _ChunkStream,
        digest: _Digest,
        content_type: str,
        metadata: dict[str, str],
    ) -> StoredObject:
        """Stream a large object to a temporary object, check it, then name it."""
        key = self._key(name)
        partial = self._bucket.blob(
            f"{key}.{uuid.uuid4().hex}{_PARTIAL_SUFFIX}", chunk_size=self.chunk_size
        )
        uploaded = False
        try:
            partial.upload_from_file(
                stream,
                content_type=content_type,
                if_generation_match=0,
                retry=None,
                timeout=self.timeout,
            )
            uploaded = True
            self._verify(name, partial, digest)

            blob = self._bucket.blob(key)
            blob.content_type = content_type
            blob.metadata = {**metadata, _RESERVED_KEY: digest.sha256}
            try:
                token = None
                while True:
                    token, _, _ = blob.rewrite(
                        partial,
                        token=token,
                        if_generation_match=0,
                        retry=None,
                        timeout=self.timeout,
                    )
                    if token is None:
                        break
            except api_exceptions.PreconditionFailed:
                return self._existing(name)

            self._verify(name, blob, digest)
        finally:
            if uploaded:
                # Best effort: a leftover is removed by delete_prefix or a
                # lifecycle rule, and must not hide what went wrong before.
                with suppress(api_exceptions.GoogleAPIError, OSError):
                    partial.delete(retry=None, timeout=self.timeout)

        return StoredObject(
            name=name,
            size=digest.size,
            sha256=digest.sha256,
            content_type=content_type,
        )

    def _verify(self, name: str, blob: Any, digest: _Digest) -> None:
        """Check GCS's size and CRC32C of ``blob`` against what was read."""
        size, crc32c = blob.size, blob.crc32c
        if size == digest.size and crc32c in (None, digest.crc32c):
            return

        with suppress(api_exceptions.GoogleAPIError, OSError):
            blob.delete(
                if_generation_match=blob.generation, retry=None, timeout=self.timeout
            )
        raise ChecksumMismatch(
            f"GCS holds {size} bytes with CRC32C {crc32c!r} for {name!r}, but "
            f"{digest.size} bytes with CRC32C {digest.crc32c!r} were read; the "
            "object was removed. A retry copies it again."
        )

    def _existing(self, name: str) -> StoredObject:
        """Describe the object that won the race for ``name``."""
        blob = self._bucket.get_blob(self._key(name), retry=None, timeout=self.timeout)
        if blob is None:
            raise StorageError(
                f"Object {name!r} was taken by another writer and then deleted "
                "before it could be described; a retry writes it again."
            )

        return self._stored(name, blob)

    def _stored(self, name: str, blob: Any) -> StoredObject:
        """Describe an object as GCS holds it, hashing it if no digest was kept."""
        sha256 = (blob.metadata or {}).get(_RESERVED_KEY) or self._hash_blob(blob)

        return StoredObject(
            name=name,
            size=int(blob.size),
            sha256=str(sha256),
            content_type=blob.content_type or _guess_content_type(name),
            created=False,
        )

    def _hash_blob(self, blob: Any) -> str:
        """Return the hex SHA-256 of an object stored without one, streamed."""
        sink = _HashingSink()
        blob.download_to_file(sink, retry=None, timeout=self.timeout)

        return sink.sha256.hexdigest()

    def _raise_if_no_bucket(self) -> None:
        """Raise StorageRejected if the bucket is missing, after a NotFound."""
        try:
            exists = self._bucket.exists(retry=None, timeout=self.timeout)
        except (api_exceptions.GoogleAPIError, OSError):
            return  # The caller reports the error it already has.
        if not exists:
            raise StorageRejected(
                f"Bucket {self.bucket_name!r} does not exist. Create it, or point "
                "MIRRORFLOW_STORAGE_URL at one that does."
            )

    @contextmanager
    def _errors(self, action: str, name: str) -> Iterator[None]:
        """Turn the client's errors into storage errors that say what to do."""
        where = f"{name!r} in {self.url}"
        try:
            yield
        except (StorageError, ValueError):
            raise
        except DataCorruption as exc:
            raise ChecksumMismatch(
                f"GCS holds other bytes than were read for {where}: {exc}"
            ) from exc
        except api_exceptions.NotFound as exc:
            self._raise_if_no_bucket()
            raise StorageError(
                f"Could not {action} {where}: {exc.message}. Something deleted "
                "an object the call relied on; a retry starts over."
            ) from exc
        except (api_exceptions.TooManyRequests, api_exceptions.ServerError) as exc:
            raise StorageError(
                f"GCS could not {action} {where} for now: {exc.code} {exc.message}."
            ) from exc
        except api_exceptions.ClientError as exc:
            raise StorageRejected(
                f"GCS refused to {action} {where}: {exc.code} {exc.message}. Check "
                "the bucket and the worker's permissions on it."
            ) from exc
        except api_exceptions.GoogleAPIError as exc:
            # Such as 408, which has no class of its own.
            raise StorageError(f"GCS could not {action} {where}: {exc}") from exc
        except auth_exceptions.DefaultCredentialsError as exc:
            raise StorageRejected(_NO_CREDENTIALS) from exc
        except (auth_exceptions.GoogleAuthError, OSError) as exc:
            # requests' connection errors and timeouts are OSErrors.
            raise StorageError(
                f"Could not reach GCS to {action} {where}: {exc}"
            ) from exc


_NO_CREDENTIALS = (
    "No Google credentials were found for gs:// storage. Run `gcloud auth "
    "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or set "
    "STORAGE_EMULATOR_HOST to use an emulator."
)


def _default_client() -> Any:
    """Return a client built from the environment (ADC, or the emulator)."""
    try:
        return storage.Client()
    except auth_exceptions.DefaultCredentialsError as exc:
        raise StorageRejected(_NO_CREDENTIALS) from exc


class _ChunkStream:
    """A read-only file over an iterator of chunks, checking them as they pass."""

    def __init__(self, chunks: Iterator[bytes], digest: _Digest) -> None:
        self._chunks = chunks
        self._digest = digest
        # Views, so that splitting a chunk between two reads copies nothing.
        self._pending: deque[memoryview] = deque()
        self._pending_size = 0
        self._position = 0
        self._exhausted = False

    def fill(self, limit: int) -> bool:
        """Read ahead until more than ``limit`` bytes wait; return if that was all."""
        while not self._exhausted and self._pending_size <= limit:
            self._pull()

        return self._exhausted

    def read(self, size: int = -1) -> bytes:
        """Return the next ``size`` bytes, or all the rest when ``size`` < 0."""
        # Chunks are pulled one at a time and copied out at once, so that no
        # more than one of them waits beside the bytes being returned.
        out = io.BytesIO()
        while size < 0 or out.tell() < size:
            if not self._pending:
                if self._exhausted:
                    break
                self._pull()
                continue
            view = self._pending.popleft()
            room = len(view) if size < 0 else size - out.tell()
            if len(view) > room:
                self._pending.appendleft(view[room:])
                view = view[:room]
            out.write(view)
        self._pending_size -= out.tell()
        self._position += out.tell()

        return out.getvalue()

    def tell(self) -> int:
        """Return how many bytes were read."""
        return self._position

    def _pull(self) -> None:
        chunk = next(self._chunks, None)
        if chunk is None:
            self._exhausted = True
            self._digest.finish()
            return

        self._digest.update(chunk)
        self._pending.append(memoryview(chunk))
        self._pending_size += len(chunk)


class _HashingSink:
    """A write-only file that keeps only the SHA-256 of what it is given."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        """Add ``data`` to the digest."""
        self.sha256.update(data)

        return len(data)
