"""A lean HTTP/1.1 client for the serving benchmark: one keep-alive connection per client,
JSON bodies and Server-Sent Events over chunked transfer encoding, nothing else.

The clients share this machine's two cores with the server. httpx spends ~1 ms of CPU per
request and ~50 us per streamed event, which the server then does not get; this client
spends a fraction of that, so the benchmark measures the server rather than its clients.
(`--client httpx` in serving_bench.py runs the same loads with httpx.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator


class HttpError(RuntimeError):
    def __init__(self, message: str, status: int = 0, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RawClient:
    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port, self.key = host, port, key
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None

    async def _send(self, path: str, body: dict) -> dict[str, str]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self._writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.key}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await self._writer.drain()
        status = await self._reader.readline()
        headers = {}
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        code = int(status.split()[1])
        if code != 200:
            raise HttpError(f"{path}: HTTP {code}: {await self._read_body(headers)!r}", code,
                            headers.get("retry-after"))
        return headers

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await self._reader.readexactly(int(headers["content-length"]))
        return b"".join([chunk async for chunk in self._chunks()])

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            size = int((await self._reader.readline()).strip(), 16)
            chunk = await self._reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return
            yield chunk[:-2]

    async def post_json(self, path: str, body: dict) -> dict:
        headers = await self._send(path, body)
        return json.loads(await self._read_body(headers))

    async def events(self, path: str, body: dict) -> AsyncIterator[dict]:
        """The JSON payload of each SSE `data:` event of a streamed response."""
        await self._send(path, body)
        buf = b""
        async for chunk in self._chunks():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: {"):
                    yield json.loads(event[6:])
