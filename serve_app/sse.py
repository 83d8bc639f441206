"""Client side of the event streams the ingress writes: the `data:` payload of each SSE event.

Shared by the CLI's chat client, the benchmarks and the tests; plain Python, no HTTP library.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

DONE = "[DONE]"  # the payload of the last event of a finished OpenAI stream


class EventReader:
    """Feeds SSE lines (without their line ends) in, gets each event's data out.

    Follows the SSE rules the OpenAI streams use: an event's `data:` lines (one space after the
    colon dropped) are joined with newlines and the event ends at a blank line; comments
    (`:...`) and other fields (`event:`, `id:`, `retry:`) are skipped. An event not closed by a
    blank line when the stream ends is not an event (the stream was cut).
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: list[str] | None = None

    def feed(self, line: str) -> str | None:
        """The finished event's data when `line` ends one, else None."""
        if not line:
            data, self._data = self._data, None
            return None if data is None else "\n".join(data)
        field, _, value = line.partition(":")
        if field == "data":
            if self._data is None:
                self._data = []
            self._data.append(value.removeprefix(" "))
        return None


def iter_data(lines: Iterable[str]) -> Iterator[str]:
    """The data of each event in SSE `lines` (e.g. httpx's `iter_lines()`), `[DONE]` included."""
    reader = EventReader()
    for line in lines:
        data = reader.feed(line)
        if data is not None:
            yield data


async def aiter_data(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """`iter_data` for async line sources (e.g. httpx's `aiter_lines()`)."""
    reader = EventReader()
    async for line in lines:
        data = reader.feed(line)
        if data is not None:
            yield data
