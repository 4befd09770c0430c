"""The OpenAI-compatible HTTP edge: FastAPI routes over the same Frontend as gRPC.

    GET  /v1/models               the served model (and /v1/models/{id})
    POST /v1/completions          prompt(s) -> text choices; `stream` as server-sent events
    POST /v1/chat/completions     messages (the model's chat template) -> message choices
    GET  /health                  200 while serving, else 503
    GET  /stats                   queue and load, for the chat page's live panel
    GET  /                        the chat page (server/static)

Bodies and responses follow OpenAI's API reference; errors are OpenAI error
objects (`{"error": {"message", "type", "param", "code"}}`) with 400, 401,
404, 413 (a body over --max-body-bytes, refused before parsing:
server/http_limits.py), 429 or 503. JSON becomes `RequestFields`
(server/openai_schema.py) and goes through the one validation, queue and
workers; a client that goes away cancels its requests. Served by uvicorn in the front's event loop
(server/app.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from server.config import DEFAULT_MAX_BODY_BYTES
from server.frontend import Frontend, Unavailable
from server.http_limits import BodyLimit
from server.openai_logprobs import chat_logprobs, completion_logprobs, text_length
from server.openai_schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    body_error,
    invalid,
    to_fields,
)
from server.pending_queue import QueueFull
from server.requests import DuplicateRequestId, RequestError, RequestState
from server.token_text import TokenTexts
from server.validation import InvalidRequest, validate_off_loop
from worker.channel.types import FinishReason, TokenLogprob

STATIC = Path(__file__).parent / "static"
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}
STATUS = {"INVALID_ARGUMENT": 400, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


def served_model_id(model: str) -> str:
    """The file or directory name (a directory's single .gguf, if that is what it holds)."""
    path = Path(model)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1 and not (path / "config.json").exists():
        path = ggufs[0]
    return path.stem if path.suffix == ".gguf" else path.name


class HttpApi:
    def __init__(self, frontend: Frontend, model_id: str) -> None:
        self.frontend = frontend
        self.model_id = model_id
        self.created = int(time.time())
        self._rate = (time.monotonic(), 0)  # (when, total tokens) of the last /stats
        # Names the build and the backend: answers may differ when either changes.
        self.fingerprint = f"shoal-{version('shoal')}"
        self._texts: TokenTexts | None = None  # built at the first request for logprobs

    def token_texts(self) -> TokenTexts:
        if self._texts is None:
            assert self.frontend.prompts is not None  # a request was admitted: a Ready came
            self._texts = TokenTexts(self.frontend.prompts.tokenizer)
        return self._texts

    def logprobs(
        self, state: RequestState, logprobs: list[TokenLogprob], chat: bool, offset: int = 0
    ) -> dict[str, Any] | None:
        """A choice's `logprobs` (server/openai_logprobs.py); None when not asked for."""
        if not state.request.params.logprobs:
            return None
        if chat:
            return chat_logprobs(self.token_texts(), logprobs)
        return completion_logprobs(self.token_texts(), logprobs, offset)

    # -- requests ----------------------------------------------------------------------
    async def submit(self, body: CompletionRequest | ChatRequest) -> list[RequestState]:
        """Validate and queue every choice of every prompt, or none of them (big prompts
        are tokenized off the event loop: server/validation.py)."""
        if body.model and body.model != self.model_id:
            message = f"The model `{body.model}` does not exist (this server has {self.model_id})"
            raise ApiError(404, message, param="model", code="model_not_found")
        front = self.frontend
        if not front.serving:
            reason = "server is draining" if front.draining else "no worker is ready"
            raise ApiError(503, reason, "service_unavailable")
        states: list[RequestState] = []
        try:
            limits, prompts = front.limits(), front.prompts
            checked = [
                await validate_off_loop(fields, limits, prompts)
                for choices in to_fields(body)
                for fields in choices
            ]
            for validated in checked:
                states.append(front.submit(validated))
        except Exception as err:
            for state in states:
                front.cancel(state.request_id)
            if isinstance(err, InvalidRequest | DuplicateRequestId):
                raise invalid(str(err), body.http_names()) from None
            if isinstance(err, QueueFull):
                raise ApiError(429, str(err), "rate_limit_error") from None
            if isinstance(err, Unavailable):
                raise ApiError(503, str(err), "service_unavailable") from None
            raise
        return states

    def cancel(self, states: list[RequestState]) -> None:
        for state in states:
            if not state.finished:
                self.frontend.cancel(state.request_id)

    # -- responses ---------------------------------------------------------------------
    def envelope(self, rid: str, obj: str) -> dict[str, Any]:
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_id}
        return head | {"system_fingerprint": self.fingerprint}

    @staticmethod
    def usage(states: list[RequestState], n: int) -> dict[str, Any]:
        """Each prompt counted once (its `n` choices follow each other), as OpenAI counts;
        `prompt_tokens_details.cached_tokens`: those found in the prefix cache (OpenAI's
        name), taken from each prompt's first choice."""
        prompt = sum(len(s.request.prompt_ids) for s in states[::n])
        cached = sum(s.cached_prompt_tokens or 0 for s in states[::n])
        completion = sum(len(s.token_ids) for s in states)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def complete(self, body: CompletionRequest | ChatRequest, request: Request) -> Any:
        states = await self.submit(body)
        answers = asyncio.ensure_future(asyncio.gather(*(_collect(s) for s in states)))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait((answers, gone), return_when=asyncio.FIRST_COMPLETED)
            if not answers.done():  # nobody to answer: free the slots at once
                answers.cancel()
                return JSONResponse({}, 499)
            results = answers.result()
        finally:
            gone.cancel()
            self.cancel(states)  # only those not finished: cancelled, or the client went away
        chat = isinstance(body, ChatRequest)
        reply = self.envelope(_id(chat), "chat.completion" if chat else "text_completion")
        reply["choices"] = [
            {
                "index": i,
                "finish_reason": FINISH.get(s.finish_reason, "stop"),
                "logprobs": self.logprobs(s, logprobs, chat),
            }
            | ({"message": {"role": "assistant", "content": t}} if chat else {"text": t})
            for i, (s, (t, logprobs)) in enumerate(zip(states, results, strict=True))
        ]
        reply["usage"] = self.usage(states, body.n)
        return reply

    async def stream(self, body: CompletionRequest | ChatRequest) -> StreamingResponse:
        """Server-sent events; the requests are cancelled when the stream ends for any
        reason, also when the client leaves before the first event (the background task)."""
        states = await self.submit(body)  # errors before the first byte: a JSON error
        chat = isinstance(body, ChatRequest)
        head = self.envelope(_id(chat), "chat.completion.chunk" if chat else "text_completion")

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"

        async def generate() -> AsyncIterator[str]:
            queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
            followers = [asyncio.create_task(_follow(i, s, queue)) for i, s in enumerate(states)]
            offsets = [0] * len(states)  # legacy text_offset, per choice
            try:
                if chat:
                    role = {"role": "assistant", "content": ""}
                    yield event([_choice(i, role, None, chat) for i in range(len(states))])
                for _ in range(len(states)):
                    while True:
                        index, item = await queue.get()
                        if isinstance(item, RequestError):
                            yield f"data: {json.dumps(_request_error(item).body())}\n\n"
                            return
                        text, reason, logprobs = item
                        if text or reason or logprobs:  # tokens with no text yet: their logprobs
                            delta = {"content": text} if chat else text
                            state = states[index]
                            lp = self.logprobs(state, logprobs, chat, offsets[index])
                            if lp is not None and not chat:
                                offsets[index] += text_length(self.token_texts(), logprobs)
                            yield event([_choice(index, delta, reason, chat, lp)])
                        if reason:
                            break
                options = body.stream_options
                if options is not None and options.include_usage:
                    yield event([], usage=self.usage(states, body.n))
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or finished): free the slots at once
                for task in followers:
                    task.cancel()
                self.cancel(states)

        ended = BackgroundTask(self.cancel, states)
        return StreamingResponse(generate(), media_type="text/event-stream", background=ended)

    def stats(self) -> dict[str, Any]:
        front = self.frontend
        alive = [w for w in front.workers.values() if w.alive and w.status is not None]
        total = sum(w.status.total_tokens for w in alive if w.status)
        now = time.monotonic()
        then, before = self._rate
        rate = max(0, total - before) / (now - then) if now > then else 0.0
        self._rate = (now, total)
        return {
            "model": self.model_id,
            "pending_queue_length": len(front.queue),
            "running": sum(w.status.running for w in alive if w.status),
            "waiting": sum(w.status.waiting for w in alive if w.status),
            "tokens_per_s": round(rate, 1),
            "workers_alive": len(alive),
        }


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed the connection (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _choice(
    index: int, delta: Any, reason: str | None, chat: bool, logprobs: Any = None
) -> dict[str, Any]:
    key = "delta" if chat else "text"
    return {"index": index, key: delta, "finish_reason": reason, "logprobs": logprobs}


async def _collect(state: RequestState) -> tuple[str, list[TokenLogprob]]:
    """The whole text and every token's logprob (empty when not asked for)."""
    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        async for chunk in state.follow(0):
            text.append(chunk.text)
            logprobs += chunk.logprobs
    except RequestError as err:
        raise _request_error(err) from None
    return "".join(text), logprobs


async def _follow(index: int, state: RequestState, queue: asyncio.Queue) -> None:
    try:
        async for chunk in state.follow(0):
            reason = FINISH.get(chunk.finish_reason, "stop") if chunk.finish_reason else None
            await queue.put((index, (chunk.text, reason, chunk.logprobs)))
    except RequestError as err:
        await queue.put((index, err))


def _request_error(err: RequestError) -> ApiError:
    status = STATUS.get(err.code, 500)
    return ApiError(status, str(err), "invalid_request_error" if status == 400 else "server_error")


def _authorized(request: Request, token: str) -> bool:
    sent = request.headers.get("authorization", "").encode()
    return hmac.compare_digest(sent, f"Bearer {token}".encode())


def build_http_app(
    frontend: Frontend,
    model_id: str,
    auth_token: str = "",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app; metrics count every request by route and status. Bodies over
    `max_body_bytes` get 413 before any parsing (server/http_limits.py); the auth check
    and the metrics (the middleware below, added after, so outside it) come first."""
    api = HttpApi(frontend, model_id)
    app = FastAPI(title="shoal", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        guarded = request.url.path.startswith(("/v1/", "/stats"))
        if auth_token and guarded and not _authorized(request, auth_token):
            error = ApiError(401, "missing or wrong bearer token")
            response: Any = JSONResponse(error.body(), status_code=401)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        frontend.metrics.http_done(getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(body_error(err.errors()).body(), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            ApiError(err.status_code, str(err.detail), kind).body(), err.status_code
        )

    async def answer(body: CompletionRequest | ChatRequest, request: Request) -> Any:
        if body.stream:
            return await api.stream(body)
        return await api.complete(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await answer(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await answer(body, request)

    def model_entry() -> dict[str, Any]:
        entry = {"id": model_id, "object": "model", "created": api.created, "owned_by": "shoal"}
        if frontend.model is not None:  # shoal's additions, as vLLM adds max_model_len
            entry["max_model_len"] = frontend.limits().max_context
            entry["vocab_size"] = frontend.model.vocab_size
        return entry

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_id:
            message = f"The model `{name}` does not exist (this server has {model_id})"
            raise ApiError(404, message, param="model", code="model_not_found")
        return model_entry()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(request: Request, path: str) -> None:
        raise ApiError(404, f"Unknown route: {request.method} /v1/{path}", "not_found_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = frontend.serving
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return api.stats()

    app.mount("/", StaticFiles(directory=STATIC, html=True, check_dir=False), name="page")
    return app
