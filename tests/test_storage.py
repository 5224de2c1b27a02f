"""Tests of the storage layer, against a real folder and a real GCS emulator."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import string
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import pytest
from google.cloud import storage  # type: ignore[import-untyped]
from hypothesis import assume, given
from hypothesis import strategies as st

from activities.storage import (
    GcsStorage,
    LocalStorage,
    Storage,
    extension_for,
    item_prefix,
    location_object_name,
    object_name,
    open_storage,
    tombstone_name,
)
from mirrorflow.errors import (
    ChecksumMismatch,
    ObjectNotFound,
    StorageError,
    StorageRejected,
)
from tests.fixtures.storage import FakeGcsServer
from workflows.models import StoredObject

MiB = 1024 * 1024
# Past this size GcsStorage streams to a temporary object instead of sending
# one request, so sizes on both sides of it take both paths.
ONE_REQUEST_LIMIT = 8 * MiB
SOURCE = {"user_token": "alice", "item_id": "item-1", "attachment_id": "att-1"}


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Return ``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def chunks_of(content: bytes, seed: int = 0) -> Iterator[bytes]:
    """Yield ``content`` in pieces of uneven sizes, up to 1 MiB."""
    sizes = random.Random(seed)
    position = 0
    while position < len(content):
        size = sizes.randint(1, MiB)
        yield content[position : position + size]
        position += size


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def write(
    store: Storage, name: str, content: bytes, *, expected_size: int | None = None
) -> StoredObject:
    """Write ``content`` in uneven chunks as image/jpeg with SOURCE metadata."""
    return store.write_if_absent(
        name,
        chunks_of(content),
        content_type="image/jpeg",
        metadata=SOURCE,
        expected_size=expected_size,
    )


def raw_names(store: Storage) -> list[str]:
    """Return everything the store holds, sidecars and temporary files included."""
    if isinstance(store, LocalStorage):
        return sorted(
            path.relative_to(store.root).as_posix()
            for path in store.root.rglob("*")
            if path.is_file()
        )
    assert isinstance(store, GcsStorage)
    blobs = storage.Client().list_blobs(store.bucket_name)

    return sorted(blob.name for blob in blobs)


def stored_names(store: Storage, *names: str) -> list[str]:
    """Return what ``raw_names`` shows after ``names`` were written."""
    if isinstance(store, LocalStorage):
        return sorted([*names, *(name + ".meta.json" for name in names)])
    assert isinstance(store, GcsStorage)

    return sorted(store.prefix + name for name in names)


# Object names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(
            object_name("alice", "item-1", "att-1", "image/jpeg"),
            "alice/timeline/item-1/att-1.jpg",
            id="attachment",
        ),
        pytest.param(
            item_prefix("alice", "item-1"), "alice/timeline/item-1/", id="item"
        ),
        pytest.param(
            location_object_name("alice", "latest"),
            "alice/locations/latest.json",
            id="location",
        ),
        pytest.param(
            tombstone_name("alice", "item-1"), "alice/deleted/item-1", id="tombstone"
        ),
        pytest.param(
            object_name("a/b", "..", ".hidden", "video/mp4"),
            "a%2Fb/timeline/%2E./%2Ehidden.mp4",
            id="unsafe",
        ),
        pytest.param(
            object_name("élan", "x y", "~1", "text/plain"),
            "%C3%A9lan/timeline/x%20y/%7E1.txt",
            id="non-ascii",
        ),
    ],
)
def test_names_follow_the_layout(name: str, expected: str) -> None:
    assert name == expected


@pytest.mark.parametrize(
    ("content_type", "extension"),
    [
        ("image/jpeg", ".jpg"),
        ("image/png", ".png"),
        ("video/mp4", ".mp4"),
        ("text/plain", ".txt"),
        ("application/json", ".json"),
        ("IMAGE/JPEG", ".jpg"),
        ("text/plain; charset=utf-8", ".txt"),
        ("application/x-unknown-thing", ".bin"),
        ("", ".bin"),
        ("not a type", ".bin"),
    ],
)
def test_extension_for_content_types(content_type: str, extension: str) -> None:
    assert extension_for(content_type) == extension


ids = st.text(min_size=1, max_size=300)


@given(user=ids, item=ids, attachment=ids, content_type=st.text(max_size=40))
def test_object_name_is_safe_for_any_ids(
    user: str, item: str, attachment: str, content_type: str
) -> None:
    """No id can make an empty or dot segment, or escape its item's prefix."""
    name = object_name(user, item, attachment, content_type)

    segments = name.split("/")
    allowed = set(string.ascii_letters + string.digits + "._-%~")
    assert len(segments) == 4
    assert segments[1] == "timeline"
    assert name.startswith(item_prefix(user, item))
    assert all(segment and not segment.startswith(".") for segment in segments)
    assert all(set(segment) <= allowed for segment in segments)
    assert all(len(segment.encode()) <= 200 for segment in segments)


@given(first=st.tuples(ids, ids, ids), second=st.tuples(ids, ids, ids))
def test_object_name_differs_for_different_ids(
    first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    assume(first != second)

    assert object_name(*first, "image/png") != object_name(*second, "image/png")


@given(value=st.text(min_size=1, max_size=15))
def test_object_name_segment_decodes_to_the_id(value: str) -> None:
    """Ids short enough to keep whole (15 characters always are) decode back."""
    name = object_name(value, value, value, "application/json")

    assert [unquote(segment) for segment in name.split("/")] == [
        value,
        "timeline",
        value,
        value + ".json",
    ]


def test_object_name_shortens_long_ids_with_a_digest() -> None:
    long_id = "é" * 500

    name = object_name("alice", long_id, "att-1", "image/png")

    item = name.split("/")[2]
    assert len(item) <= 180
    assert "~" in item
    assert item != object_name("alice", long_id + "x", "att-1", "image/png")


@pytest.mark.parametrize("field", ["user", "item", "attachment"])
def test_object_name_refuses_an_empty_id(field: str) -> None:
    values = {"user": "alice", "item": "item-1", "attachment": "att-1"} | {field: ""}

    with pytest.raises(ValueError, match="expected a non-empty string"):
        object_name(values["user"], values["item"], values["attachment"], "image/png")


# Opening a store


def test_open_storage_opens_an_absolute_folder(tmp_path: Path) -> None:
    store = open_storage((tmp_path / "objects").as_uri())

    assert isinstance(store, LocalStorage)
    assert store.root == tmp_path / "objects"
    assert store.root.is_dir()


def test_open_storage_opens_a_relative_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    store = open_storage("file://./data/attachments")

    assert isinstance(store, LocalStorage)
    assert store.root == tmp_path / "data" / "attachments"


def test_open_storage_opens_a_bucket_prefix(fake_gcs: FakeGcsServer) -> None:
    store = open_storage("gs://some-bucket/a/b/")

    assert isinstance(store, GcsStorage)
    assert (store.bucket_name, store.prefix) == ("some-bucket", "a/b/")
    assert store.url == "gs://some-bucket/a/b/"


@pytest.mark.parametrize(
    "url", ["s3://bucket/x", "gs:///x", "file://", "relative/folder"]
)
def test_open_storage_refuses_other_urls(url: str) -> None:
    with pytest.raises(StorageRejected, match="expected file:///path/to/folder"):
        open_storage(url)


# Both backends


@pytest.mark.parametrize(
    "size",
    [0, 1000, 3 * MiB + 17, ONE_REQUEST_LIMIT, ONE_REQUEST_LIMIT + 1, 20 * MiB + 3],
)
def test_write_streams_chunks_and_reads_them_back(
    any_storage: Storage, size: int
) -> None:
    content = random_bytes(size)
    name = object_name("alice", "item-1", "att-1", "image/jpeg")

    stored = write(any_storage, name, content, expected_size=size)

    assert stored == StoredObject(
        name=name, size=size, sha256=sha256(content), content_type="image/jpeg"
    )
    assert any_storage.read(name) == content
    assert any_storage.describe(name) == stored.model_copy(update={"created": False})
    assert raw_names(any_storage) == stored_names(any_storage, name)


@pytest.mark.parametrize("size", [1000, ONE_REQUEST_LIMIT + 1])
def test_write_if_absent_keeps_the_first_object(
    any_storage: Storage, size: int
) -> None:
    """A second write returns the first object and reads none of its own chunks."""
    first, second = random_bytes(size, seed=1), random_bytes(size, seed=2)
    name = object_name("alice", "item-1", "att-1", "image/jpeg")
    write(any_storage, name, first)
    pulled = []

    def source() -> Iterator[bytes]:
        pulled.append(True)
        yield second

    again = any_storage.write_if_absent(
        name, source(), content_type="text/plain", metadata={}
    )

    assert again == StoredObject(
        name=name,
        size=size,
        sha256=sha256(first),
        content_type="image/jpeg",
        created=False,
    )
    assert any_storage.read(name) == first
    assert pulled == []


@pytest.mark.parametrize("size", [MiB, ONE_REQUEST_LIMIT + MiB])
def test_concurrent_writers_of_one_name_leave_one_object(
    any_storage: Storage, size: int
) -> None:
    content = random_bytes(size)
    name = object_name("alice", "item-1", "att-1", "video/mp4")
    results = run_concurrent_writers(any_storage, name, content, writers=6)

    assert raw_names(any_storage) == stored_names(any_storage, name)
    assert any_storage.read(name) == content
    assert {result.sha256 for result in results} == {sha256(content)}
    assert any(result.created for result in results)


@pytest.mark.parametrize(
    ("backend", "size"),
    [
        ("local", MiB),
        ("local", ONE_REQUEST_LIMIT + MiB),
        ("gcs", MiB),
        # Streamed GCS writes are left out: fake-gcs-server 1.54 ignores
        # if_generation_match on rewrites, which real GCS enforces.
    ],
)
def test_concurrent_writers_of_one_name_create_it_once(
    request: pytest.FixtureRequest, backend: str, size: int
) -> None:
    store: Storage = request.getfixturevalue(f"{backend}_storage")
    name = object_name("alice", "item-1", "att-1", "video/mp4")

    results = run_concurrent_writers(store, name, random_bytes(size), writers=6)

    assert sorted(result.created for result in results) == [False] * 5 + [True]


def run_concurrent_writers(
    store: Storage, name: str, content: bytes, *, writers: int
) -> list[StoredObject]:
    """Write ``content`` under ``name`` from several threads at once."""
    start = threading.Barrier(writers)

    def write_once(_: int) -> StoredObject:
        start.wait()
        return store.write_if_absent(
            name, chunks_of(content), content_type="video/mp4", metadata=SOURCE
        )

    with ThreadPoolExecutor(writers) as pool:
        return list(pool.map(write_once, range(writers)))


@pytest.mark.parametrize(
    ("size", "expected_size"),
    [
        pytest.param(1000, 999, id="small-longer"),
        pytest.param(1000, 1001, id="small-shorter"),
        pytest.param(
            ONE_REQUEST_LIMIT + MiB, ONE_REQUEST_LIMIT + MiB - 1, id="large-longer"
        ),
        pytest.param(
            ONE_REQUEST_LIMIT + MiB, ONE_REQUEST_LIMIT + MiB + 1, id="large-shorter"
        ),
        pytest.param(ONE_REQUEST_LIMIT + MiB, 1000, id="announced-small"),
    ],
)
def test_expected_size_mismatch_leaves_nothing(
    any_storage: Storage, size: int, expected_size: int
) -> None:
    name = object_name("alice", "item-1", "att-1", "image/jpeg")

    with pytest.raises(ChecksumMismatch, match=f"announced {expected_size} bytes"):
        write(any_storage, name, random_bytes(size), expected_size=expected_size)

    assert not any_storage.exists(name)
    assert raw_names(any_storage) == []


@pytest.mark.parametrize("size", [3 * MiB, ONE_REQUEST_LIMIT + 3 * MiB])
def test_source_failure_is_raised_as_is_and_leaves_nothing(
    any_storage: Storage, size: int
) -> None:
    """An error of the source (Mirror hung up) is not reported as a storage error."""
    name = object_name("alice", "item-1", "att-1", "image/jpeg")
    content = random_bytes(size)

    def failing_source() -> Iterator[bytes]:
        yield content[: size - MiB]
        raise ConnectionResetError("mirror hung up")

    with pytest.raises(ConnectionResetError, match="mirror hung up"):
        any_storage.write_if_absent(
            name, failing_source(), content_type="image/jpeg", metadata=SOURCE
        )

    assert raw_names(any_storage) == []


def test_metadata_is_recorded(any_storage: Storage) -> None:
    name = object_name("alice", "item-1", "att-1", "image/png")

    any_storage.write_if_absent(
        name, [b"\x89PNG", b"rest"], content_type="image/png", metadata=SOURCE
    )

    assert any_storage.read_metadata(name) == SOURCE
    described = any_storage.describe(name)
    assert described is not None
    assert described.content_type == "image/png"
    assert described.sha256 == sha256(b"\x89PNGrest")


def test_metadata_refuses_the_reserved_key(any_storage: Storage) -> None:
    with pytest.raises(ValueError, match="'sha256' is reserved"):
        any_storage.write_if_absent(
            "a/b", [b"x"], content_type="text/plain", metadata={"sha256": "x"}
        )


def test_delete_prefix_removes_all_and_only_that_prefix(any_storage: Storage) -> None:
    doomed = [
        object_name("alice", "item-1", "att-1", "image/jpeg"),
        object_name("alice", "item-1", "att-2", "video/mp4"),
    ]
    kept = [
        object_name("alice", "item-10", "att-1", "image/jpeg"),
        object_name("bob", "item-1", "att-1", "image/jpeg"),
        tombstone_name("alice", "item-1"),
        location_object_name("alice", "latest"),
    ]
    for name in doomed + kept:
        write(any_storage, name, name.encode())

    removed = any_storage.delete_prefix(item_prefix("alice", "item-1"))

    assert removed == sorted(doomed)
    assert any_storage.list() == sorted(kept)
    assert raw_names(any_storage) == stored_names(any_storage, *kept)
    assert any_storage.delete_prefix(item_prefix("alice", "item-1")) == []


@pytest.mark.parametrize("prefix", ["alice/timeline/item-1", "", "/", "alice//"])
def test_delete_prefix_refuses_a_prefix_that_is_not_a_folder(
    any_storage: Storage, prefix: str
) -> None:
    with pytest.raises(ValueError, match="not"):
        any_storage.delete_prefix(prefix)


def test_list_matches_name_prefixes(any_storage: Storage) -> None:
    names = ["a/b/c.txt", "a/bc.txt", "a/d.txt", "b.txt"]
    for name in names:
        write(any_storage, name, b"x")

    assert any_storage.list() == names
    assert any_storage.list("a/b") == ["a/b/c.txt", "a/bc.txt"]
    assert any_storage.list("a/b/") == ["a/b/c.txt"]
    assert any_storage.list("c") == []


def test_delete_removes_one_object(any_storage: Storage) -> None:
    name = tombstone_name("alice", "item-1")
    write(any_storage, name, b"{}")

    assert any_storage.delete(name)
    assert not any_storage.delete(name)
    assert not any_storage.exists(name)
    assert any_storage.describe(name) is None
    assert any_storage.read_metadata(name) is None
    assert raw_names(any_storage) == []


def test_read_of_a_missing_object_raises_object_not_found(any_storage: Storage) -> None:
    with pytest.raises(ObjectNotFound, match="No object 'a/b'"):
        any_storage.read("a/b")


@pytest.mark.parametrize(
    "name",
    ["", "/a", "a/", "a//b", "../a", "a/../b", "a/.hidden", "a.meta.json", "a.partial"],
)
def test_invalid_names_are_refused(any_storage: Storage, name: str) -> None:
    with pytest.raises(ValueError, match="is not valid"):
        write(any_storage, name, b"x")
    with pytest.raises(ValueError, match="is not valid"):
        any_storage.exists(name)


OBJECT_SIZE = 64 * MiB
MEMORY_BUDGET = {
    # One chunk from the source plus one block read back for the check.
    LocalStorage: 8 * MiB,
    # The chunk being sent, the next one being gathered, and a source chunk.
    GcsStorage: 24 * MiB,
}


@pytest.mark.slow
def test_large_object_streams_with_bounded_memory(any_storage: Storage) -> None:
    block = random_bytes(MiB)
    produced = hashlib.sha256()

    def source() -> Iterator[bytes]:
        for index in range(OBJECT_SIZE // MiB):
            chunk = index.to_bytes(8, "big") + block[8:]
            produced.update(chunk)
            yield chunk

    name = object_name("alice", "item-1", "att-1", "video/mp4")
    tracemalloc.start()
    try:
        stored = any_storage.write_if_absent(
            name, source(), content_type="video/mp4", metadata=SOURCE
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < MEMORY_BUDGET[type(any_storage)]
    assert stored.size == OBJECT_SIZE
    assert stored.sha256 == produced.hexdigest()
    assert sha256(any_storage.read(name)) == produced.hexdigest()


# The local folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_local_unwritable_folder_is_rejected(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "objects")
    store.root.chmod(0o500)

    with pytest.raises(StorageRejected, match="write access"):
        write(store, "a/b.jpg", b"x")


def test_local_file_in_the_way_of_a_folder_is_rejected(
    local_storage: LocalStorage,
) -> None:
    (local_storage.root / "alice").write_bytes(b"not a folder")

    with pytest.raises(StorageRejected, match="no file stands where a folder should"):
        write(local_storage, "alice/timeline/item-1/att-1.jpg", b"x")


def test_local_files_are_owner_only_whatever_the_umask(
    local_storage: LocalStorage,
) -> None:
    name = object_name("alice", "item-1", "att-1", "image/jpeg")
    previous = os.umask(0)
    try:
        write(local_storage, name, b"content")
    finally:
        os.umask(previous)

    path = local_storage.root / name
    for created in [path, path.with_name(path.name + ".meta.json")]:
        assert stat.S_IMODE(created.stat().st_mode) == 0o600
    for folder in [path.parent, path.parent.parent, path.parent.parent.parent]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_local_sidecar_records_the_object(local_storage: LocalStorage) -> None:
    name = object_name("alice", "item-1", "att-1", "image/jpeg")

    write(local_storage, name, b"content")

    sidecar = local_storage.root / (name + ".meta.json")
    assert json.loads(sidecar.read_text()) == {
        "content_type": "image/jpeg",
        "metadata": SOURCE,
        "sha256": sha256(b"content"),
        "size": 7,
    }


def test_local_write_completes_a_missing_sidecar(local_storage: LocalStorage) -> None:
    """A writer that died between naming the file and its sidecar is made whole."""
    name = object_name("alice", "item-1", "att-1", "image/jpeg")
    write(local_storage, name, b"content")
    sidecar = local_storage.root / (name + ".meta.json")
    sidecar.unlink()

    again = write(local_storage, name, b"other content")

    assert not again.created
    assert again.sha256 == sha256(b"content")
    assert sidecar.exists()
    assert local_storage.read_metadata(name) == SOURCE


def test_local_describe_without_sidecar_hashes_the_file(
    local_storage: LocalStorage,
) -> None:
    name = "hand/placed.png"
    path = local_storage.root / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"png")

    described = local_storage.describe(name)

    assert described == StoredObject(
        name=name,
        size=3,
        sha256=sha256(b"png"),
        content_type="image/png",
        created=False,
    )


def test_local_list_hides_leftover_temporary_files(local_storage: LocalStorage) -> None:
    name = object_name("alice", "item-1", "att-1", "image/jpeg")
    write(local_storage, name, b"content")
    leftover = local_storage.root / "alice/timeline/item-1/.att-2.jpg.x1y2.partial"
    leftover.write_bytes(b"half")

    assert local_storage.list() == [name]
    assert local_storage.delete_prefix(item_prefix("alice", "item-1")) == [name]
    assert not leftover.exists()


# The GCS bucket


def test_gcs_records_content_type_and_digest_on_the_object(
    gcs_storage: GcsStorage,
) -> None:
    name = object_name("alice", "item-1", "att-1", "image/jpeg")
    content = random_bytes(ONE_REQUEST_LIMIT + 1)

    write(gcs_storage, name, content)

    blob = storage.Client().bucket(gcs_storage.bucket_name).get_blob("objects/" + name)
    assert blob.content_type == "image/jpeg"
    assert blob.metadata == SOURCE | {"sha256": sha256(content)}


def test_gcs_describe_hashes_an_object_stored_without_a_digest(
    gcs_storage: GcsStorage,
) -> None:
    bucket = storage.Client().bucket(gcs_storage.bucket_name)
    bucket.blob("objects/hand/placed.txt").upload_from_string(b"text")

    described = gcs_storage.describe("hand/placed.txt")

    assert described is not None
    assert described.sha256 == sha256(b"text")


def test_gcs_missing_bucket_is_rejected(fake_gcs: FakeGcsServer) -> None:
    store = GcsStorage("no-such-bucket")

    with pytest.raises(StorageRejected, match="Bucket 'no-such-bucket' does not exist"):
        write(store, "a/b.jpg", b"x")


@pytest.mark.parametrize("size", [3 * MiB, ONE_REQUEST_LIMIT + 3 * MiB])
def test_gcs_outage_fails_the_attempt_and_the_retry_succeeds(
    fake_gcs: FakeGcsServer, gcs_storage: GcsStorage, size: int
) -> None:
    content = random_bytes(size)
    name = object_name("alice", "item-1", "att-1", "image/jpeg")

    with fake_gcs.stopped(), pytest.raises(StorageError) as failure:
        write(gcs_storage, name, content)
    stored = write(gcs_storage, name, content)

    assert not isinstance(failure.value, StorageRejected)
    assert "Could not reach GCS to write" in str(failure.value)
    assert stored.created
    assert gcs_storage.read(name) == content


def test_gcs_outage_in_the_middle_of_an_upload_leaves_nothing(
    fake_gcs: FakeGcsServer, gcs_storage: GcsStorage
) -> None:
    content = random_bytes(3 * ONE_REQUEST_LIMIT)
    name = object_name("alice", "item-1", "att-1", "video/mp4")

    def source_that_outlives_storage() -> Iterable[bytes]:
        yield content[: 2 * ONE_REQUEST_LIMIT]
        fake_gcs.stop()
        yield content[2 * ONE_REQUEST_LIMIT :]

    try:
        with pytest.raises(StorageError, match="Could not reach GCS"):
            gcs_storage.write_if_absent(
                name,
                source_that_outlives_storage(),
                content_type="video/mp4",
                metadata=SOURCE,
            )
    finally:
        fake_gcs.start()

    assert raw_names(gcs_storage) == []


@pytest.mark.slow
def test_gcs_unavailable_for_a_while_is_retried_until_it_succeeds(
    fake_gcs: FakeGcsServer, gcs_storage: GcsStorage
) -> None:
    """Attempts fail fast while the emulator is down and succeed once it is back."""
    content = random_bytes(MiB)
    name = object_name("alice", "item-1", "att-1", "image/jpeg")
    failures: list[StorageError] = []
    fake_gcs.stop()
    restart = threading.Timer(1.0, fake_gcs.start)
    restart.start()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                stored = write(gcs_storage, name, content)
                break
            except StorageError as exc:
                failures.append(exc)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        restart.join()
        fake_gcs.start()

    assert failures
    assert not any(isinstance(failure, StorageRejected) for failure in failures)
    assert stored.created
    assert gcs_storage.read(name) == content


def test_gcs_large_write_leaves_no_temporary_object(gcs_storage: GcsStorage) -> None:
    name = object_name("alice", "item-1", "att-1", "video/mp4")

    write(gcs_storage, name, random_bytes(ONE_REQUEST_LIMIT + 1))

    assert raw_names(gcs_storage) == ["objects/" + name]
