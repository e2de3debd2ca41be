"""Streaming multipart upload straight to disk, with a size cap and a running SHA-256.

Starlette's ``request.form()`` spools a whole file before the handler sees it, so an oversize
upload could only be refused after it had been stored. Here the body is parsed as it arrives
(python-multipart's push parser): file bytes go to the destination in chunks, memory stays flat
whatever the size, and past ``max_bytes`` the partial file is removed and the rest of the body is
drained (so the client gets its 413 instead of a broken pipe) without being stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

MAX_FIELD_BYTES = 64 * 1024


class UploadError(Exception):
    """The upload cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass
class UploadResult:
    """What arrived: the text fields and, for the file field, where it was stored."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    path: Path | None = None


class _Receiver:
    """python-multipart callbacks: route each part to the file or to a small text buffer."""

    def __init__(self, file_field: str, dest: Path, max_bytes: int) -> None:
        self.file_field, self.dest, self.max_bytes = file_field, dest, max_bytes
        self.result = UploadResult()
        self.hash = hashlib.sha256()
        self.too_large = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def part_begin(self) -> None:
        self._headers, self._name, self._buffer = {}, None, bytearray()

    def header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == self.file_field:
            if self.result.path is not None:
                raise UploadError(422, f"more than one '{self.file_field}' part", self.file_field)
            self.result.filename = params.get(b"filename", b"upload").decode("utf-8", "replace")
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.dest.open("wb")
            self.result.path = self.dest

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            n = end - start
            if self.result.size + n > self.max_bytes:
                self.too_large = True
                self.discard()
                return
            self._file.write(data[start:end])
            self.hash.update(data[start:end])
            self.result.size += n
        elif self._name is not None and not self.too_large:
            if len(self._buffer) + end - start > MAX_FIELD_BYTES:
                raise UploadError(422, f"form field {self._name!r} is too long", self._name)
            self._buffer += data[start:end]

    def part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._name is not None and self._name != self.file_field:
            self.result.fields[self._name] = self._buffer.decode("utf-8", "replace")

    def discard(self) -> None:
        """Close and remove the partial file (oversize, client gone, parse error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.dest.unlink(missing_ok=True)
        self.result.path = None


async def receive_upload(
    request: Request, dest: Path, max_bytes: int, chunk_bytes: int = 1 << 20, file_field: str = "file"
) -> UploadResult:
    """Parse a ``multipart/form-data`` body, storing the ``file_field`` part at ``dest``.

    Raises :class:`UploadError` (413 past ``max_bytes``, 400/422 for malformed bodies); no partial
    file is left behind when it does.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "expected a multipart/form-data body")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MAX_FIELD_BYTES * 4:
        raise UploadError(413, f"upload of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")
    receiver = _Receiver(file_field, dest, max_bytes)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    pending = bytearray()
    try:
        async for chunk in request.stream():
            if receiver.too_large:
                continue  # drain without storing, so the client reads our 413
            pending += chunk
            if len(pending) >= chunk_bytes:
                data, pending = bytes(pending), bytearray()
                await anyio.to_thread.run_sync(parser.write, data)
        if pending and not receiver.too_large:
            await anyio.to_thread.run_sync(parser.write, bytes(pending))
        if not receiver.too_large:
            parser.finalize()
    except UploadError:
        receiver.discard()
        raise
    except Exception as exc:  # client disconnect, malformed multipart
        receiver.discard()
        raise UploadError(400, f"malformed or interrupted upload: {exc}") from None
    if receiver.too_large:
        raise UploadError(413, f"upload exceeds the limit of {max_bytes} bytes")
    if receiver.result.path is None:
        raise UploadError(422, f"missing the '{file_field}' file part", file_field)
    receiver.result.sha256 = receiver.hash.hexdigest()
    return receiver.result
