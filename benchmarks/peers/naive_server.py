"""Naive peer of the serving benchmark: one `model.generate()` per request, no batching.

Each request runs generate in its own thread with a TextIteratorStreamer (the pattern of the
transformers docs) behind an OpenAI-compatible streaming `/v1/chat/completions`. A client that
disconnects stops its generate at the next token, so a cut level does not spill into the next.

    .venv/bin/python benchmarks/peers/naive_server.py --model-dir DIR --port 8123
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

MODEL_ID = "naive"


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _chunk(response_id: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class NaiveServer:
    def __init__(self, model_dir: str, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.readers = ThreadPoolExecutor(max_workers=256)  # blocking streamer reads

    def start_generate(
        self, body: dict[str, Any], streamer: TextIteratorStreamer, stop: threading.Event
    ) -> tuple[int, dict[str, Any], threading.Thread]:
        inputs: Any = self.tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        temperature = float(body.get("temperature", 1.0))
        kwargs = {
            **inputs,
            "max_new_tokens": int(body.get("max_tokens") or 256),
            "do_sample": temperature > 0,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_StopWhenSet(stop)]),
            "pad_token_id": self.tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                with torch.no_grad():
                    result["ids"] = self.model.generate(**kwargs)
            except Exception as exc:  # noqa: BLE001 -- reported to the client as an error event
                result["error"] = str(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return int(inputs["input_ids"].shape[1]), result, thread

    async def events(self, body: dict[str, Any]) -> AsyncIterator[str]:
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        num_prompt, result, thread = self.start_generate(body, streamer, stop)
        loop = asyncio.get_running_loop()
        pieces: Iterator[str] = iter(streamer)
        try:
            yield _sse(_chunk(response_id, {"role": "assistant", "content": ""}))
            while (
                text := await loop.run_in_executor(self.readers, next, pieces, None)
            ) is not None:
                if text:
                    yield _sse(_chunk(response_id, {"content": text}))
            await loop.run_in_executor(self.readers, thread.join)  # the streamer ends first
            if "error" in result:
                yield _sse({"error": {"message": result["error"], "type": "server_error"}})
            else:
                yield self.final_events(response_id, body, num_prompt, result)
            yield _sse("[DONE]")
        finally:
            stop.set()

    def final_events(
        self, response_id: str, body: dict[str, Any], num_prompt: int, result: dict[str, Any]
    ) -> str:
        num_generated = int(result["ids"].shape[1]) - num_prompt
        is_length = num_generated >= int(body.get("max_tokens") or 256)
        out = _sse(_chunk(response_id, {}, "length" if is_length else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": num_prompt,
                "completion_tokens": num_generated,
                "total_tokens": num_prompt + num_generated,
            }
            out += _sse({**_chunk(response_id, {}), "choices": [], "usage": usage})
        return out


def build_app(server: NaiveServer) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        return StreamingResponse(server.events(body), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    app = build_app(NaiveServer(args.model_dir, args.threads))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
