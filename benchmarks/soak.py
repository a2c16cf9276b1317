"""xmtf-onnx loadtest --soak N: many mixed requests against a running server, each answer checked.

Requests mix lengths, greedy and seeded sampling (n 1 or 2), beams, stop strings, min_tokens, a repetition
penalty, log-probabilities, streamed and not, and clients that hang up mid-stream. Every answer that ran to the
end must equal what generate() gives that request alone, computed in this process from the same folder: none
lost (each request got its answer or a typed error), none duplicated (completion ids unique), none mixed up
(each answer is its own request's). The server's resident memory is read from its /metrics over the run.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np

from .loadtest import stream_completion

KINDS = ("greedy", "greedy", "greedy", "stop", "min_tokens", "sample", "sample_n2", "beams", "penalty", "logprobs")
LENGTHS = (1, 2, 4, 8, 16, 24, 32)
POOL = 60  # request kinds, each with its expected answer
RSS_EVERY = 2.0  # seconds between two reads of the server's resident memory


def specs(model, texts: list[str], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` request kinds, each with its OpenAI body and its expected choices (generate() alone)."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        kind, text, length = KINDS[index % len(KINDS)], rng.choice(texts), rng.choice(LENGTHS)
        body: dict[str, Any] = {"prompt": text, "max_tokens": length}
        options: dict[str, Any] = {"max_new_tokens": length}
        if kind in ("sample", "sample_n2"):
            n = 2 if kind == "sample_n2" else 1
            body.update(temperature=0.8, top_p=0.9, seed=1000 + index, n=n)
            options.update(do_sample=True, temperature=0.8, top_p=0.9, seed=1000 + index, num_return_sequences=n)
        elif kind == "beams":
            body.update(num_beams=2)
            options.update(num_beams=2)
        elif kind == "min_tokens":
            body["min_tokens"] = options["min_new_tokens"] = length
        elif kind == "penalty":
            body["repetition_penalty"] = options["repetition_penalty"] = 1.3
        elif kind == "logprobs":
            body["logprobs"] = 1
        ids = [e.ids for e in model.tokenizer.encode_batch([text])]
        output = model.generate(input_ids=ids, **options)
        eos = set(model.tokens.get("eos_token_id") or [])
        choices = [{"token_ids": tokens, "text": model.decode(tokens),
                    "finish_reason": "stop" if tokens and tokens[-1] in eos else "length"} for tokens in output.sequences]
        if kind == "stop":
            choices = [_stopped(model, choices[0], body, rng)]
        out.append({"kind": kind, "body": body, "choices": choices})
    return out


def _stopped(model, choice: dict, body: dict, rng: random.Random) -> dict:
    """A stop string taken from the middle of the expected text; the expected answer ends before it, its tokens
    at the token that completed it."""
    text = choice["text"]
    if len(text) < 4:
        return choice
    start = rng.randrange(1, len(text) - 2)
    stop = text[start:start + 2]
    body["stop"] = [stop]
    tokens = choice["token_ids"]
    for end in range(1, len(tokens) + 1):
        decoded = model.decode(tokens[:end])
        if stop in decoded:
            return {"token_ids": tokens[:end], "text": decoded[:decoded.find(stop)], "finish_reason": "stop"}
    return choice


async def _one(client, url: str, body: dict, hang_up_after: int | None, timeout: float) -> dict:
    """Send one request; its choices (text, token_ids, finish_reason) and id, or its status / error."""
    if body.get("stream"):
        return await stream_completion(client, url, body, timeout, hang_up_after)
    try:
        response = await client.post(f"{url}/v1/completions", json=body, timeout=timeout)
        payload = response.json()
    except Exception as e:  # a transport error is a lost request, counted, not a crash of the soak
        return {"status": -1, "error": f"{type(e).__name__}: {e}"}
    if response.status_code != 200:
        return {"status": response.status_code, "error": payload.get("error", {}).get("message")}
    return {"status": 200, "id": payload["id"], "choices": [
        {"text": c["text"], "token_ids": c["token_ids"], "finish_reason": c["finish_reason"]} for c in payload["choices"]]}


async def _metric(client, url: str, name: str) -> dict[str, float]:
    """The server's samples whose name starts with `name` ({} when /metrics does not answer)."""
    try:
        text = (await client.get(f"{url}/metrics", timeout=5)).text
    except Exception:
        return {}
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


async def _rss(client, url: str) -> float | None:
    return (await _metric(client, url, "process_resident_memory_bytes")).get("process_resident_memory_bytes")


async def run(url: str, pool: list[dict], requests: int, concurrency: int, timeout: float, seed: int,
              hang_up_share: float = 0.1, progress=None) -> dict:
    """Send `requests` requests drawn from the pool from `concurrency` clients; check every answer."""
    import httpx

    rng = random.Random(seed)
    plan = []
    for _ in range(requests):
        spec = rng.choice(pool)
        stream = rng.random() < 0.5
        hang_up = rng.randint(1, 3) if stream and rng.random() < hang_up_share / 0.5 else None
        plan.append((spec, stream, hang_up))
    results: list[tuple[dict, dict]] = []
    rss: list[tuple[float, float]] = []
    began = time.perf_counter()
    queue = iter(plan)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(limits=limits) as client:
        before = await _metric(client, url, "xmtf_requests_total")

        async def client_loop():
            for spec, stream, hang_up in queue:
                body = dict(spec["body"], stream=stream)
                results.append((spec, await _one(client, url, body, hang_up, timeout)))
                if progress is not None and len(results) % 100 == 0:
                    progress(f"   {len(results)}/{requests} requests, {time.perf_counter() - began:.0f} s")

        async def watch():
            while len(results) < requests:
                value = await _rss(client, url)
                if value is not None:
                    rss.append((time.perf_counter() - began, value))
                await asyncio.sleep(RSS_EVERY)

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(asyncio.gather(*[client_loop() for _ in range(concurrency)]), timeout=timeout * requests)
        watcher.cancel()
        value = await _rss(client, url)
        if value is not None:
            rss.append((time.perf_counter() - began, value))
        after = await _metric(client, url, "xmtf_requests_total")
    return report(results, rss, time.perf_counter() - began, concurrency,
                  {k.split('"')[1]: after[k] - before.get(k, 0) for k in after})  # outcome label -> requests


def _matches(expected: dict, got: dict) -> bool:
    return all(expected[k] == got[k] for k in ("token_ids", "text", "finish_reason"))


def report(results: list[tuple[dict, dict]], rss: list[tuple[float, float]], seconds: float, concurrency: int,
           server_outcomes: dict[str, float]) -> dict:
    finished = [(spec, got) for spec, got in results if got["status"] == 200]
    wrong = [{"kind": spec["kind"], "body": spec["body"], "expected": spec["choices"], "got": got["choices"]}
             for spec, got in finished
             if len(spec["choices"]) != len(got["choices"]) or
             not all(_matches(e, g) for e, g in zip(spec["choices"], got["choices"]))]
    ids = [got["id"] for _, got in finished]
    errors = [got for _, got in results if got["status"] not in (200, "hung_up")]
    hung_up = sum(got["status"] == "hung_up" for _, got in results)
    values = np.array([v for _, v in rss]) if rss else np.zeros(0)
    settled = values[len(values) // 5:] if values.size >= 5 else values  # after the first fifth (warm-up)
    by_kind: dict[str, int] = {}
    for spec, _ in finished:
        by_kind[spec["kind"]] = by_kind.get(spec["kind"], 0) + 1
    wrong_by_kind: dict[str, int] = {}
    for item in wrong:
        wrong_by_kind[item["kind"]] = wrong_by_kind.get(item["kind"], 0) + 1
    return {
        "requests": len(results), "concurrency": concurrency, "seconds": seconds,
        "answered": len(finished), "hung_up": hung_up, "errors": len(errors), "error_examples": errors[:5],
        "mismatched": len(wrong), "mismatched_by_kind": wrong_by_kind, "mismatch_examples": wrong[:3],
        "duplicate_ids": len(ids) - len(set(ids)),
        "answered_by_kind": by_kind, "server_outcomes": server_outcomes,
        "rss_mb": [[round(t, 1), round(v / 2**20, 1)] for t, v in rss],
        "rss_start_mb": float(values[0] / 2**20) if values.size else None,
        "rss_settled_min_mb": float(settled.min() / 2**20) if settled.size else None,
        "rss_settled_max_mb": float(settled.max() / 2**20) if settled.size else None,
        "rss_settled_spread": float((settled.max() - settled.min()) / settled.min()) if settled.size else None,
        "rss_end_mb": float(values[-1] / 2**20) if values.size else None,
    }


def markdown(soak: dict) -> list[str]:
    mb = lambda v: "–" if v is None else f"{v:.0f} MB"  # noqa: E731
    return ["", f"## Soak: {soak['requests']} mixed requests, {soak['concurrency']} clients, {soak['seconds']:.0f} s", "",
            f"- answered {soak['answered']} (by kind: "
            + ", ".join(f"{k} {v}" for k, v in sorted(soak['answered_by_kind'].items())) + f"); hung up mid-stream "
            f"{soak['hung_up']}; errors {soak['errors']}; answers unequal to generate() alone {soak['mismatched']} "
            f"{soak['mismatched_by_kind'] or ''}; "
            f"duplicate ids {soak['duplicate_ids']}",
            "- server outcomes in the run: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(soak['server_outcomes'].items())),
            f"- server RSS: start {mb(soak['rss_start_mb'])}, after the first fifth {mb(soak['rss_settled_min_mb'])}"
            f"–{mb(soak['rss_settled_max_mb'])} (spread {100 * (soak['rss_settled_spread'] or 0):.1f}%), "
            f"end {mb(soak['rss_end_mb'])}"]
