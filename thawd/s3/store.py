"""The one S3 client of thawd: heads, ranged reads into memory, multipart uploads.

Credentials come from boto3's standard chain (environment, shared profile, container or
instance role) and are never put in a message or a log line: botocore's own loggers are held
at WARNING, because at DEBUG they print request headers, which carry session tokens.

Every request names the object's ETag (If-Match), so an object replaced after thawd read its
manifest answers 412 and is refused as changed, never mixed into a snapshot. botocore retries
a request that fails before its body (connection refused, 5xx, throttling) up to
`max_attempts` times; a body cut off midway is resumed here from the byte it reached, within
the same number of attempts: a dead store fails a pin in bounded time with one clear error.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from thaw.errors import DaemonError, NotFound, PermissionDenied, SnapshotChanged
from thawd.s3.config import ObjectRef, S3Config

log = logging.getLogger("thawd.s3")
for _name in ("botocore", "boto3", "urllib3", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# Bodies are copied into pool memory in pieces of this size: one piece of Python bytes at a
# time per connection, not a whole 64 MiB part.
READ_PIECE = 1 << 20


class Unreachable(DaemonError):
    """The store did not answer, or broke off, within the bounded attempts."""


class Store:
    """boto3's S3 client for `config` (made on first use: importing boto3 costs 0.3 s, and
    only a thawd with object storage on pays it)."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._client: Any = None
        self._lock = threading.Lock()
        # What a body cut off midway raises; botocore's and urllib3's errors join once boto3
        # is imported (ResponseStreamingError, IncompleteReadError, ProtocolError).
        self._body_errors: tuple[type[Exception], ...] = (OSError, ValueError)

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make()
            return self._client

    def _make(self) -> Any:
        try:
            import boto3
            from botocore.config import Config as BotoConfig
            from botocore.exceptions import BotoCoreError
            from urllib3.exceptions import HTTPError
        except ImportError:
            raise DaemonError("object storage needs boto3: pip install 'thaw[s3]'") from None
        self._body_errors = (OSError, ValueError, BotoCoreError, HTTPError)
        c = self.config
        boto = BotoConfig(
            retries={"total_max_attempts": c.max_attempts, "mode": "standard"},
            connect_timeout=c.timeout_s,
            read_timeout=c.timeout_s,
            max_pool_connections=2 * c.connections,
        )
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=c.endpoint_url or None,
                              region_name=c.region or None, config=boto)  # fmt: skip

    # --- reading ------------------------------------------------------------------------------

    def head(self, ref: ObjectRef) -> tuple[int, str]:
        """The object's size and ETag."""
        answer = self._call(ref, "read", lambda: self.client.head_object(Bucket=ref.bucket,
                                                                          Key=ref.key))  # fmt: skip
        return int(answer["ContentLength"]), str(answer["ETag"])

    def read(self, ref: ObjectRef, etag: str, start: int, length: int) -> bytes:
        """Bytes [start, +length) of the object whose ETag is `etag` (small ranges: a header,
        a manifest of at most 64 MiB)."""
        out = bytearray(length)
        buf = (ctypes.c_char * length).from_buffer(out) if length else None
        self.read_into(ref, etag, start, length, ctypes.addressof(buf) if buf is not None else 0)
        del buf
        return bytes(out)

    def read_into(self, ref: ObjectRef, etag: str, start: int, length: int, addr: int) -> None:
        """Bytes [start, +length) of the object into memory at `addr`: exactly `length`, or an
        error (a short body is never taken for the whole)."""
        done, attempts = 0, 0
        while done < length:
            attempts += 1
            try:
                body = self._get(ref, etag, start + done, start + length)
                try:
                    while done < length:
                        piece = body.read(min(READ_PIECE, length - done))
                        if not piece:
                            break
                        ctypes.memmove(addr + done, piece, len(piece))
                        done += len(piece)
                finally:
                    body.close()
                if done < length and attempts >= self.config.max_attempts:
                    raise Unreachable(
                        f"{ref.uri}: the store sent {start + done} of the bytes up to "
                        f"{start + length}, {attempts} times cut short"
                    )
            except Unreachable:
                raise
            except self._body_errors as e:  # a body broken off midway
                if attempts >= self.config.max_attempts:
                    raise Unreachable(f"{ref.uri}: reading bytes from {start + done} failed "
                                      f"{attempts} times: {e}") from None  # fmt: skip
                log.info("%s: read cut off at byte %d (%s); resuming", ref.uri, start + done, e)

    def _get(self, ref: ObjectRef, etag: str, start: int, end: int) -> Any:
        """The body of bytes [start, end) of this version of the object."""
        span = f"bytes={start}-{end - 1}"
        answer = self._call(ref, "read", lambda: self.client.get_object(
            Bucket=ref.bucket, Key=ref.key, IfMatch=etag, Range=span))  # fmt: skip
        return answer["Body"]

    # --- writing ------------------------------------------------------------------------------

    def upload(self, ref: ObjectRef, size: int, part: Callable[[int, int], bytes]) -> str:
        """Write an object of `size` bytes as one multipart upload, part i being
        `part(offset, length)`. Each part carries its MD5 (the store refuses a part that
        arrived damaged); nothing is visible under the key until the upload completes, and an
        upload that fails is aborted. Returns the new object's ETag, checked against the
        parts' MD5s where the store uses S3's multipart ETag."""
        c = self.config
        ranges = [(o, min(c.part_size, size - o)) for o in range(0, size, c.part_size)]
        upload_id = self._call(ref, "write", lambda: self.client.create_multipart_upload(
            Bucket=ref.bucket, Key=ref.key))["UploadId"]  # fmt: skip
        md5s: list[bytes] = [b""] * len(ranges)

        def send(i: int) -> dict[str, Any]:
            data = part(*ranges[i])
            md5s[i] = hashlib.md5(data, usedforsecurity=False).digest()
            answer = self._call(ref, "write", lambda: self.client.upload_part(
                Bucket=ref.bucket, Key=ref.key, UploadId=upload_id, PartNumber=i + 1, Body=data,
                ContentMD5=base64.b64encode(md5s[i]).decode()))  # fmt: skip
            return {"PartNumber": i + 1, "ETag": answer["ETag"]}

        try:
            with ThreadPoolExecutor(c.connections, thread_name_prefix="thawd-s3-up") as pool:
                parts = list(pool.map(send, range(len(ranges))))
            self._call(ref, "write", lambda: self.client.complete_multipart_upload(
                Bucket=ref.bucket, Key=ref.key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}))  # fmt: skip
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=ref.bucket, Key=ref.key,
                                                   UploadId=upload_id)  # fmt: skip
            except Exception as e:  # the store's lifecycle rules clean what is left
                log.warning("%s: aborting the failed upload failed too: %s", ref.uri, e)
            raise
        found, etag = self.head(ref)
        expected = multipart_etag(md5s)
        if found != size or (etag.strip('"').endswith(f"-{len(md5s)}") and etag != expected):
            raise DaemonError(
                f"{ref.uri}: the store holds {found} bytes with ETag {etag} after the upload; "
                f"{size} bytes with ETag {expected} were sent"
            )
        return etag

    # --- errors -------------------------------------------------------------------------------

    def _call(self, ref: ObjectRef, action: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, its botocore errors as thaw's: the store's answer, never credentials."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in ("PreconditionFailed", "412") or status == 412:
                raise SnapshotChanged(f"{ref.uri}: the object was replaced since thawd read its "
                                      "manifest; register it again") from None  # fmt: skip
            if code == "NoSuchBucket":
                raise NotFound(f"{ref.uri}: the store has no bucket {ref.bucket!r}") from None
            if code in ("NoSuchKey", "404") or status == 404:
                raise NotFound(f"{ref.uri}: no such object") from None
            if code in ("AccessDenied", "403") or status == 403:
                raise PermissionDenied(f"{ref.uri}: the store refuses thawd's credentials "
                                       f"permission to {action} it") from None  # fmt: skip
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                what = f"{status} {code}" if code and code != str(status) else str(status)
                raise Unreachable(f"{ref.uri}: the store answered {what} to all of "
                                  f"{self.config.max_attempts} attempts") from None  # fmt: skip
            raise DaemonError(f"{ref.uri}: the store answered {code or status}") from None
        except NoCredentialsError:
            raise PermissionDenied("thawd found no S3 credentials (environment, profile or "
                                   "instance role)") from None  # fmt: skip
        except BotoCoreError as e:
            raise Unreachable(f"{ref.uri}: object storage unreachable after "
                              f"{self.config.max_attempts} attempts: {e}") from None  # fmt: skip


def multipart_etag(md5s: Sequence[bytes]) -> str:
    """S3's ETag of a multipart object: the MD5 of its parts' MD5s, then "-" and their count."""
    return f'"{hashlib.md5(b"".join(md5s), usedforsecurity=False).hexdigest()}-{len(md5s)}"'
