"""What the engine and its client in the replica share: reading one request's (or n choices')
outputs off an asyncio queue until they finish, aborting what is left when the reader goes.
Torch-free, so the replica side of the engine process does not import torch for it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from serve_app.engine.types import RequestOutput


def merged(output: RequestOutput, ready: asyncio.Queue[RequestOutput]) -> RequestOutput:
    """This output plus every one already queued behind it, as one: a consumer that fell behind
    (a busy event loop, a slow client) gets one item per wake-up instead of one per token, so
    fewer items cross Ray; one that keeps up still gets each token as it comes."""
    while not output.is_finished and not ready.empty():
        later = ready.get_nowait()
        logprobs = [*(output.logprobs or []), *(later.logprobs or [])] or None
        output = dataclasses.replace(later, text=output.text + later.text, logprobs=logprobs)
    return output


async def read_outputs(
    outputs: asyncio.Queue[RequestOutput], abort: Callable[[], None]
) -> AsyncIterator[RequestOutput]:
    """One request's outputs (merged when the reader is behind) until it finishes; `abort`
    when the reader goes away first (client disconnect, cancel)."""
    is_finished = False
    try:
        while not is_finished:
            output = merged(await outputs.get(), outputs)
            is_finished = output.is_finished
            yield output
    finally:
        if not is_finished:
            abort()


async def read_choices(
    ready: asyncio.Queue[tuple[int, RequestOutput]],
    choice_ids: list[str],
    abort: Callable[[str], None],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(choice index, delta) of n choices until all finish; the unfinished ones are aborted
    when the reader goes away first."""
    unfinished = set(range(len(choice_ids)))
    try:
        while unfinished:
            index, output = await ready.get()
            if output.is_finished:
                unfinished.discard(index)
            yield index, output
    finally:
        for index in unfinished:
            abort(choice_ids[index])
