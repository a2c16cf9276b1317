"""The engine: one thread that owns the model and runs batches of requests, step by step.

Requests that arrive together and differ only in max_tokens and stop strings (greedy, the common case) run as
one batch: one decoder run per step for all of them, each request answered (or streamed) as soon as its own
rows finish. Sampling and beam-search requests run alone, so a seeded request gives what generate() gives.
A batch is formed from the queue between batches (dynamic batching): a request that arrives while a batch is
running waits for it. Every wait here is bounded; the HTTP side owns deadlines and cancels.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import XmtfError

POLL_SECONDS = 0.05  # how often an idle engine looks at its stop flag


class QueueFullError(XmtfError):
    """The server's queue is full; retry later."""


@dataclass
class Request:
    """One completion request: its prompts' token ids, generate() options, and where its events go."""

    rows: list[list[int]]  # token ids of each prompt
    options: dict[str, Any]  # generate() options, Hugging Face names; max_new_tokens is this request's max_tokens
    n: int  # sequences per prompt
    stop: tuple[str, ...]  # OpenAI stop sequences: the text ends before the first one
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    logprobs: bool = False
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the HTTP side (deadline, disconnect); the engine drops the request
    # filled by the engine, per returned sequence (prompt order, then n per prompt)
    tokens: list[list[int]] = field(default_factory=list)
    token_logprobs: list[list[float]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    first_token_at: float | None = None

    @property
    def sequences(self) -> int:
        return len(self.rows) * self.n

    @property
    def batchable(self) -> bool:
        return not self.options.get("do_sample") and self.options.get("num_beams", 1) == 1

    def key(self) -> tuple:
        """Requests with equal keys share a batch: everything but the max tokens (and stop strings, applied here)."""
        if not self.batchable:
            return ("alone", id(self))
        return tuple(sorted((k, repr(v)) for k, v in self.options.items() if k != "max_new_tokens")) + \
            (self.n, self.logprobs)

    def send(self, kind: str, payload: Any = None) -> None:
        """An event for the HTTP side, from the engine thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Engine:
    def __init__(self, model, max_batch_size: int = 16, max_queue: int = 64, metrics=None):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.eos = set(model.tokens.get("eos_token_id") or [])
        self._pending: collections.deque[Request] = collections.deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="xmtf-engine", daemon=True)
        self.running = 0  # requests in the batch being run

    # ---- the HTTP side ----

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, request: Request) -> None:
        with self._condition:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the queue holds {self.max_queue} requests")
            self._pending.append(request)
            self._observe_queue()
            self._condition.notify()

    def stop(self, drain_seconds: float) -> None:
        """Finish what is queued and running (at most drain_seconds), then stop the thread."""
        deadline = time.monotonic() + drain_seconds
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        while (self._pending or self.running) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._condition:
            for request in self._pending:
                request.send("error", (503, "the server shut down before this request ran"))
            self._pending.clear()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._stopping:
                    self._condition.wait(POLL_SECONDS)
                if not self._pending and self._stopping:
                    return
                batch = self._take()
                self.running = len(batch)
                self._observe_queue()
            try:
                self._run(batch)
            except Exception as e:  # an onnxruntime failure fails this batch; the server keeps serving
                for request in batch:
                    request.send("error", (500, f"{type(e).__name__}: {e}"))
            finally:
                self.running = 0

    def _take(self) -> list[Request]:
        """The oldest live request and every queued one that can share its batch, up to max_batch_size rows."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        batch, rows, key = [first], first.sequences, first.key()
        for request in list(self._pending):
            if request.cancelled:
                self._pending.remove(request)
            elif request.key() == key and rows + request.sequences <= self.max_batch_size:
                self._pending.remove(request)
                batch.append(request)
                rows += request.sequences
        return batch

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    def _run(self, batch: list[Request]) -> None:
        if not batch:
            return
        if self.metrics is not None:
            self.metrics.batch_size.observe(sum(r.sequences for r in batch))
        if batch[0].options.get("num_beams", 1) > 1:
            return self._run_beams(batch[0])
        options = dict(batch[0].options, max_new_tokens=max(r.options["max_new_tokens"] for r in batch),
                       num_return_sequences=batch[0].n, output_scores=batch[0].logprobs)
        rows = [row for request in batch for row in request.rows]
        owners = [(request, index) for request in batch for index in range(request.sequences)]
        for request in batch:
            request.tokens = [[] for _ in range(request.sequences)]
            request.token_logprobs = [[] for _ in range(request.sequences)]
            request.finish = [None] * request.sequences
        active = set(map(id, batch))
        steps = self.model.steps(rows, **options)
        try:
            for tokens, running, scores in steps:
                now = time.monotonic()
                for row, (request, index) in enumerate(owners):
                    if id(request) not in active or request.finish[index] is not None or not running[row]:
                        continue
                    request.tokens[index].append(tokens[row])
                    if scores is not None:
                        request.token_logprobs[index].append(scores[row])
                    request.finish[index] = self._finished(request, index)
                for request in batch:
                    if id(request) not in active:
                        continue
                    if request.cancelled:
                        active.discard(id(request))
                        if self.metrics is not None:
                            self.metrics.dropped.inc()
                        continue
                    if request.first_token_at is None:
                        request.first_token_at = now
                    done = all(f is not None for f in request.finish)
                    request.send("done" if done else "step")
                    if done:
                        active.discard(id(request))
                if not active:
                    break
        finally:
            steps.close()
        for request in batch:  # rows the model ended together (max_new_tokens of the batch)
            if id(request) in active:
                request.finish = [f or "length" for f in request.finish]
                request.send("done")

    def _finished(self, request: Request, index: int) -> str | None:
        """Why this sequence ends after its latest token, or None: eos, a stop string, or max_tokens."""
        tokens = request.tokens[index]
        if tokens[-1] in self.eos:
            return "stop"
        if request.stop and self.model.tokenizer is not None:
            text = self.model.decode(tokens)
            if any(stop in text for stop in request.stop):
                return "stop"
        if len(tokens) >= request.options["max_new_tokens"]:
            return "length"
        return None

    def _run_beams(self, request: Request) -> None:
        output = self.model.generate(input_ids=request.rows, **dict(request.options, num_return_sequences=request.n))
        request.tokens = output.sequences
        request.token_logprobs = output.token_scores or [[] for _ in output.sequences]
        request.finish = ["stop" if s and s[-1] in self.eos else "length" for s in output.sequences]
        request.first_token_at = time.monotonic()
        request.send("done")


_ids = itertools.count()


def completion_id() -> str:
    return f"cmpl-{int(time.time())}-{next(_ids)}"
