"""xmtf-onnx loadtest: concurrent clients against a running `xmtf-onnx serve`, bounded in count and time.

For each concurrency level, CONCURRENCY clients send REQUESTS streamed completions in all (greedy, or sampled with
--temperature, each request with its own seed; forced length: min = max tokens, so every request does the same
work) and the report gives requests/s, generated tokens/s, time to first token and end-to-end p50/p99, and the
error and 429 rates, as JSON, a markdown table and a plot.
With --offline MODEL_DIR it first measures generate() in this process on the same prompts at batch 1 and at
batch 16 (the server idle), the figures the served throughput is compared with. With --soak N (and --offline)
it sends N mixed requests instead (lengths, sampling, beams, stop strings, streaming, clients hanging up) and
checks every answer against generate() alone, with the server's memory over the run. Localhost only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from urllib.parse import urlparse

import numpy as np

LOCAL = {"127.0.0.1", "localhost", "::1"}


def prompts(count: int) -> list[str]:
    """Real multilingual prompts from ../shared/data when present, else a short built-in list (cut to 200 chars)."""
    from .suite import SHARED_PROMPTS

    texts = []
    if os.path.isfile(SHARED_PROMPTS):
        with open(SHARED_PROMPTS, encoding="utf-8") as handle:
            texts = [json.loads(line)["prompt"][:200] for line in handle]
    texts = texts or ["Translate to English: Je t'aime.", "Question: 2+2? Answer:", "Кошка спит на диване.",
                      "Der Hund schläft.", "猫はソファで寝ています。"]
    return [texts[i % len(texts)] for i in range(count)]


async def stream_completion(client, url: str, body: dict, timeout: float, hang_up_after: int | None = None) -> dict:
    """One streamed completion: its status, id, choices (text, token_ids and finish_reason joined over the chunks),
    usage, seconds and first_token_seconds; status "hung_up" when the client left after `hang_up_after` chunks, -1
    for a transport error or a stream that ended without [DONE]."""
    began = time.perf_counter()
    choices: dict[int, dict] = {}
    identifier, usage, first, chunks = None, None, None, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True),
                                 timeout=timeout) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code, "error": response.text[:200],
                        "seconds": time.perf_counter() - began}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return {"status": 200, "id": identifier, "choices": [choices[i] for i in sorted(choices)],
                            "usage": usage, "seconds": time.perf_counter() - began, "first_token_seconds": first}
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": chunk["error"].get("code", 500), "error": chunk["error"].get("message"),
                            "seconds": time.perf_counter() - began}
                identifier, usage = chunk.get("id", identifier), chunk.get("usage") or usage
                if first is None and chunk.get("choices"):
                    first = time.perf_counter() - began
                for c in chunk.get("choices", []):
                    mine = choices.setdefault(c["index"], {"text": "", "token_ids": [], "finish_reason": None})
                    mine["text"] += c["text"]
                    mine["token_ids"] += c.get("token_ids", [])
                    mine["finish_reason"] = c["finish_reason"] or mine["finish_reason"]
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return {"status": "hung_up", "seconds": time.perf_counter() - began}
    except Exception as e:  # a transport error counts as an error, not a crash of the load test
        return {"status": -1, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - began}
    return {"status": -1, "error": "the stream ended without [DONE]", "seconds": time.perf_counter() - began}


async def one_request(client, url: str, prompt: str, max_tokens: int, timeout: float,
                      sampling: dict | None = None) -> dict:
    """A load-test request: streamed, of a forced length; greedy, or sampled with `sampling` (temperature, top_p,
    seed)."""
    result = await stream_completion(client, url, {"prompt": prompt, "max_tokens": max_tokens,
                                                   "min_tokens": max_tokens, **(sampling or {})}, timeout)
    return dict(result, tokens=(result.get("usage") or {}).get("completion_tokens", 0))


def sampling_fields(temperature: float, top_p: float | None, index: int) -> dict | None:
    """The sampling fields of request `index` (its own seed), or None for greedy (temperature 0)."""
    if temperature <= 0:
        return None
    return {"temperature": temperature, "seed": index, **({"top_p": top_p} if top_p is not None else {})}


async def level(url: str, concurrency: int, requests: int, max_tokens: int, timeout: float,
                temperature: float = 0.0, top_p: float | None = None) -> dict:
    import httpx

    texts = prompts(requests)
    results: list[dict] = []
    queue = iter(range(requests))

    async def client_loop(client):
        first = True
        for index in queue:
            result = await one_request(client, url, texts[index], max_tokens, timeout,
                                       sampling_fields(temperature, top_p, index))
            results.append(dict(result, first_of_client=first))
            first = False

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    began = time.perf_counter()
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*[client_loop(client) for _ in range(concurrency)]),
                               timeout=timeout * requests)
    wall = time.perf_counter() - began
    ok = [r for r in results if r["status"] == 200]
    pct = lambda values, q: float(np.percentile(values, q)) if values else None  # noqa: E731
    firsts = [r["first_token_seconds"] for r in ok if r.get("first_token_seconds") is not None]
    # after the opening burst (every client's first request arrives at once): the service's steady state
    steady = [r["first_token_seconds"] for r in ok if r.get("first_token_seconds") is not None
              and not r["first_of_client"]]
    ends = [r["seconds"] for r in ok]
    return {"concurrency": concurrency, "requests": requests, "seconds": wall,
            "requests_per_second": len(ok) / wall, "tokens_per_second": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct(firsts, 50), "ttft_p99": pct(firsts, 99),
            "steady_ttft_p50": pct(steady, 50), "steady_ttft_p99": pct(steady, 99),
            "e2e_p50": pct(ends, 50), "e2e_p99": pct(ends, 99),
            "error_rate": sum(r["status"] not in (200, 429) for r in results) / requests,
            "rate_429": sum(r["status"] == 429 for r in results) / requests,
            "wrong_length": sum(r["tokens"] != max_tokens for r in ok)}


def offline(folder: str, max_tokens: int, threads: int | None, variant: str | None = None) -> dict:
    """generate() on the same prompts, the server idle: tokens/s at batch 1 and 16, and the time to first token."""
    from xmtf_onnx.runtime import load

    model = load(folder, threads=threads, variant=variant, verify=False)
    texts = prompts(16)
    found = {}
    for batch in (1, 16):
        model.generate(texts[:batch], max_new_tokens=2)
        began = time.perf_counter()
        out = model.generate(texts[:batch], max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        found[f"batch{batch}_tokens_per_second"] = batch * max_tokens / (time.perf_counter() - began)
        if batch == 1:
            found["batch1_first_token_seconds"] = out.metrics["prefill_seconds"]
            found["batch1_step_seconds"] = float(np.median(out.metrics["step_seconds"]))
    return found


def markdown(report: dict) -> str:
    lines = [f"# xmtf-onnx load test ({report['created']})", "",
             f"Server {report['url']} ({report.get('model', '?')}); {report['machine'].get('cpu', '?')}, "
             f"{report['machine'].get('cores')} cores; {report['max_tokens']} tokens per request (min = max), "
             "streamed; " + _how(report.get("sampling")) + ".", ""]
    if report.get("offline"):
        o = report["offline"]
        lines += [f"generate() in one process, server idle: batch 1 {o['batch1_tokens_per_second']:.1f} tok/s "
                  f"(TTFT {o['batch1_first_token_seconds'] * 1e3:.0f} ms, step {o['batch1_step_seconds'] * 1e3:.1f} ms), "
                  f"batch 16 {o['batch16_tokens_per_second']:.1f} tok/s.", ""]
    lines += ["| clients | requests | req/s | tok/s | TTFT p50 / p99 ms | after the opening burst: TTFT p50 / p99 ms | "
              "end-to-end p50 / p99 s | errors | 429 |",
              "|---|---|---|---|---|---|---|---|---|"]
    ms = lambda v: "–" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
    s = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for row in report["levels"]:
        lines.append(f"| {row['concurrency']} | {row['requests']} | {row['requests_per_second']:.2f} | "
                     f"{row['tokens_per_second']:.1f} | {ms(row['ttft_p50'])} / {ms(row['ttft_p99'])} | "
                     f"{ms(row.get('steady_ttft_p50'))} / {ms(row.get('steady_ttft_p99'))} | "
                     f"{s(row['e2e_p50'])} / {s(row['e2e_p99'])} | {row['error_rate'] * 100:.1f}% | "
                     f"{row['rate_429'] * 100:.1f}% |")
    return "\n".join(lines + ["", f"Reproduce: `{report['command']}`", ""])


def _how(sampling: dict | None) -> str:
    if not sampling:
        return "greedy"
    return f"sampled at temperature {sampling['temperature']:g}" + (
        f", top-p {sampling['top_p']:g}" if "top_p" in sampling else "") + ", a seed per request"


def plot(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    levels = report["levels"]
    clients = [r["concurrency"] for r in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["tokens_per_second"] for r in levels], "o-", label="served")
    if report.get("offline"):
        for key, label in (("batch1_tokens_per_second", "generate() batch 1"),
                           ("batch16_tokens_per_second", "generate() batch 16")):
            left.axhline(report["offline"][key], linestyle="--", color="gray" if "16" in key else "silver", label=label)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("generated tokens / s")
    left.legend(fontsize=8)
    right.plot(clients, [(r["ttft_p50"] or 0) * 1e3 for r in levels], "o-", label="TTFT p50")
    right.plot(clients, [(r["ttft_p99"] or 0) * 1e3 for r in levels], "o--", label="TTFT p99")
    right.plot(clients, [(r.get("steady_ttft_p99") or 0) * 1e3 for r in levels], "s:",
               label="TTFT p99 after the opening burst")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("ms")
    right.legend(fontsize=8)
    figure.suptitle(f"{report.get('model', '')} served on {report['machine'].get('cpu', '?')}, "
                    f"{report['machine'].get('cores')} cores, {report['max_tokens']} tokens per request, "
                    f"{_how(report.get('sampling'))}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmtf-onnx loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example (int8-weight batches where the server finds a row computed alike "
                                            "alone and batched, as /ready says; int8-dynamic never does):\n"
                                            "  xmtf-onnx export preset:mt0-small exported/mt0-small --quantize int8-weight\n"
                                            "  xmtf-onnx serve exported/mt0-small --variant int8-weight &\n"
                                            "  xmtf-onnx loadtest http://127.0.0.1:8000 --concurrency 1,4,16 "
                                            "--requests 64 --offline exported/mt0-small\n"
                                            "  xmtf-onnx loadtest http://127.0.0.1:8000 --concurrency 16 --soak 2000 "
                                            "--offline exported/mt0-small   # exit 1 on a lost or wrong answer")
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000 (localhost only)")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (forced: min = max)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature, each request with its own seed (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p of sampled requests (with --temperature)")
    parser.add_argument("--offline", metavar="MODEL_DIR", help="also measure generate() on the same prompts")
    parser.add_argument("--variant", help="the variant --offline loads (default: the one the server says it runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--soak", type=int, metavar="N",
                        help="send N mixed requests from the largest --concurrency level and check each answer "
                             "against generate() alone (needs --offline MODEL_DIR with a tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="the soak's random plan")
    parser.add_argument("--out", default="bench-results/loadtest", help="where loadtest.json/.md/.png go")
    args = parser.parse_args(argv)
    if args.temperature < 0 or (args.top_p is not None and (args.temperature <= 0 or not 0 < args.top_p <= 1)):
        parser.error("--temperature must be >= 0; --top-p needs --temperature > 0 and a value in (0, 1]")
    if args.soak is not None and (args.soak < 1 or not args.offline):
        parser.error("--soak N needs N >= 1 and --offline MODEL_DIR (the folder the server runs)")
    host = urlparse(args.url).hostname
    if host not in LOCAL:
        parser.error(f"{host} is not this machine: the load test only targets localhost")
    import httpx

    try:
        ready = httpx.get(f"{args.url}/ready", timeout=5)
    except httpx.HTTPError as e:
        print(f"error: no server answers at {args.url} ({e}); start one with xmtf-onnx serve MODEL_DIR",
              file=sys.stderr)
        return 1
    if ready.status_code != 200:
        print(f"error: {args.url} is not ready ({ready.text[:200]})", file=sys.stderr)
        return 1
    from .suite import machine

    report = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "url": args.url, "model": ready.json().get("model"),
              "variant": ready.json().get("variant"), "machine": machine(), "max_tokens": args.max_tokens,
              "sampling": sampling_fields(args.temperature, args.top_p, 0),
              "command": "xmtf-onnx loadtest " + " ".join(argv or sys.argv[1:]), "levels": []}
    args.variant = args.variant or report["variant"]  # --offline loads the variant the server runs
    if args.soak:
        return _soak(args, report)
    if args.offline:
        print("== generate() offline (batch 1, batch 16)", file=sys.stderr, flush=True)
        report["offline"] = offline(args.offline, args.max_tokens, args.threads, args.variant)
    for concurrency in [int(c) for c in args.concurrency.split(",") if c]:
        print(f"== {concurrency} clients, {args.requests} requests", file=sys.stderr, flush=True)
        row = asyncio.run(level(args.url, concurrency, args.requests, args.max_tokens, args.timeout,
                                args.temperature, args.top_p))
        print(f"   {row['tokens_per_second']:.1f} tok/s, TTFT p50 {row['ttft_p50']:.3f} s, p99 {row['ttft_p99']:.3f} s "
              f"(after the opening burst {row['steady_ttft_p99'] or 0:.3f} s), errors {row['error_rate']:.2%}",
              file=sys.stderr, flush=True)
        report["levels"].append(row)
    picture = _write(args.out, "loadtest", report, markdown(report))
    if plot(report, picture):
        print(picture)
    return 0


def _write(folder: str, name: str, report: dict, text: str) -> str:
    """report as NAME.json and NAME.md in the folder (paths printed) -> where NAME.png goes."""
    os.makedirs(folder, exist_ok=True)
    for suffix, write in ((".json", lambda h: json.dump(report, h, indent=1)), (".md", lambda h: h.write(text))):
        path = os.path.join(folder, name + suffix)
        with open(path, "w", encoding="utf-8") as handle:
            write(handle)
        print(path)
    return os.path.join(folder, name + ".png")


def _soak(args: argparse.Namespace, report: dict) -> int:
    from xmtf_onnx.runtime import load

    from . import soak

    model = load(args.offline, threads=args.threads, variant=args.variant, verify=False)
    if not model.has_tokenizer:
        print("error: the soak sends text and checks it: export the model with its tokenizer", file=sys.stderr)
        return 1
    clients = max(int(c) for c in args.concurrency.split(",") if c)
    print(f"== the soak's expected answers: generate() alone on {soak.POOL} request kinds", file=sys.stderr, flush=True)
    pool = soak.specs(model, prompts(64), soak.POOL, args.seed)
    del model
    print(f"== soak: {args.soak} requests from {clients} clients", file=sys.stderr, flush=True)
    report["soak"] = asyncio.run(soak.run(args.url, pool, args.soak, clients, args.timeout, args.seed,
                                          progress=lambda line: print(line, file=sys.stderr, flush=True)))
    result = report["soak"]
    text = "\n".join([f"# xmtf-onnx soak ({report['created']})", "",
                      f"Server {report['url']} ({report.get('model')}, {report.get('variant')}); "
                      f"{report['machine'].get('cpu', '?')}, {report['machine'].get('cores')} cores."]
                     + soak.markdown(result) + ["", f"Reproduce: `{report['command']}`", ""])
    _write(args.out, "soak", report, text)
    print(text)
    return 0 if not (result["errors"] or result["mismatched"] or result["duplicate_ids"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
