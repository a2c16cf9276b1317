"""The HTTP side: an OpenAI-compatible completions API over one loaded model (Starlette; uvicorn runs it).

POST /v1/completions   prompt (text, texts, token ids, or lists of token ids), max_tokens, temperature, top_p, n,
                       stop, seed, stream (SSE), logprobs; Hugging Face options as extra fields (num_beams,
                       length_penalty, repetition_penalty, no_repeat_ngram_size, min_tokens, top_k, early_stopping)
GET  /v1/models        the model served
GET  /health           the process is alive (no key needed)
GET  /ready            200 once the model is loaded and the engine runs, 503 before
GET  /metrics          Prometheus text

A field a request does not give takes the export's generation defaults (greedy for mT0 and BLOOMZ), not OpenAI's
sampling defaults; `temperature: 0` is greedy. Errors are the runtime's typed errors as HTTP 4xx (bad request 400,
bad key 401, body too large 413, queue full 429 with Retry-After, past its deadline 504); a failure inside
onnxruntime fails that batch with 500 and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import numbers
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import GenerationInputError, XmtfError
from ..batching import BATCHING, DEFAULT_PREFILL_TOKENS
from .engine import Engine, QueueFullError, Request, completion_id
from .metrics import Metrics

OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs",
                 "user"}
EXTRA_FIELDS = {"num_beams": "num_beams", "length_penalty": "length_penalty", "early_stopping": "early_stopping",
                "repetition_penalty": "repetition_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
                "min_tokens": "min_new_tokens", "top_k": "top_k"}
UNSUPPORTED = {"echo", "best_of", "suffix", "logit_bias", "presence_penalty", "frequency_penalty", "stream_options"}


@dataclass
class Limits:
    max_batch_size: int = 16
    max_queue: int = 64
    max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS
    batching: str = "exact"  # or "padded": one decoder run per step, tokens may differ from generate() alone
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 1024
    max_tokens: int = 512
    max_n: int = 8
    max_beams: int = 8
    request_timeout: float = 120.0
    drain_seconds: float = 30.0

    def __post_init__(self):
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, not {self.batching!r}")


class BadRequest(XmtfError, ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


class Server:
    """The app's state: the model (loaded in the background so /health answers at once), its engine, metrics."""

    def __init__(self, folder: str, variant: str | None = None, threads: int | None = None, limits: Limits | None = None,
                 api_key: str | None = None, name: str | None = None, provider: str = "cpu"):
        self.folder, self.variant, self.threads, self.provider = folder, variant, threads, provider
        self.limits = limits or Limits()
        self.api_key = api_key
        self.name = name or os.path.basename(os.path.normpath(folder))
        self.metrics = Metrics()
        self.model = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self._loader = threading.Thread(target=self._load, name="xmtf-load", daemon=True)

    def _load(self) -> None:
        from .. import load

        try:
            self.model = load(self.folder, provider=self.provider, threads=self.threads, variant=self.variant)
            _ = self.model.tokenizer  # read now, not on the first text request (and a broken one fails the load)
            self.engine = Engine(self.model, self.limits.max_batch_size, self.limits.max_queue, self.metrics,
                                 self.limits.max_prefill_tokens, padded=self.limits.batching == "padded")
            self.engine.start()
            if not self.model.batch_invariant and self.limits.batching != "padded":
                print(f"note: requests run one at a time, to keep each answer equal to generate() alone: in variant "
                      f"{self.model.variant}, {self.model.batch_variance}. fp32 and weight-only variants batch "
                      "where this machine computes one row as it does several (on the Intel Xeon guest, weight-only "
                      "blocks of 32 did where 128 did not: xmtf-onnx quantize MODEL_DIR --mode int8-weight "
                      "--block-size 32 --name int8-weight-32); --batching padded batches this one anyway, its answers "
                      "then differing from generate() alone in the last bits (and so at near-ties)", file=sys.stderr,
                      flush=True)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

    # ---- lifespan ----

    async def startup(self) -> None:
        self._loader.start()

    async def shutdown(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, self.limits.drain_seconds)

    # ---- endpoints ----

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready_endpoint(self, request: HttpRequest) -> Response:
        if self.ready:
            batching = self.limits.batching if self.model.batch_invariant or self.limits.batching == "padded" \
                else "one request at a time"
            return JSONResponse({"status": "ready", "model": self.name, "variant": self.model.variant,
                                 "batching": batching})
        reason = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "xmtf-onnx"}]})

    async def metrics_endpoint(self, request: HttpRequest) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type=self.metrics.content_type)

    async def completions(self, request: HttpRequest) -> Response:
        began = time.monotonic()
        if not self.ready:
            self.metrics.requests.labels("unavailable").inc()
            return _error(503, "the model is not loaded yet; retry when GET /ready answers 200", {"Retry-After": "1"})
        try:
            body = await self._body(request)
            job = self._job(body)
        except BadRequest as e:
            self.metrics.requests.labels("bad_request" if e.status == 400 else "too_large").inc()
            return _error(e.status, str(e))
        except GenerationInputError as e:
            self.metrics.requests.labels("bad_request").inc()
            return _error(400, str(e))
        try:
            self.engine.submit(job)
        except QueueFullError as e:
            self.metrics.requests.labels("queue_full").inc()
            return _error(429, f"{e}; retry shortly", {"Retry-After": "1"})
        deadline = began + self.limits.request_timeout
        if body.get("stream"):
            return StreamingResponse(self._stream(job, deadline, began), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(job, deadline, began)

    async def _body(self, request: HttpRequest) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise BadRequest(f"the body has {declared} bytes; the limit is {self.limits.max_body_bytes}", 413)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.limits.max_body_bytes:
                raise BadRequest(f"the body exceeds the limit of {self.limits.max_body_bytes} bytes", 413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not JSON ({e})") from e
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _job(self, body: dict[str, Any]) -> Request:
        """An OpenAI completion request -> the engine's Request (every check before anything is queued)."""
        unsupported = sorted(set(body) & UNSUPPORTED)
        if unsupported:
            raise BadRequest(f"unsupported field(s): {', '.join(unsupported)}")
        unknown = sorted(set(body) - OPENAI_FIELDS - set(EXTRA_FIELDS) - UNSUPPORTED)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(OPENAI_FIELDS | set(EXTRA_FIELDS)))}")
        if body.get("model") not in (None, self.name):
            raise BadRequest(f"this server serves model {self.name!r}, not {body['model']!r}")
        rows = self._prompts(body.get("prompt"))
        options: dict[str, Any] = {EXTRA_FIELDS[k]: v for k, v in body.items() if k in EXTRA_FIELDS}
        limits = self.limits
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.model.defaults["max_new_tokens"]
        if not _integer(max_tokens) or not 1 <= max_tokens <= limits.max_tokens:
            raise BadRequest(f"max_tokens must be an integer in [1, {limits.max_tokens}], not {max_tokens!r}")
        options["max_new_tokens"] = max_tokens
        n = body.get("n", 1)
        if not _integer(n) or not 1 <= n <= limits.max_n:
            raise BadRequest(f"n must be an integer in [1, {limits.max_n}], not {n!r}")
        beams = options.get("num_beams", 1)
        if _integer(beams) and beams > limits.max_beams:
            raise BadRequest(f"num_beams must be at most {limits.max_beams}, not {beams}")
        temperature = body.get("temperature")
        if temperature is not None:
            if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or temperature < 0:
                raise BadRequest(f"temperature must be a number >= 0, not {temperature!r}")
            options["do_sample"] = temperature > 0
            if temperature > 0:
                options["temperature"] = float(temperature)
        for name in ("top_p", "seed"):
            if body.get(name) is not None:
                options[name] = body[name]
        if options.get("top_p") is not None and "do_sample" not in options:
            options["do_sample"] = True
        if n > 1 and options.get("num_beams", 1) == 1 and not options.get("do_sample"):
            raise BadRequest("n > 1 needs sampling (temperature > 0) or num_beams >= n: greedy gives one answer")
        options["num_return_sequences"] = n
        stop = body.get("stop")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
            raise BadRequest("stop must be a non-empty string or a list of at most 4 of them")
        if stop and not self.model.has_tokenizer:
            raise BadRequest("stop needs a tokenizer and this export has none")
        logprobs = body.get("logprobs")
        if logprobs is not None and (not _integer(logprobs) or not 0 <= logprobs <= 1):
            raise BadRequest("logprobs must be 0 or 1 (the chosen token's log-probability) or null")
        options["output_scores"] = logprobs is not None
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("stream must be true or false")
        self.model.check_options(**options)  # the runtime's own checks and messages
        loop = asyncio.get_running_loop()
        return Request(rows, {k: v for k, v in options.items() if k != "num_return_sequences"}, n, stop, loop,
                       asyncio.Queue(), logprobs is not None)

    def _prompts(self, prompt) -> list[list[int]]:
        """Text, a list of texts, token ids, or a list of token id lists -> token ids per prompt."""
        if prompt is None or prompt == "" or prompt == []:
            raise BadRequest("prompt is empty; give a text, a list of texts or token ids")
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            texts = prompt
        else:
            texts = None
        if texts is not None:
            if not self.model.has_tokenizer:
                raise BadRequest("this export has no tokenizer: give the prompt as token ids")
            if any(not t for t in texts):
                raise BadRequest("a prompt is empty; give it some text")
            rows = [e.ids for e in self.model.tokenizer.encode_batch(texts)]
        elif isinstance(prompt, list) and all(_integer(t) for t in prompt):
            rows = [prompt]
        elif isinstance(prompt, list) and all(isinstance(r, list) and r and all(_integer(t) for t in r) for r in prompt):
            rows = prompt
        else:
            raise BadRequest("prompt must be a text, a list of texts, a list of token ids or a list of such lists")
        vocab = self.model.vocab_size
        for row in rows:
            if len(row) > self.limits.max_prompt_tokens:
                raise BadRequest(f"a prompt has {len(row)} tokens; this server allows {self.limits.max_prompt_tokens}")
            if any(not 0 <= t < vocab for t in row):
                raise BadRequest(f"a prompt holds token ids outside [0, {vocab})")
        if len(rows) > self.limits.max_batch_size:
            raise BadRequest(f"{len(rows)} prompts in one request; this server allows {self.limits.max_batch_size}")
        return [list(map(int, row)) for row in rows]

    async def _next_event(self, job: Request, deadline: float):
        try:
            return await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            job.cancelled = True
            raise

    async def _complete(self, job: Request, deadline: float, began: float) -> Response:
        try:
            while True:
                kind, payload = await self._next_event(job, deadline)
                if kind == "error":
                    self.metrics.requests.labels("error").inc()
                    return _error(*payload)
                if kind == "done":
                    break
        except asyncio.TimeoutError:
            self.metrics.requests.labels("timeout").inc()
            return _error(504, f"the request did not finish within {self.limits.request_timeout} s; it was dropped")
        self._observe(job, began)
        return JSONResponse(self._response(job))

    async def _stream(self, job: Request, deadline: float, began: float):
        sent, closed, ids_sent = [""] * job.sequences, [False] * job.sequences, [0] * job.sequences
        identifier, created = completion_id(), int(time.time())
        try:
            while True:
                try:
                    kind, payload = await self._next_event(job, deadline)
                except asyncio.TimeoutError:
                    self.metrics.requests.labels("timeout").inc()
                    yield _sse({"error": {"message": "the request did not finish in time; it was dropped",
                                          "code": 504}})
                    return
                if kind == "error":
                    self.metrics.requests.labels("error").inc()
                    yield _sse({"error": {"message": payload[1], "code": payload[0]}})
                    return
                choices = []
                for index in range(job.sequences):
                    if closed[index]:
                        continue
                    final = kind == "done" or job.finish[index] is not None
                    text = self._text(job, index)
                    if not final:  # hold back a partial character and what may start a stop string
                        text = text[:len(text) - _held_back(text, job.stop)]
                    piece = text[len(sent[index]):] if text.startswith(sent[index]) else ""
                    tokens = list(job.tokens[index])
                    if piece or final or len(tokens) > ids_sent[index]:  # a chunk per token, its text may lag
                        choices.append({"index": index, "text": piece, "token_ids": tokens[ids_sent[index]:],
                                        "finish_reason": job.finish[index] if final else None})
                        sent[index], closed[index], ids_sent[index] = text, final, len(tokens)
                if choices:
                    yield _sse({"id": identifier, "object": "text_completion", "created": created, "model": self.name,
                                "choices": choices})
                if kind == "done":
                    self._observe(job, began)
                    yield _sse({"id": identifier, "object": "text_completion", "created": created,
                                "model": self.name, "choices": [], "usage": self._usage(job)})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not job.finish or any(f is None for f in job.finish):
                job.cancelled = True  # a client that went away: its rows leave the batch at the next step
                self.metrics.requests.labels("cancelled").inc()

    def _text(self, job: Request, index: int) -> str:
        if not self.model.has_tokenizer:
            return ""
        text = self.model.decode(job.tokens[index])
        cut = min((text.find(s) for s in job.stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def _usage(self, job: Request) -> dict[str, int]:
        prompt = sum(len(r) for r in job.rows) * job.n
        completion = sum(len(t) for t in job.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _response(self, job: Request) -> dict[str, Any]:
        choices = []
        for index in range(job.sequences):
            choice = {"index": index, "text": self._text(job, index), "token_ids": job.tokens[index],
                      "finish_reason": job.finish[index], "logprobs": None}
            if job.logprobs:
                choice["logprobs"] = {"token_logprobs": job.token_logprobs[index],
                                      "tokens": [str(t) for t in job.tokens[index]]}
            choices.append(choice)
        return {"id": completion_id(), "object": "text_completion", "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": self._usage(job)}

    def _observe(self, job: Request, began: float) -> None:
        now = time.monotonic()
        metrics = self.metrics
        metrics.requests.labels("ok").inc()
        tokens = sum(len(t) for t in job.tokens)
        metrics.generated_tokens.inc(tokens)
        metrics.end_to_end.observe(now - began)
        if job.first_token_at is not None:
            metrics.first_token.observe(job.first_token_at - began)
            steps = max(1, max((len(t) for t in job.tokens), default=1) - 1)
            metrics.inter_token.observe((now - job.first_token_at) / steps)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of a streamed text to hold back: a partial UTF-8 character (decoded as U+FFFD)
    and the longest end of the text that a stop string begins with (it may become that stop string)."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(server: Server) -> Starlette:
    """The ASGI app (uvicorn serves it; Ray Serve can mount it)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await server.startup()
        yield
        await server.shutdown()

    app = Starlette(routes=[
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/ready", server.ready_endpoint, methods=["GET"]),
        Route("/metrics", server.metrics_endpoint, methods=["GET"]),
    ], lifespan=lifespan)
    if server.api_key:
        app.add_middleware(_key_middleware(server.api_key))
    app.state.server = server
    return app


def _key_middleware(key: str):
    from starlette.middleware.base import BaseHTTPMiddleware

    class RequireKey(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            if request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {key}":
                return _error(401, "a valid API key is required: Authorization: Bearer KEY")
            return await call_next(request)

    return RequireKey
