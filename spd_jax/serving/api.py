"""The OpenAI-compatible HTTP API over a `ServingEngine` (FastAPI; run by uvicorn in `spd_jax.commands.serve`).

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template), each with
`"stream": true` (server-sent events, `data: {...}` chunks then `data: [DONE]`, as the OpenAI API sends them)
and without; GET /v1/models, GET /health, GET /metrics (Prometheus text). Bad input is a 4xx with an
OpenAI-style body {"error": {"message", "type", "param", "code"}}; a full queue is a 503.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from spd_jax.serving.decoder import Sampling
from spd_jax.serving.engine import QueueFull, Request, ServingEngine


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not use are ignored, as the OpenAI API does

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    @field_validator("n")
    @classmethod
    def _one(cls, v):
        if v != 1:
            raise ValueError("only n = 1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string, or a list of one string)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class Completions:
    """What the two completion endpoints share: the request checked against the model and its context, the request
    queued on the engine, and the answer collected (or streamed as server-sent events)."""

    def __init__(self, engine: ServingEngine, model_name: str, context: int, default_max_tokens: int):
        self.engine, self.model_name, self.context, self.default_max_tokens = engine, model_name, context, default_max_tokens

    def engine_failed(self) -> APIError:
        return APIError(503, f"the server cannot decode: {self.engine.failure}", "server_error", code="engine_failed")

    def sampling(self, body: _Sampling, prompt_ids: list[int]) -> Sampling:
        if self.engine.failure is not None:
            raise self.engine_failed()
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens
        if len(prompt_ids) + max_tokens > self.context:
            raise APIError(400, f"the prompt's {len(prompt_ids)} tokens + max_tokens {max_tokens} exceed the model's "
                                f"context of {self.context} tokens", param="max_tokens", code="context_length_exceeded")
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        return Sampling(max_tokens, body.temperature, body.top_p, seed % (1 << 31))

    async def __call__(self, http: HTTPRequest, body: _Sampling, prompt_ids: list[int], chat: bool):
        sampling = self.sampling(body, prompt_ids)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(prompt_ids, sampling, tuple(body.stop or ()),
                      emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise APIError(503, str(e), "server_overloaded", code="queue_full") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if chat else "text_completion"
        if body.stream:
            return StreamingResponse(self.stream(req, events, rid, obj, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collected = await self.collect(http, req, events)
        if collected is None:  # the client went away
            return None
        text, finish = collected
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": req.completion_tokens,
                          "total_tokens": len(prompt_ids) + req.completion_tokens}}

    async def collect(self, http: HTTPRequest, req: Request, events: asyncio.Queue) -> tuple[str, str] | None:
        """(the completion's text, its finish reason), or None when the client disconnected (the request is then
        cancelled: the engine drops it at its next chunk)."""
        parts = []
        try:
            while True:
                try:
                    kind, *rest = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancelled.set()
                        return None
                    if self.engine.failure is not None:
                        raise self.engine_failed() from None
                    continue
                if kind == "delta":
                    parts.append(rest[0])
                elif kind == "error":
                    raise APIError(500, rest[0], "server_error")
                else:
                    return "".join(parts), rest[0]
        except asyncio.CancelledError:
            req.cancelled.set()
            raise

    async def stream(self, req: Request, events: asyncio.Queue, rid: str, obj: str, chat: bool):
        obj = obj + (".chunk" if chat else "")

        def chunk(delta_text=None, finish=None, first=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {} if delta_text is None else {"content": delta_text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(first=True)
            while True:
                try:
                    kind, *rest = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if self.engine.failure is None:
                        continue
                    kind, rest = "error", [self.engine_failed().message]
                if kind == "delta":
                    if rest[0]:
                        yield chunk(rest[0])
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': rest[0], 'type': 'server_error'}})}\n\n"
                    return
                else:
                    yield chunk(None, rest[0])
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away (or the stream ended): the engine drops the request at its next chunk
            req.cancelled.set()


def create_app(engine: ServingEngine, model_name: str, context: int, default_max_tokens: int = 16) -> FastAPI:
    app = FastAPI(title="spd-serve", docs_url=None, redoc_url=None)
    created = int(time.time())
    complete = Completions(engine, model_name, context, default_max_tokens)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        msg = first.get("msg", "invalid request")
        return error_response(400, f"{'.'.join(loc) or 'body'}: {msg}", param=".".join(loc) or None)

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.get("/health")
    async def health():
        if engine.failure is not None or not engine.worker.is_alive():
            return error_response(503, "the decode worker is not running", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "spd-jax", "max_model_len": context}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics_text(model_name), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest, body: CompletionRequest):
        if body.echo or body.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
        return await complete(http, body, engine.tok(body.prompt, add_special_tokens=True)["input_ids"], chat=False)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest, body: ChatRequest):
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = engine.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001 - templates raise on roles they do not know
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return await complete(http, body, list(ids), chat=True)

    return app
