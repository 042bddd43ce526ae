"""Shard bytes wherever clusters keep them, read through transient errors.

A location is a local path, a `pipe:` command (webdataset's gopen runs it; its exit status is checked),
an http(s) URL (the standard library, with a Range request to continue), or any other fsspec URL (`s3://`
needs s3fs, `gs://` gcsfs; fsspec seeks to continue). `ShardReader` hands a shard's bytes out in order;
when a read fails with a dropped connection, a timeout, a 5xx or a failed command, it waits (0.5, 1, 2,
4 s) and reopens at the byte it had reached, counting each retry, so no byte is read twice or missed. A
missing or forbidden shard (404, 403, FileNotFoundError) is not retried; neither is one that keeps failing
past `ATTEMPTS`: the caller skips it and counts it.
"""

import contextlib
import http.client
import time
import urllib.error
import urllib.request
from collections import Counter

ATTEMPTS = 5  # opens at one position before the shard counts as unreadable
FIRST_DELAY_S = 0.5  # doubles after each failure
HTTP_TIMEOUT_S = 60
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ImportError)
TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429})  # plus every 5xx


class ShardUnreadable(OSError):
    """A shard that failed every attempt; the message names it and the last error."""


def is_remote(location: str) -> bool:
    return location.startswith("pipe:") or ("://" in location and not location.startswith("file://"))


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0] if "/" in location else "."


def read_bytes(location: str, retries: Counter | None = None) -> bytes:
    with ShardReader(location, Counter() if retries is None else retries) as reader:
        return reader.read()


class ShardReader:
    """A file-like reader (read, close) of one location that retries transient failures where it stopped."""

    def __init__(self, location: str, retries: Counter):
        self.location, self.retries, self.offset, self.stream = location, retries, 0, None

    def read(self, size: int = -1) -> bytes:
        for attempt in range(ATTEMPTS):
            try:
                if self.stream is None:
                    self.stream = _open_at(self.location, self.offset)
                data = self.stream.read(size)
                if not data and size and isinstance(self.stream, http.client.HTTPResponse) and self.stream.length:
                    # http.client returns b"" when a connection closes before Content-Length: not the end
                    raise ConnectionError(f"connection closed {self.stream.length} bytes before the end")
                self.offset += len(data)
                return data
            except PERMANENT_ERRORS:
                raise
            except Exception as error:  # network, timeout, 5xx, failed command: reopen where we were
                self._close_stream()
                if attempt + 1 == ATTEMPTS:
                    raise ShardUnreadable(f"{self.location}: {ATTEMPTS} attempts failed, last: {error}") from error
                self.retries["read_retries"] += 1
                time.sleep(FIRST_DELAY_S * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # a dead connection or a failed command: nothing left to read
                stream.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_at(location: str, offset: int):
    if location.startswith("pipe:"):
        from webdataset.gopen import gopen

        return _skipped(gopen(location), offset)  # a command cannot seek: read past what we had
    if location.startswith(("http://", "https://")):
        return _open_http(location, offset)
    if is_remote(location):
        import fsspec

        stream = fsspec.open(location, "rb").open()
    else:
        stream = open(location.removeprefix("file://"), "rb")  # noqa: SIM115 (the ShardReader closes it)
    stream.seek(offset)
    return stream


def _open_http(url: str, offset: int):
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code >= 500 or error.code in TRANSIENT_HTTP_STATUS:
            raise ConnectionError(f"HTTP {error.code} {error.reason}") from None
        if error.code in (401, 403):
            raise PermissionError(f"{url}: HTTP {error.code} {error.reason}") from None
        raise FileNotFoundError(f"{url}: HTTP {error.code} {error.reason}") from None
    return _skipped(response, offset) if offset and response.status != 206 else response  # Range ignored


def _skipped(stream, count: int):
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError(f"stream ended after {count} fewer bytes than read before")
        count -= len(chunk)
    return stream
