"""Where a run's files live: a local (or NFS) directory, or an object-store URI (s3://, gs://, anything
pyarrow's filesystems resolve).

Locations are plain strings: an absolute path or a URI. Credentials and endpoints come the way the
store's own tools take them: environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...) or
pyarrow's URI options (`s3://bucket/runs?endpoint_override=host:port&scheme=http`), which travel inside
the location to every worker.

Object stores cannot be appended to or memory-mapped, so a process works in a node-local directory
(`working_dir`) and copies files up (`upload`) or down (`download`). For a local location the working
directory is the location itself and both copies are no-ops.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import shutil
import tempfile
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from sparsedist.atomic import write_atomic


_CHUNK = 1 << 22  # streamed copies: checkpoints and .beton files need not fit in memory twice
GCS_PROBE_RETRY_S = 10  # how long `check_usable`/`check_readable` let a gs:// location retry before refusing it


class StorageError(RuntimeError):
    """A storage location is unreachable, missing, or not allowed here."""


def is_uri(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """A URI as given, a path made absolute with ~ expanded: the form every process reads alike (Ray
    Train changes each worker's working directory)."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def driver_local_on_cluster(location: str | None) -> bool:
    """Whether `location`, unset or relative while attached to a cluster (RAY_ADDRESS), would resolve on
    the driver's node only, in a job's temporary working directory."""
    if not os.environ.get("RAY_ADDRESS"):
        return False
    return location is None or not (is_uri(location) or os.path.isabs(os.path.expanduser(location)))


def join(location: str, *parts: str) -> str:
    """`location`/part/...: path joining that keeps a URI's scheme and query options."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    scheme, netloc, path, query, fragment = urlsplit(location)
    return urlunsplit((scheme, netloc, posixpath.join(path or "/", *parts), query, fragment))


def parent_and_name(location: str) -> tuple[str, str]:
    """(parent location, last path component): Ray Train's storage_path and run name for a run directory."""
    if not is_uri(location):
        location = location.rstrip(os.sep) or os.sep
        return os.path.dirname(location), os.path.basename(location)
    scheme, netloc, path, query, fragment = urlsplit(location)
    path = path.rstrip("/")
    return urlunsplit((scheme, netloc, posixpath.dirname(path), query, fragment)), posixpath.basename(path)


def resolve(location: str):
    """(pyarrow filesystem, path inside it) for a location; StorageError when pyarrow cannot resolve it.

    One filesystem per bucket and options, made once: each is a client that costs milliseconds to build."""
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(location)
    scheme, netloc, path, query, _ = urlsplit(location)
    try:
        if not netloc:  # file:///path and the like: no bucket to share a client for
            return pyarrow.fs.FileSystem.from_uri(location)
        filesystem, root = _bucket_filesystem(urlunsplit((scheme, netloc, "", query, "")))
    except (ValueError, OSError) as error:  # ArrowInvalid is a ValueError
        raise StorageError(f"cannot open storage location {location}: {error}") from None
    inside = path.removeprefix("/").rstrip("/")
    return filesystem, f"{root}/{inside}" if inside else root


@functools.lru_cache(maxsize=16)
def _bucket_filesystem(bucket_uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(bucket_uri)


def ray_storage(location: str):
    """(storage_path, storage_filesystem) for Ray Train/Tune: a URI's filesystem, None for a local path."""
    filesystem, path = resolve(location)
    return path, filesystem if is_uri(location) else None


def _info(location: str):
    filesystem, path = resolve(location)
    try:
        return filesystem.get_file_info(path)
    except OSError as error:
        raise StorageError(f"storage {location} cannot be read: {error}") from None


def is_file(location: str) -> bool:
    import pyarrow.fs

    return _info(location).type == pyarrow.fs.FileType.File


def is_nonempty_dir(location: str) -> bool:
    import pyarrow.fs

    return _info(location).type == pyarrow.fs.FileType.Directory and bool(list_dir(location))


def list_dir(location: str) -> list[str]:
    """The names directly under `location` (files and directories), sorted; [] when there is nothing."""
    import pyarrow.fs

    filesystem, path = resolve(location)
    # pyarrow lists a GCS subdirectory only if it has a marker object, and uploads write none: there the
    # names come from every object below (a listing of the whole tree).
    recursive = filesystem.type_name == "gcs"
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except OSError as error:
        raise StorageError(f"cannot list {location}: {error}") from None
    return sorted({entry.path[len(path):].lstrip("/").split("/")[0] for entry in entries})


def read_bytes(location: str) -> bytes:
    """The file's content; FileNotFoundError when there is none."""
    if not is_uri(location):
        with open(location, "rb") as handle:
            return handle.read()
    filesystem, path = resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise StorageError(f"cannot read {location}: {error}") from None


def write_bytes(location: str, content: bytes) -> None:
    """Replace the file at `location` whole: readers see the old content or the new (an object PUT is atomic)."""
    if not is_uri(location):
        os.makedirs(os.path.dirname(os.path.abspath(location)), exist_ok=True)
        write_atomic(location, content)
        return
    filesystem, path = resolve(location)
    try:
        with filesystem.open_output_stream(path) as stream:
            stream.write(content)
    except OSError as error:
        raise StorageError(f"cannot write {location}: {error}") from None


def delete_file(location: str) -> None:
    """Remove the file at `location` if there is one."""
    if is_file(location):
        filesystem, path = resolve(location)
        filesystem.delete_file(path)


def delete_dir(location: str) -> None:
    filesystem, path = resolve(location)
    if _info(location).type.name == "NotFound":
        return
    filesystem.delete_dir_contents(path)
    # What remains is a marker object or a local directory; on GCS a directory is often only its objects'
    # common prefix, gone with them, and deleting it as a directory fails.
    if _info(location).type.name != "NotFound":
        filesystem.delete_dir(path)


def upload(local_path: str, location: str) -> int:
    """Copy a local file or directory tree to `location`; returns the bytes copied. Each object is
    replaced whole when its upload completes, so a reader never sees part of one."""
    filesystem, base = resolve(location)
    files = [local_path] if os.path.isfile(local_path) else [
        os.path.join(root, name) for root, _, names in os.walk(local_path) for name in names]
    copied = 0
    for file in sorted(files):
        relative = os.path.relpath(file, local_path) if file != local_path else ""
        target = posixpath.join(base, *relative.split(os.sep)) if relative else base
        if not is_uri(location):  # object stores have no directories to make
            os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with open(file, "rb") as source, filesystem.open_output_stream(target) as sink:
                shutil.copyfileobj(source, sink, _CHUNK)
        except OSError as error:
            raise StorageError(f"cannot upload {file} to {location}: {error}") from None
        copied += os.path.getsize(file)
    return copied


def download(location: str, local_path: str, exclude: Callable[[str], bool] = lambda relative: False) -> bool:
    """Copy the file or directory tree at `location` to `local_path`, leaving out the files whose
    "/"-separated relative path `exclude` matches; False when nothing is there."""
    import pyarrow.fs

    filesystem, path = resolve(location)
    info = _info(location)
    if info.type == pyarrow.fs.FileType.NotFound:
        return False
    entries = [info] if info.type == pyarrow.fs.FileType.File else [
        entry for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
        if entry.type == pyarrow.fs.FileType.File]
    for entry in entries:
        relative = posixpath.relpath(entry.path, path) if entry.path != path else ""
        if relative and exclude(relative):
            continue
        target = os.path.join(local_path, *relative.split("/")) if relative else local_path
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        staging = f"{target}.{os.getpid()}.tmp"  # renamed into place whole
        with filesystem.open_input_stream(entry.path) as source, open(staging, "wb") as sink:
            shutil.copyfileobj(source, sink, _CHUNK)
        os.replace(staging, target)
    return True


def working_dir(location: str, purpose: str) -> str:
    """The node-local directory a process works in for `location`: the location itself when it is local,
    else a directory under the system temp dir named after it (stable, so processes on one node share it)."""
    if not is_uri(location):
        return location
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    directory = os.path.join(tempfile.gettempdir(), f"sparsedist-{purpose}", digest)
    os.makedirs(directory, exist_ok=True)
    return directory


_ACCESS_HINT = ("Check that the bucket exists, that credentials are set (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                "~/.aws for s3://; GOOGLE_APPLICATION_CREDENTIALS for gs://) and the endpoint is reachable "
                "(AWS_ENDPOINT_URL or ?endpoint_override=).")


def _impatient(location: str) -> str:
    """`location` with a short retry limit where its store would retry for minutes: Google's client retries
    missing credentials and an unreachable endpoint for 15 minutes by default. The checks below use it;
    training and copies keep the store's patience."""
    scheme, netloc, path, query, fragment = urlsplit(location)
    if resolve(location)[0].type_name != "gcs" or "retry_limit_seconds" in query:
        return location
    query = f"{query}&" if query else ""
    return urlunsplit((scheme, netloc, path, f"{query}retry_limit_seconds={GCS_PROBE_RETRY_S}", fragment))


def check_usable(location: str) -> None:
    """Fail with one clear StorageError, before any worker starts, when the URI `location` cannot be
    written: an unreachable endpoint, a missing bucket, refused credentials. Writes and deletes a probe
    object. A local directory passes: it is made when first written."""
    if not is_uri(location):
        return
    filesystem, path = resolve(_impatient(join(location, f".sparsedist-probe-{os.getpid()}")))
    try:
        with filesystem.open_output_stream(path) as stream:
            stream.write(b"probe")
        filesystem.delete_file(path)
    except OSError as error:
        raise StorageError(f"cannot write to {location}: {error}. {_ACCESS_HINT}") from None


def check_readable(location: str) -> None:
    """Fail with one clear StorageError, instead of waiting out the store's retries, when the URI `location`
    cannot be read: an unreachable endpoint, refused credentials. A local path passes."""
    if not is_uri(location):
        return
    filesystem, path = resolve(_impatient(location))
    try:
        filesystem.get_file_info(path)
    except OSError as error:
        raise StorageError(f"cannot read {location}: {error}. {_ACCESS_HINT}") from None


def local_copy(location: str, exclude: Callable[[str], bool] = lambda relative: False) -> str:
    """A local directory with `location`'s files, for readers that need paths (report, eval, export): the
    location itself when local, else a download into a new temporary directory (see `download`)."""
    if not is_uri(location):
        return location
    # A fresh directory per call: two readers of one location must not delete each other's files.
    directory = tempfile.mkdtemp(prefix="sparsedist-read-")
    if not download(location, directory, exclude):
        raise StorageError(f"nothing at {location}")
    return directory


@contextlib.contextmanager
def local_view(location: str, exclude: Callable[[str], bool] = lambda relative: False) -> Iterator[str]:
    """`local_copy` for the duration of a block: a temporary copy is deleted at its end."""
    directory = local_copy(location, exclude)
    try:
        yield directory
    finally:
        if directory != location:
            shutil.rmtree(directory, ignore_errors=True)
