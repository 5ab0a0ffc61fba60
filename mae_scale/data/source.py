"""Where shard bytes come from: local paths, fsspec URLs, and `pipe:` commands.

- A path (or `file:` URL; NFS and Lustre mounts are paths): `open`, one seek per run of samples.
- `http(s)://` (fsspec's HTTP filesystem, with aiohttp): one streamed GET per run of samples, with
  a `Range` header for the run's bytes (`fs.open(..., block_size=0, headers=...)`), so a run costs
  one request whatever its size, and memory stays one chunk. A server that answers a ranged GET
  with anything but the range asked for (206 + `Content-Range`) is a named error.
  Requests time out (`HTTP_TIMEOUT_S`): a server that stalls is a fault, never a hang.
- Any other URL whose fsspec backend is installed (`s3://` with s3fs, `gs://` with gcsfs, ...):
  byte ranges with `cat_file(path, start, end)`, at most `RANGE_CHUNK` bytes per request (fsspec
  has no backend-independent streaming read), so a run costs ceil(bytes / RANGE_CHUNK) requests.
- `pipe:` commands, and URLs without an fsspec backend: webdataset's `gopen`, read from the start.

Every reader can count the bytes it hands to its consumer, the tar parser (`on_bytes`): that is how
the loader measures what an epoch reads. A reader fetches at most one chunk ahead of that (256 KiB
from a file or a pipe, 1 MiB over http, `RANGE_CHUNK` from another backend, never past the end of
a range). A failed read raises `OSError` naming the URL and the byte range.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import IO

LOCAL_CHUNK = 256 << 10  # bytes per read() of a file (or a pipe / whole-file stream)
HTTP_CHUNK = 1 << 20  # bytes per read() of a streamed GET: 256 KiB gave half the MB/s (bench_loader)
RANGE_CHUNK = 64 << 20  # bytes per range request of a backend without streaming (not http)
HTTP_TIMEOUT_S = {"sock_connect": 30.0, "sock_read": 60.0}  # no total limit: a run may take minutes


class ShortFile(OSError):
    """A local file that ends before the bytes its index promises (truncated): asking again won't help."""


class RangeIgnored(OSError):
    """A server answered a range request with something else (often 200 and the whole file)."""


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def _local_path(url: str) -> str | None:
    if url.startswith("file:"):
        return url.removeprefix("file://").removeprefix("file:")
    return None if "://" in url or is_pipe(url) else url


@functools.lru_cache(maxsize=32)
def _fsspec_ok(protocol: str) -> bool:
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
        if protocol in ("http", "https"):
            import aiohttp  # noqa: F401 - HTTPFileSystem imports it only when first used
    except (ImportError, ValueError):
        return False
    return True


def can_seek(url: str) -> bool:
    """A path, or a URL whose fsspec backend is installed: runs of samples can start mid-shard."""
    if _local_path(url) is not None:
        return True
    return not is_pipe(url) and _fsspec_ok(url.split("://", 1)[0])


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _storage_options(protocol: str) -> dict:
    if protocol not in ("http", "https"):
        return {}
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, **HTTP_TIMEOUT_S)}}


def _filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; instances are cached by fsspec (per process)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    return fsspec.core.url_to_fs(url, **_storage_options(protocol))


class _Chunks(io.RawIOBase):
    """A stream of bytes [start, end) (end None: until the source ends) pulled with `fetch(a, b)`, at
    most `chunk` bytes at a time; `on_bytes` hears how many bytes each read hands out."""

    def __init__(
        self,
        fetch: Callable[[int, int], bytes],
        start: int,
        end: int | None,
        chunk: int,
        on_bytes: Callable[[int], None] | None,
        close: Callable[[], None] = lambda: None,
    ):
        super().__init__()
        self._fetch, self._pos, self._end, self._chunk = fetch, start, end, chunk
        self._on_bytes, self._close = on_bytes, close
        self._buf, self._at = b"", 0
        self.error: Exception | None = None  # the source's failure, if a read failed (not the tar's)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._at >= len(self._buf):
            if self._end is not None and self._pos >= self._end:
                return 0
            stop = self._pos + self._chunk if self._end is None else min(self._pos + self._chunk, self._end)
            try:
                self._buf, self._at = self._fetch(self._pos, stop), 0
            except Exception as exc:
                self.error = exc
                raise
            if not self._buf:
                return 0
            self._pos += len(self._buf)
        n = min(len(b), len(self._buf) - self._at)
        b[:n] = self._buf[self._at : self._at + n]
        self._at += n
        if self._on_bytes is not None:
            self._on_bytes(n)
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._close()
            finally:
                super().close()


def open_range(url: str, start: int, end: int, on_bytes: Callable[[int], None] | None = None) -> IO[bytes]:
    """Bytes [start, end) of a seekable source (`can_seek`), as a stream; reading past `end` gives EOF."""
    path = _local_path(url)
    if path is not None:
        f = open(path, "rb")
        f.seek(start)

        def read_file(a: int, b: int) -> bytes:
            data = f.read(b - a)
            if len(data) < b - a:
                raise ShortFile(f"{url}: ends before byte {b} (read [{a}, {a + len(data)}))")
            return data

        return _Chunks(read_file, start, end, LOCAL_CHUNK, on_bytes, f.close)
    fs, fs_path = _filesystem(url)
    if is_http(url):
        return _http_stream(fs, fs_path, url, start, end, on_bytes)

    def read_remote(a: int, b: int) -> bytes:
        try:
            data = fs.cat_file(fs_path, start=a, end=b)
        except Exception as exc:  # noqa: BLE001 - other backends' errors, named
            raise OSError(f"{url} bytes [{a}, {b}): {type(exc).__name__}: {exc}") from exc
        if len(data) != b - a:
            raise OSError(f"{url} bytes [{a}, {b}): got {len(data)} bytes")
        return data

    return _Chunks(read_remote, start, end, RANGE_CHUNK, on_bytes)


def _http_stream(
    fs, fs_path: str, url: str, start: int, end: int | None, on_bytes: Callable[[int], None] | None
) -> IO[bytes]:
    """Bytes [start, end) (end None: to the end) of an http(s) URL in one streamed GET."""
    what = f"{url} bytes [{start}, {'end' if end is None else end})"
    ranged = start > 0 or end is not None
    headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if ranged else {}
    try:
        # block_size=0: fsspec's streaming file (one GET, read as it arrives). `size` only spares
        # the HEAD request fsspec makes to learn a size that a streaming file never uses.
        f = fs.open(fs_path, "rb", block_size=0, size=end or 1, headers=headers)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - aiohttp's errors, named
        raise OSError(f"{what}: {type(exc).__name__}: {exc}") from exc
    response = f.r
    got = response.headers.get("Content-Range", "")
    if ranged and (response.status != 206 or not got.startswith(f"bytes {start}-")):
        f.close()
        raise RangeIgnored(
            f"{what}: the server answered {response.status} {got or '(no Content-Range)'} to a range "
            "request (it cannot be read mid-shard: its shards are read from their start)"
        )

    def read_http(a: int, b: int) -> bytes:
        try:
            data = f.read(b - a)
        except Exception as exc:  # noqa: BLE001 - a dropped or stalled connection, named
            raise OSError(f"{url} after byte {a}: {type(exc).__name__}: {exc}") from exc
        if not data and end is not None and a < end:
            raise OSError(f"{url}: the response for {what} ended at byte {a}")
        return data

    return _Chunks(read_http, start, end, HTTP_CHUNK, on_bytes, f.close)


def open_stream(url: str, on_bytes: Callable[[int], None] | None = None) -> IO[bytes]:
    """The whole source from its start, for any location (`pipe:` included)."""
    path = _local_path(url)
    if path is not None:
        f = open(path, "rb")
    elif is_http(url) and can_seek(url):
        fs, fs_path = _filesystem(url)
        return _http_stream(fs, fs_path, url, 0, None, on_bytes)
    elif can_seek(url):
        fs, fs_path = _filesystem(url)
        try:
            f = fs.open(fs_path, "rb", block_size=RANGE_CHUNK)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - named, as open() would
            raise OSError(f"{url}: {type(exc).__name__}: {exc}") from exc
    else:
        import webdataset as wds

        f = wds.gopen(url, "rb")
    if on_bytes is None:
        return f

    def read_stream(a: int, b: int) -> bytes:
        try:
            return f.read(b - a)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise OSError(f"{url} after byte {a}: {type(exc).__name__}: {exc}") from exc

    return _Chunks(read_stream, 0, None, LOCAL_CHUNK, on_bytes, f.close)
