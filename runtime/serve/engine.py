"""The engine: one thread that owns the model and runs the requests, step by step.

Greedy requests (the common case) are batched continuously: between two decode steps new requests join the
running batch (each prompt prefilled alone, as generate() would; at most max_prefill_tokens prompt tokens
between two steps, so a burst joins over a few steps) and finished or cancelled rows leave it, so a short
request never waits for a long one. By default rows are never padded (runtime/batching.py: cohorts of one
cache length), so a request's answer is what generate() gives it alone; `padded` puts every row in one padded
decoder run, faster but not bit-exact. A sampled request of one prompt (n sequences) joins the batch too, with
its own warpers and seeded generator (a seeded request is reproducible, and equals generate() alone); beam search
and sampling from several prompts run alone between batches. Variants whose rows depend on their
batch-mates (int8-dynamic: one activation scale per batch; weight-only variants where this machine's kernels compute
one row by another path than several: Model.batch_variance) run every request alone, unless `padded` was asked
for. Every wait here is bounded; the HTTP side owns deadlines and cancels.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..batching import DEFAULT_PREFILL_TOKENS, SAMPLING_OPTIONS
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
    def continuous(self) -> bool:
        """Can it join a running batch? No beams, no history-dependent processor, no scores, and greedy with one
        sequence per prompt, or sampled from one prompt (n sequences: generate() alone does not pad one prompt's
        copies, as it pads several prompts to one length). do_sample is explicit here (Engine.submit fills in the
        model's default)."""
        options = self.options
        sampled = bool(options.get("do_sample"))
        return (options.get("num_beams", 1) == 1 and not self.logprobs
                and options.get("repetition_penalty", 1.0) == 1.0 and not options.get("no_repeat_ngram_size")
                and (len(self.rows) == 1 if sampled else self.n == 1))

    def key(self) -> tuple:
        """Requests with equal keys share a batch: everything but the max and min tokens and the sampling options
        (per row) and stop strings (applied here)."""
        if not self.continuous:
            return ("alone", id(self))
        return tuple(sorted((k, repr(v)) for k, v in self.options.items()
                            if k not in ("max_new_tokens", "min_new_tokens", *SAMPLING_OPTIONS)))

    def begin(self) -> None:
        """No tokens yet: the engine starts this request's sequences."""
        self.tokens = [[] for _ in range(self.sequences)]
        self.token_logprobs = [[] for _ in range(self.sequences)]
        self.finish = [None] * self.sequences

    def send(self, kind: str, payload: Any = None) -> None:
        """An event for the HTTP side, from the engine thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Engine:
    def __init__(self, model, max_batch_size: int = 16, max_queue: int = 64, metrics=None,
                 max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS, padded: bool = False):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.padded = padded  # one padded decoder run per step (faster; not bit-exact against generate() alone)
        self.max_queue = max_queue
        self.metrics = metrics
        self.eos = set(model.tokens.get("eos_token_id") or [])
        self.invariant = padded or model.batch_invariant  # padded batches are not exact anyway: the user chose
        self._pending: collections.deque[Request] = collections.deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="xmtf-engine", daemon=True)
        self.batch = None  # the running ContinuousBatch; rows are (request, sequence index)
        self.batch_key: tuple | None = None
        self.running = 0  # requests being worked on

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
            if request.options.get("do_sample") is None:  # the model's default, explicit: it decides how it batches
                request.options["do_sample"] = bool(self.model.defaults.get("do_sample"))
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

    def _rows(self) -> int:
        return self.batch.rows if self.batch is not None else 0

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._rows() and not self._stopping:
                    self._condition.wait(POLL_SECONDS)
                if not self._pending and not self._rows() and self._stopping:
                    return
                admit, alone = self._schedule()
                self.running = len(admit) + len(alone) + len({id(r) for r, _ in self.batch.owners} if self.batch else ())
                self._observe_queue()
            involved = admit + alone + [r for r, _ in (self.batch.owners if self.batch else [])]
            try:
                for request in alone:
                    self._run(request)
                if admit:
                    self._admit(admit)
                if self._rows():
                    self._step()
            except Exception as e:  # an onnxruntime failure fails these requests; the server keeps serving
                for request in {id(r): r for r in involved}.values():
                    request.send("error", (500, f"{type(e).__name__}: {e}"))
                self.batch, self.batch_key = None, None
            finally:
                self.running = self._rows()

    def _schedule(self) -> tuple[list[Request], list[Request]]:
        """(requests joining the running batch now, requests to run alone or as a group between batches)."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return [], []
        first = self._pending[0]
        joinable = self.invariant and first.continuous
        if not self._rows():
            if not joinable:
                return [], self._take()
            self.batch_key = first.key()
        elif not joinable or first.key() != self.batch_key:
            return [], []  # the oldest request waits for the batch to drain: no new joins, no starvation
        admit, rows, prefill = [], self._rows(), 0
        for request in list(self._pending):
            if request.cancelled:
                self._pending.remove(request)
            elif request.continuous and request.key() == self.batch_key:
                tokens = sum(map(len, request.rows)) * request.n  # each sequence prefilled alone
                if (rows + request.sequences > self.max_batch_size and (rows or admit)) or \
                        (prefill + tokens > self.max_prefill_tokens and admit):
                    break
                self._pending.remove(request)
                admit.append(request)
                rows += request.sequences
                prefill += tokens
            else:
                break  # keep arrival order: later requests do not overtake an incompatible one
        return admit, []

    def _take(self) -> list[Request]:
        """The oldest request, to run alone: one that cannot join a batch (beams, sampling of several sequences)
        has no equal, and a batch-variant model's rows must not share a generate() call (a request's answer would
        depend on what shared it)."""
        return [self._pending.popleft()]

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    # ---- continuous batching ----

    def _admit(self, requests: list[Request]) -> None:
        if self.batch is None:
            options = {k: v for k, v in requests[0].options.items()
                       if k not in ("max_new_tokens", "min_new_tokens", *SAMPLING_OPTIONS)}
            self.batch = self.model.continuous_batch(padded=self.padded, do_sample=False, **options)
        owners, prompts, minimum, samplers = [], [], [], []
        for request in requests:
            request.begin()
            sampler = self.batch.sampler(**{k: v for k, v in request.options.items() if k in SAMPLING_OPTIONS})
            for index in range(request.sequences):  # generate()'s row order: each prompt n times
                owners.append((request, index))
                prompts.append(request.rows[index // request.n])
                minimum.append(request.options.get("min_new_tokens", 0))
                samplers.append(sampler)
        tokens = self.batch.admit(prompts, owners, minimum, samplers)
        self._deliver(owners, tokens)

    def _step(self) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(self._rows())
        self._deliver(list(self.batch.owners), self.batch.step())

    def _deliver(self, owners: list, tokens) -> None:
        """Each row's new token to its request; requests told (step / done); finished and cancelled rows leave, and
        so do the rows of a request whose draw failed (its error is its answer; its batch-mates go on)."""
        now = time.monotonic()
        failed = {id(request): (request, why) for (request, _), why in self.batch.failures}
        for request, why in failed.values():
            if not request.cancelled:
                request.send("error", (500, why))
                request.cancelled = True  # its rows leave below; it is answered
        requests = {}
        for (request, index), token in zip(owners, tokens):
            requests[id(request)] = request
            self._append(request, index, token)
        for request in requests.values():
            self._tell(request, now)
        self.batch.keep(np.array([r.finish[i] is None and not r.cancelled for r, i in self.batch.owners], bool))
        if not self.batch.rows:
            self.batch, self.batch_key = None, None

    # ---- requests that do not join a running batch: sampling, beams, batch-dependent variants ----

    def _run(self, request: Request) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(request.sequences)
        if request.options.get("num_beams", 1) > 1:
            return self._run_beams(request)
        options = dict(request.options, num_return_sequences=request.n, output_scores=request.logprobs)
        request.begin()
        steps = self.model.steps(request.rows, **options)
        try:
            for tokens, running, scores in steps:
                for index in np.flatnonzero(running):
                    self._append(request, index, tokens[index], None if scores is None else scores[index])
                if self._tell(request, time.monotonic()):
                    return
        finally:
            steps.close()
        request.finish = [f or "length" for f in request.finish]  # rows the model ended together (max_new_tokens)
        request.send("done")

    def _append(self, request: Request, index: int, token: int, score: float | None = None) -> None:
        """A sequence's new token (and log-probability), unless it has finished or its request was cancelled."""
        if request.finish[index] is None and not request.cancelled:
            request.tokens[index].append(int(token))
            if score is not None:
                request.token_logprobs[index].append(score)
            request.finish[index] = self._finished(request, index)

    def _tell(self, request: Request, now: float) -> bool:
        """Send the request its step (or done); True once it needs no more work (done, or cancelled and dropped)."""
        if request.cancelled:
            if self.metrics is not None:
                self.metrics.dropped.inc()
            return True
        if request.first_token_at is None:
            request.first_token_at = now
        done = all(f is not None for f in request.finish)
        request.send("done" if done else "step")
        return done

    def _finished(self, request: Request, index: int) -> str | None:
        """Why this sequence ends after its latest token, or None: eos, a stop string, or max_tokens."""
        tokens = request.tokens[index]
        if tokens[-1] in self.eos:
            return "stop"
        if request.stop and self.model.has_tokenizer:
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
