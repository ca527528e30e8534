"""Incremental Server-Sent Events parsing: bytes from the network in, event data out.

`SSEParser.feed(chunk)` returns the `data` of every event completed by `chunk`
(several `data:` lines of one event are joined with newlines, as the SSE spec
says; comments and other fields are skipped). Lines may end in LF or CRLF and
may be split anywhere across chunks. An event cut off by the end of the stream
(no blank line after it) is never returned, as the spec requires. Kept to bytes operations: it runs once per
network read of every stream, so the load tester's overhead depends on it.
"""
from __future__ import annotations


class SSEParser:
    __slots__ = ("_buffer", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        *lines, self._buffer = buffer.split(b"\n")
        events = []
        data = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        return events
