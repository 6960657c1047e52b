"""The HTTP face of `qlora serve`: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, and /health.

Every request is checked here, before it reaches the engine's queue, and every refusal is OpenAI-shaped
JSON that the official client turns into its exception classes: 400 a body that is not JSON, 401 a wrong
or missing key, 404 a model that is not served, 413 a body over the limit, 422 a parameter out of range,
503 a full queue (with `x-should-retry: false`: retrying at once would only add load).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from qlora_cli.errors import QloraError
from qlora_cli.serve import Busy, Catalog, GenerationFailed, Job, collect, error_body, new_id, stream_events

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 4096
MAX_BODY_BYTES = 1 << 20  # a chat request is kilobytes; a megabyte is room for long conversations, not for abuse


class Sampled(BaseModel):
    # Fields the OpenAI API has and we do not use (user, logprobs: false, ...) are ignored, as OpenAI ignores
    # what it does not know; the ones we use are checked.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one answer per request")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not text for text in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampled):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("one prompt per request")
        return prompt


def refusal(status: int, message: str, param: str | None = None) -> JSONResponse:
    headers = {"x-should-retry": "false"} if status == 503 else None
    return JSONResponse(error_body(status, message, param=param), status_code=status, headers=headers)


def create_app(catalog: Catalog, *, api_key: str | None = None, max_body: int = MAX_BODY_BYTES) -> Starlette:
    engine = catalog.engine
    session = engine.session

    def unauthorized(request: Request) -> JSONResponse | None:
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return None
        return refusal(401, "a valid API key is needed: Authorization: Bearer KEY")

    async def read(request: Request, schema: type[BaseModel]) -> BaseModel | JSONResponse:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return refusal(413, f"request body of {declared} bytes is over the limit of {max_body}")
        raw = bytearray()
        async for piece in request.stream():  # counted as it comes: a body without Content-Length is bounded too
            raw += piece
            if len(raw) > max_body:
                return refusal(413, f"request body over the limit of {max_body} bytes")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return refusal(400, f"the body is not JSON: {error}")
        if not isinstance(body, dict):
            return refusal(400, "the body must be a JSON object")
        try:
            return schema.model_validate(body)
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            return refusal(422, f"{param}: {first['msg']}", param=param)

    async def start(parsed: Sampled, prompt_ids: list[int], adapter: str) -> Job | JSONResponse:
        job = Job(
            prompt_ids=prompt_ids,
            adapter=adapter,
            max_tokens=parsed.limit,
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            seed=parsed.seed,
            stop=parsed.stops,
            loop=asyncio.get_running_loop(),
            stream=parsed.stream,
        )
        try:
            engine.submit(job)
        except Busy as busy:
            return refusal(503, f"the server is busy ({busy}); try again shortly")
        return job

    async def route(parsed: Sampled) -> str | JSONResponse:
        try:
            return await asyncio.to_thread(catalog.resolve, parsed.model)
        except QloraError as error:
            return refusal(404, str(error), param="model")

    async def respond(parsed: Sampled, job: Job, kind: str) -> JSONResponse | StreamingResponse:
        made, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        if parsed.stream:
            role_sent = False  # OpenAI names the role in a stream's first delta only

            def chunk(text: str | None, finish: str | None) -> dict:
                nonlocal role_sent
                if kind == "chat":
                    delta = {} if text is None else {"content": text}
                    if not role_sent:
                        delta, role_sent = {"role": "assistant", **delta}, True
                    choice = {"index": 0, "delta": delta, "finish_reason": _finish(finish)}
                    return {
                        "id": made,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": parsed.model,
                        "choices": [choice],
                    }
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": _finish(finish)}
                return {
                    "id": made,
                    "object": "text_completion",
                    "created": created,
                    "model": parsed.model,
                    "choices": [choice],
                }

            return StreamingResponse(stream_events(job, chunk), media_type="text/event-stream")
        try:
            text, finish = await collect(job)
        except GenerationFailed as failed:
            return JSONResponse(error_body(500, str(failed), "server_error"), status_code=500)
        finally:
            if job.finish_reason is None:  # the handler was cancelled: the client left
                job.cancelled = True
        usage = {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(job.tokens),
            "total_tokens": len(job.prompt_ids) + len(job.tokens),
        }
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": _finish(finish),
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(finish)}
            obj = "text_completion"
        return JSONResponse(
            {"id": made, "object": obj, "created": created, "model": parsed.model, "choices": [choice], "usage": usage}
        )

    async def accepted(request: Request, schema: type[Sampled]) -> tuple[Sampled, str] | JSONResponse:
        """The checked request and the adapter it routes to, or the refusal: key, body, then model."""
        if (denied := unauthorized(request)) is not None:
            return denied
        parsed = await read(request, schema)
        if isinstance(parsed, JSONResponse):
            return parsed
        adapter = await route(parsed)
        return adapter if isinstance(adapter, JSONResponse) else (parsed, adapter)

    async def chat_completions(request: Request):
        if isinstance(checked := await accepted(request, ChatRequest), JSONResponse):
            return checked
        parsed, adapter = checked
        messages = [
            {"role": "system" if message.role == "developer" else message.role, "content": message.text}
            for message in parsed.messages
        ]
        if messages[-1]["role"] not in ("user", "tool"):
            return refusal(422, "messages: the last message must be the user's (or a tool's)", param="messages")
        try:
            prompt_ids = session.prompt_ids({"messages": messages}, adapter)
        except QloraError as error:  # the adapter's template refuses the conversation (role order)
            return refusal(422, str(error), param="messages")
        job = await start(parsed, prompt_ids, adapter)
        return job if isinstance(job, JSONResponse) else await respond(parsed, job, "chat")

    async def completions(request: Request):
        if isinstance(checked := await accepted(request, CompletionRequest), JSONResponse):
            return checked
        parsed, adapter = checked
        prompt = parsed.prompt if isinstance(parsed.prompt, str) else parsed.prompt[0]
        prompt_ids = session.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        job = await start(parsed, prompt_ids, adapter)
        return job if isinstance(job, JSONResponse) else await respond(parsed, job, "completion")

    async def models(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return JSONResponse(await asyncio.to_thread(catalog.listing))

    async def health(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return JSONResponse(
            {
                "status": "ok",
                "waiting": engine.waiting,
                "batches": engine.batches,
                "requests": engine.rows,
                "cancelled": engine.cancelled,
            }
        )

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return refusal(error.status_code, str(error.detail))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
    )


def _finish(reason: str | None) -> str | None:
    """OpenAI's finish reasons: a stop string or end of turn is 'stop', the token limit 'length'."""
    return None if reason is None else "length" if reason == "length" else "stop"
