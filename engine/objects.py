"""Object storage: one client layer for every store, output and state dir that lives in a bucket.

A location is a URI, `s3://bucket/key`, `gs://bucket/key` or `az://container/key`; anything else with a scheme is
refused (`location`), so a URI is never written as a local directory named `s3:`. Requests go through obstore (the
Rust object_store client; bench/s3bench.py measured it against s3fs, see the README), which reads endpoint and
credentials from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`, `AWS_ALLOW_HTTP`; `GOOGLE_*`, `AZURE_*`). A slow or failing endpoint (5xx, a reset connection) is
retried with bounded backoff (`CELLRAY_OBJECT_RETRIES`, `CELLRAY_OBJECT_RETRY_TIMEOUT_S`), then fails in one line
naming the object; no error message carries a secret.

Buckets have no rename, so a tree (a store, statistics, an embedding) is committed by the object written last
(`tree_writer`): a `.cellray-writing` marker goes first, then every object but the commit object, then the commit
object, then the marker is removed. What an interrupted writer left (a marker without a commit) is removed by the next
writer of that prefix. `object_lock` keeps two writers off one prefix with a create-only put and a lease.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CellrayError, MissingObjectError

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "az")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)(.*)$")  # two letters or more: "C:/x" is a Windows path
LOCK_NAME = ".cellray-lock"
WRITING_MARKER = ".cellray-writing"
UPLOAD_THREADS = 16
# Requests and bytes this process fetched (GET): bench/s3bench.py reads them.
TRAFFIC = {"get_requests": 0, "get_bytes": 0}
_traffic_lock = threading.Lock()


@dataclass(frozen=True)
class ObjectPath:
    """`scheme://bucket/key`, with the few `pathlib.Path` operations cellray's writers and readers use."""

    scheme: str
    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    def __truediv__(self, part: str | os.PathLike) -> ObjectPath:
        part = str(part).strip("/")
        return ObjectPath(self.scheme, self.bucket, f"{self.key}/{part}".strip("/") if self.key else part)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.scheme, self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def resolve(self) -> ObjectPath:
        return self

    def exists(self) -> bool:
        """An object at this key, or any object under it (a 'directory')."""
        return exists(self) or bool(list_objects(self, limit=1))

    def read_bytes(self) -> bytes:
        return read_bytes(self)

    def read_text(self) -> str:
        return read_bytes(self).decode()


def is_uri(path: str | os.PathLike | ObjectPath) -> bool:
    """Whether `path` is written as a URI (`scheme:/...`), served or not."""
    return isinstance(path, ObjectPath) or bool(_URI.match(str(path)))


def location(uri: str | os.PathLike | ObjectPath) -> ObjectPath:
    """The bucket location of a URI; a scheme cellray cannot serve, or a malformed URI, is a one-line error."""
    if isinstance(uri, ObjectPath):
        return uri
    m = _URI.match(str(uri))
    if m is None:
        raise CellrayError(f"{uri}: not a URI (expected scheme://bucket/key)")
    scheme, slashes, rest = m.group(1).lower(), m.group(2), m.group(3)
    if scheme not in SCHEMES:
        raise CellrayError(
            f"{uri}: URI scheme '{scheme}://' is not supported: use a local path or "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    bucket, _, key = rest.partition("/")
    if slashes != "//" or not bucket:
        raise CellrayError(f"{uri}: malformed URI: expected {scheme}://BUCKET/KEY")
    return ObjectPath(scheme, bucket, key.strip("/"))


def store_path(path: str | os.PathLike | ObjectPath) -> Path | ObjectPath:
    """A local `Path`, or the `ObjectPath` of a URI (checked): how every command takes a store or output."""
    return location(path) if is_uri(path) else Path(path)


# ----------------------------------------------------------------------------------------------- the client


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@functools.cache
def client(scheme: str, bucket: str, prefix: str = "") -> Any:
    """The obstore store of one bucket (and key prefix), configured from the environment; one per process."""
    from obstore.store import from_url

    retries = int(os.environ.get("CELLRAY_OBJECT_RETRIES", "20"))
    retry_timeout = float(os.environ.get("CELLRAY_OBJECT_RETRY_TIMEOUT_S", "60"))
    retry = {
        "max_retries": retries,
        "backoff": {
            "init_backoff": dt.timedelta(milliseconds=250),
            "max_backoff": dt.timedelta(seconds=8),
            "base": 2,
        },
        "retry_timeout": dt.timedelta(seconds=retry_timeout),
    }
    # client options given here replace the environment's, so AWS_ALLOW_HTTP is carried over by hand
    options = {"connect_timeout": "5s", "timeout": "120s", "allow_http": _env_flag("AWS_ALLOW_HTTP")}
    url = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
    try:
        return from_url(url, client_options=options, retry_config=retry)
    except Exception as e:  # obstore raises on configuration it cannot use (no region, a bad endpoint)
        raise CellrayError(f"{url}: cannot configure the object storage client: {_clean(e)}") from None


def reset_clients() -> None:
    """Forget configured clients (after the environment changed: tests, a new endpoint)."""
    client.cache_clear()


def _client_of(p: ObjectPath) -> Any:
    return client(p.scheme, p.bucket)


def _clean(e: BaseException) -> str:
    """An obstore error as one line, without a secret and without the server's XML body."""
    text = " ".join(str(e).split())
    text = re.sub(r"<\?xml.*", "", text).strip()
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY"):
        if secret := os.environ.get(name):
            text = text.replace(secret, "***")
    return text[:300]


def object_error(e: BaseException, where: ObjectPath | str) -> CellrayError:
    """A one-line CellrayError for a failed request on `where`."""
    import obstore.exceptions as ox

    text = str(e)
    if isinstance(e, ox.NotFoundError | FileNotFoundError):
        if "NoSuchBucket" in text:
            bucket = where.bucket if isinstance(where, ObjectPath) else where
            return MissingObjectError(f"{where}: bucket '{bucket}' does not exist")
        return MissingObjectError(f"{where}: no such object")
    if isinstance(e, ox.PermissionDeniedError | ox.UnauthenticatedError) or "403 Forbidden" in text:
        return CellrayError(
            f"{where}: access denied by the endpoint (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket "
            "policy)"
        )
    if isinstance(e, ox.AlreadyExistsError | ox.PreconditionError):
        return CellrayError(f"{where}: changed by another writer (a conditional request was refused)")
    return CellrayError(f"{where}: object storage request failed after retries: {_clean(e)}")


@contextlib.contextmanager
def _request(where: ObjectPath) -> Iterator[None]:
    try:
        yield
    except CellrayError:
        raise
    except Exception as e:
        raise object_error(e, where) from None


def _count_get(n_bytes: int, requests: int = 1) -> None:
    with _traffic_lock:
        TRAFFIC["get_requests"] += requests
        TRAFFIC["get_bytes"] += n_bytes


# ----------------------------------------------------------------------------------------------- requests


def head(p: ObjectPath) -> dict[str, Any]:
    """The object's metadata (`size`, `e_tag`, ...); MissingObjectError when there is none."""
    import obstore

    with _request(p):
        return obstore.head(_client_of(p), p.key)


def exists(p: ObjectPath) -> bool:
    try:
        head(p)
    except MissingObjectError:
        return False
    return True


def read_bytes(p: ObjectPath) -> bytes:
    import obstore

    with _request(p):
        data = bytes(obstore.get(_client_of(p), p.key).bytes())
    _count_get(len(data))
    return data


def read_ranges(p: ObjectPath, starts: Sequence[int], ends: Sequence[int]) -> list[memoryview]:
    """Byte ranges [start, end) of one object, fetched concurrently (obstore merges ranges closer than 1 MiB)."""
    import obstore

    if not starts:
        return []
    with _request(p):
        parts = obstore.get_ranges(_client_of(p), p.key, starts=list(starts), ends=list(ends))
    views = [memoryview(b) for b in parts]
    _count_get(sum(len(v) for v in views), len(views))
    return views


def write_bytes(p: ObjectPath, data: bytes, *, create_only: bool = False, if_etag: str | None = None) -> str:
    """Put one object (whole: a put is atomic); `create_only` refuses an existing one, `if_etag` one that changed.
    Returns the new e_tag."""
    import obstore

    mode: Any = "create" if create_only else ({"e_tag": if_etag} if if_etag else "overwrite")
    with _request(p):
        result = obstore.put(_client_of(p), p.key, data, mode=mode)
    return result.get("e_tag") or ""


def upload_file(p: ObjectPath, local: Path) -> None:
    import obstore

    with _request(p):
        obstore.put(_client_of(p), p.key, Path(local))


def delete(paths: Sequence[ObjectPath]) -> None:
    import obstore

    by_bucket: dict[tuple[str, str], list[str]] = {}
    for p in paths:
        by_bucket.setdefault((p.scheme, p.bucket), []).append(p.key)
    for (scheme, bucket), keys in by_bucket.items():
        where = ObjectPath(scheme, bucket, keys[0])
        with _request(where):
            obstore.delete(client(scheme, bucket), keys)


def list_objects(prefix: ObjectPath, limit: int | None = None) -> list[ObjectPath]:
    """Every object under `prefix/` (a 'directory'; not `prefix` itself), in key order."""
    import obstore

    found: list[ObjectPath] = []
    with _request(prefix):
        for batch in obstore.list(_client_of(prefix), prefix=prefix.key + "/" if prefix.key else None):
            # (pyarrow, which Ray Train writes through, leaves empty "directory" objects: not ours to list)
            found += [
                ObjectPath(prefix.scheme, prefix.bucket, m["path"])
                for m in batch
                if m["path"].strip("/") != prefix.key and not m["path"].endswith("/")
            ]
            if limit is not None and len(found) >= limit:
                break
    return sorted(found, key=lambda o: o.key)[:limit]


def upload_tree(local: Path, dest: ObjectPath, skip: Callable[[str], bool] = lambda rel: False) -> int:
    """Upload every file under `local` to `dest/<relative path>`, many at once; returns the number uploaded."""
    files = [f for f in sorted(Path(local).rglob("*")) if f.is_file() and not skip(f.relative_to(local).as_posix())]
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda f: upload_file(dest / f.relative_to(local).as_posix(), f), files))
    return len(files)


def zarr_store(p: ObjectPath, read_only: bool = True) -> Any:
    """A zarr-python store over `p` (through the same client layer): for groups cellray does not read directly."""
    from zarr.storage import ObjectStore

    return ObjectStore(client(p.scheme, p.bucket, p.key), read_only=read_only)


# ----------------------------------------------------------------------------------------------- writers


def _lease_s() -> float:
    return float(os.environ.get("CELLRAY_LOCK_LEASE_S", "60"))


@contextlib.contextmanager
def object_lock(prefix: ObjectPath) -> Iterator[None]:
    """Hold `prefix/.cellray-lock` while writing under `prefix`: created with a create-only put, renewed every third
    of its lease (`CELLRAY_LOCK_LEASE_S`, 60 s) with a conditional put; a second writer is refused in one line; the
    lock of a writer that died expires with its lease and is taken over (with a line)."""
    lock = prefix / LOCK_NAME
    owner = f"{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:6]}"

    def body() -> bytes:
        return json.dumps({"owner": owner, "expires": time.time() + _lease_s()}).encode()

    try:
        etag = write_bytes(lock, body(), create_only=True)
    except CellrayError:
        try:
            meta, held = head(lock), json.loads(read_bytes(lock))
        except (CellrayError, ValueError):
            meta, held = {"e_tag": None}, {"owner": "?", "expires": 0}
        left = float(held.get("expires", 0)) - time.time()
        if left > 0:
            raise CellrayError(
                f"{prefix}: another cellray process ({held.get('owner')}) is writing it; wait for it to finish (its "
                f"lock {lock} expires {left:.0f} s after that process stops renewing it)"
            ) from None
        etag = write_bytes(lock, body(), if_etag=meta["e_tag"])  # a refused take-over: someone else was faster
        log.warning("took over the lock of %s: its holder (%s) stopped renewing it", prefix, held.get("owner"))
    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(_lease_s() / 3):
            try:
                etag = write_bytes(lock, body(), if_etag=etag)
            except CellrayError as e:
                log.error("%s: lost the write lock (%s)", prefix, e)
                return

    renewer = threading.Thread(target=renew, name="cellray-lock-renew", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(CellrayError):
            delete([lock])


def clear_prefix(prefix: ObjectPath, keep: Sequence[str] = (LOCK_NAME,)) -> int:
    """Delete every object under `prefix/` but `keep`; returns how many."""
    doomed = [o for o in list_objects(prefix) if o.key[len(prefix.key) + 1 :] not in keep]
    for i in range(0, len(doomed), 1000):
        delete(doomed[i : i + 1000])
    return len(doomed)


def prepare_prefix(
    dest: ObjectPath, commit: str, overwrite: bool, replaceable: Callable[[ObjectPath], bool] | None = None
) -> None:
    """Make `dest/` ready for a new tree whose commit object is `dest/commit` (call it holding `object_lock(dest)`):
    what an interrupted writer left is removed with a line; a committed tree is refused unless `overwrite`, and then
    only if `replaceable` says cellray wrote it (its commit object goes first, so readers never see a mix)."""
    if exists(dest / WRITING_MARKER):
        n = clear_prefix(dest)
        log.warning("%s: removed %d object(s) left by an interrupted writer", dest, n)
    elif exists(dest / commit):
        if not overwrite:
            raise CellrayError(f"{dest}: already exists (pass --overwrite to replace it)")
        if replaceable is not None and not replaceable(dest):
            raise CellrayError(f"{dest}: exists and is not something cellray wrote: refusing to replace it")
        write_bytes(dest / WRITING_MARKER, b"")
        delete([dest / commit])
        clear_prefix(dest)
    elif any(o.name != LOCK_NAME for o in list_objects(dest, limit=2)):
        raise CellrayError(f"{dest}: holds objects that are not a committed cellray output: refusing to write there")
    write_bytes(dest / WRITING_MARKER, json.dumps({"started": time.time()}).encode())


def commit_tree(local: Path, dest: ObjectPath, commit: str) -> None:
    """Upload `local` to `dest/`, its commit object last, then drop the writing marker."""
    upload_tree(local, dest, skip=lambda rel: rel == commit)
    upload_file(dest / commit, Path(local) / commit)
    delete([dest / WRITING_MARKER])


def cache_dir() -> Path:
    """This node's cache of objects and staging area of uploads (`CELLRAY_CACHE_DIR`, default ~/.cache/cellray)."""
    return Path(os.environ.get("CELLRAY_CACHE_DIR") or Path.home() / ".cache" / "cellray")


def staging_dir(name: str = "out") -> Path:
    """A fresh local directory to build an output in before it is uploaded (under the node's cache dir)."""
    d = cache_dir() / "staging" / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    return d


@contextlib.contextmanager
def tree_writer(
    dest: ObjectPath, commit: str, overwrite: bool, replaceable: Callable[[ObjectPath], bool] | None = None
) -> Iterator[Path]:
    """Yield a local path (not yet there) to build the tree at; on success the tree is uploaded to `dest` and
    committed by `commit`, written last. The lock is held throughout; on failure nothing is committed (the marker
    tells the next writer to clean up)."""
    with object_lock(dest):
        prepare_prefix(dest, commit, overwrite, replaceable)
        staging = staging_dir(dest.name or "out")
        try:
            yield staging / "tree"
            commit_tree(staging / "tree", dest, commit)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
