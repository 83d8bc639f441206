"""The SSE reader and the free-port helper that the client, benchmarks and tests share."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx

from serve_app.ports import free_port, free_ports
from serve_app.sse import DONE, EventReader, aiter_data, iter_data

STREAM = (
    ": a comment\n\n"
    'data: {"a": 1}\n\n'
    "event: ping\nid: 7\nretry: 10\n\n"  # no data field: no event
    'data: {"b":\ndata: 2}\r\n\r\n'
    "data:no-space\n\n"
    "data:  two spaces\n\n"
    "data\n\n"
    "data: [DONE]\n\n"
)
EXPECTED = ['{"a": 1}', '{"b":\n2}', "no-space", " two spaces", "", DONE]


def test_iter_data_follows_the_sse_rules() -> None:
    assert list(iter_data(STREAM.splitlines())) == EXPECTED


def test_an_event_cut_before_its_blank_line_is_dropped() -> None:
    assert list(iter_data(["data: 1", "", "data: [DONE]"])) == ["1"]


def test_feed_says_when_an_event_ends() -> None:
    reader = EventReader()
    assert reader.feed("data: x") is None
    assert reader.feed("") == "x"
    assert reader.feed("") is None  # a second blank line ends nothing


def _transport(body: bytes) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, content=body))


def test_iter_data_reads_httpx_lines() -> None:
    with httpx.Client(transport=_transport(STREAM.encode())) as client:
        response = client.get("http://test/")
        assert list(iter_data(response.iter_lines())) == EXPECTED


def test_aiter_data_reads_httpx_lines() -> None:
    async def read() -> list[str]:
        async with httpx.AsyncClient(transport=_transport(STREAM.encode())) as client:
            response = await client.get("http://test/")
            return [data async for data in aiter_data(response.aiter_lines())]

    assert asyncio.run(read()) == EXPECTED


def test_aiter_data_takes_any_async_source() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in ["data: a", "", "data: b"]:
            yield line

    async def read() -> list[str]:
        return [data async for data in aiter_data(lines())]

    assert asyncio.run(read()) == ["a"]


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in [*ports, free_port()]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
