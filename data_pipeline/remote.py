"""Opening a shard url: local paths, `http(s)://` (read directly, resumed after a dropped
connection) and anything else `webdataset.gopen` opens (`pipe:aws s3 cp ... -`, `file:`).

http(s): a GET with `Range: bytes=<offset>-` when the reader starts inside the shard; when the
connection drops (reset, timeout, fewer bytes than announced, a 5xx or 429 reply), the reader
waits `BACKOFF * 2**try` seconds (capped at `MAX_BACKOFF`) and asks again from the byte it has
reached, up to `RETRIES` times; then `RemoteReadError` names the url, the byte offset and the
last error. A retry is invisible to the tar reader above (the same bytes arrive in order), so
the stream position does not depend on it. A 4xx reply other than 408/429 is not retried.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import IO

from webdataset import gopen

log = logging.getLogger(__name__)
RETRIES = 5  # reconnections after the first attempt
BACKOFF = 0.5  # seconds before the first retry; doubled each time
MAX_BACKOFF = 30.0
TIMEOUT = 60.0  # seconds without a byte before the connection counts as dropped
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_DROPPED = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, OSError)


class RemoteReadError(OSError):
    """An http(s) shard that could not be read; the message names the url."""


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def local_file(url: str) -> str | None:
    """The path of a local shard url (plain or `file:`), None for pipes and remote urls."""
    if "://" in url or url.startswith("pipe:"):
        return None
    return url[5:] if url.startswith("file:") else url


class OpenFiles:
    """Local shard files kept open between reads, at most `limit` (least recently used ones
    closed first), for readers that open the same shard window after window. Only for callers
    that seek before every read (`shard_reader._read_keys`). Entries opened in another process
    (before a fork: a shared descriptor shares its offset) are never used."""

    def __init__(self, limit: int = 128):
        self.limit = limit
        self._files: OrderedDict[str, IO[bytes]] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str) -> IO[bytes]:
        if self._pid != os.getpid():  # inherited through fork: start afresh, leave the parent's alone
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(path)
        if f is not None:
            self._files.move_to_end(path)
            return f
        f = open(path, "rb")  # noqa: SIM115 - closed when evicted or by close()
        self._files[path] = f
        if len(self._files) > self.limit:
            self._files.popitem(last=False)[1].close()
        return f

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files.clear()


def open_shard(url: str, offset: int = 0) -> tuple[IO[bytes], bool]:
    """(readable binary stream, whether it starts at byte `offset`).

    Local files and http(s) urls start at `offset`; `pipe:` and other gopen urls always start
    at byte 0 (the caller then skips to what it needs).
    """
    if is_http(url):
        return io.BufferedReader(HttpReader(url, offset), buffer_size=1 << 20), True
    path = local_file(url)
    if path is not None:
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
        if offset:
            f.seek(offset)
        return f, True
    return gopen(url, "rb"), offset == 0


class HttpReader(io.RawIOBase):
    """Sequential bytes of an http(s) url from `offset` on, reconnecting where it dropped."""

    def __init__(self, url: str, offset: int = 0, retries: int | None = None, backoff: float | None = None):
        self.url = url
        self.pos = offset
        self.end: int | None = None  # file size when the server told us
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF if backoff is None else backoff
        self._resp: http.client.HTTPResponse | None = None
        self._connect()

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
                log.warning("%s: %s; retrying from byte %d in %.1fs (%d/%d)", self.url, last, self.pos, wait, attempt, self.retries)
                time.sleep(wait)
            try:
                self._resp = self._request()
                return
            except urllib.error.HTTPError as err:
                if err.code not in _RETRY_STATUS:
                    raise RemoteReadError(f"{self.url}: HTTP {err.code} {err.reason} (byte {self.pos})") from None
                last = err
            except _DROPPED as err:
                last = err
        raise RemoteReadError(
            f"{self.url}: cannot read from byte {self.pos} after {self.retries + 1} tries "
            f"(last error: {type(last).__name__}: {last})"
        )

    def _request(self) -> http.client.HTTPResponse:
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be the file's
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=TIMEOUT)  # noqa: S310 - http(s) only
        if self.pos and resp.status == 200:  # the server ignored the Range: skip to our byte
            left = self.pos
            while left:
                got = resp.read(min(left, 1 << 20))
                if not got:
                    raise http.client.IncompleteRead(b"", left)
                left -= len(got)
        length = resp.headers.get("Content-Length")
        if length is not None:
            self.end = self.pos + int(length)
        return resp

    def readinto(self, buf) -> int:  # type: ignore[override]
        while True:
            if self.end is not None and self.pos >= self.end:
                return 0
            try:
                n = self._resp.readinto(buf) if self._resp is not None else 0
            except _DROPPED as err:
                n, why = 0, err
            else:
                why = None
                if n == 0 and (self.end is None or self.pos >= self.end):
                    return 0
            if n:
                self.pos += n
                return n
            # dropped before the announced end (or with an error): reconnect from here
            self._close_response()
            log.warning("%s: connection dropped at byte %d (%s)", self.url, self.pos, why or "short read")
            self._connect()

    def _close_response(self) -> None:
        if self._resp is not None:
            try:
                self._resp.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass
            self._resp = None

    def close(self) -> None:
        self._close_response()
        super().close()
