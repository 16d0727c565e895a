"""The chunked DATA reader: terminator, dot-unstuffing, size limit, pipelined bytes left in place."""

import asyncio

import pytest

from relay.smtp import read_message_data


def read(stream: bytes, limit: int | None = None, chunk: int = 7) -> tuple[bytes | None, bytes]:
    async def main():
        reader = asyncio.StreamReader(limit=2**20)
        for i in range(0, len(stream), chunk):  # arrive in small pieces, splitting separators
            reader.feed_data(stream[i:i + chunk])
        reader.feed_eof()
        data = await read_message_data(reader, limit)
        return data, await reader.read()

    return asyncio.run(main())


@pytest.mark.parametrize("stream,message", [
    (b".\r\n", b""),
    (b"\r\n.\r\n", b"\r\n"),
    (b"one line\r\n.\r\n", b"one line\r\n"),
    (b"ends with a dot.\r\n.\r\n", b"ends with a dot.\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),
    (b"a\r\n..b\r\n...\r\nc.\r\n.\r\n", b"a\r\n.b\r\n..\r\nc.\r\n"),
    (b"..leading\r\n.\r\n", b".leading\r\n"),
    (b"bare\nlf\n.\r\n.\r\n", b"bare\nlf\n.\r\n"),  # a dot after a bare LF is not the end
])
@pytest.mark.parametrize("chunk", [1, 2, 7, 1000])
def test_terminator_and_unstuffing(stream, message, chunk):
    data, rest = read(stream + b"MAIL FROM:<next@example.com>\r\n", chunk=chunk)
    assert data == message
    assert rest == b"MAIL FROM:<next@example.com>\r\n"


def test_oversized_message_is_read_to_its_end_and_refused():
    body = b"x" * 70 + b"\r\n"
    data, rest = read(body * 100 + b".\r\nQUIT\r\n", limit=1000)
    assert data is None and rest == b"QUIT\r\n"
