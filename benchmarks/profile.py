"""Where a decode step's time goes on this machine: xmtf-onnx bench profile MODEL_DIR.

A step of a small model is a few sessions run one after another (decoder, then the greedy screen or the head, and
for beam search onnxruntime's LogSoftmax and TopK), each a few hundred small ops around a few large MatMuls. What
limits it differs between kinds of machine: the bytes the MatMuls read, the kernel onnxruntime picks for M=1 on this
CPU, or the time its thread pools take to wake up between the sessions of a step (expensive on a VM). This measures
each of those in one process, on the same token ids, with the generated length forced (min = max new tokens):

  1. the step under the thread policy load() gives (tuning.py), split by session: milliseconds per decode step of
     every session's runs, and the host's share (numpy, IO binding, the choice of the token) as the rest;
  2. per op type, from onnxruntime's own profiler (a separate run: the profiler adds a cost to every node, which
     the report estimates, so small ops are an upper bound), each session's largest op types and largest node;
  3. the thread policies on this model (spinning while a run lasts, never, always; one thread), interleaved round by
     round: decode tokens/s and the per-token p50 / p90, which shows scheduling noise;
  4. one session or several per step: tuning's synthetic step (mt0-small's shapes) as one graph, and split into the
     body and head sessions a real step runs, under each policy; the difference is what one more session costs.

Writes profile.json and profile.md (in --out) and prints the markdown. Random-weight presets do as well as real
weights: the time depends on shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import onnxruntime as ort

from xmtf_onnx.runtime import load
from xmtf_onnx.runtime.errors import XmtfError
from xmtf_onnx.runtime.generation import StepTimer
from xmtf_onnx.runtime.session import POLICIES, default_options, small_session
from xmtf_onnx.runtime.tuning import ENV_POLICY, policy_and_record, synthetic_step, time_chains


class SessionClock:
    """Times every InferenceSession run of this process while it is installed (onnxruntime's Python class is
    patched, so the runtime is measured as a user calls it), and the generation's step windows (StepTimer.record:
    step 0 is the prefill, the first token)."""

    def __init__(self):
        self.runs: list[tuple[int, float, float]] = []  # (id of the session, start, end), perf_counter seconds
        self.steps: list[tuple[int, float, float]] = []  # (step, start, end)
        self._saved: dict = {}

    def __enter__(self) -> SessionClock:
        session_class, clock = ort.InferenceSession, self
        for method in ("run", "run_with_iobinding"):
            original = getattr(session_class, method)
            self._saved[method] = original

            def timed(session, *args, _original=original, **kwargs):
                began = time.perf_counter()
                try:
                    return _original(session, *args, **kwargs)
                finally:
                    clock.runs.append((id(session), began, time.perf_counter()))
            setattr(session_class, method, timed)
        original_record = StepTimer.record
        self._saved["record"] = original_record

        def record(timer, step, seconds):
            now = time.perf_counter()
            clock.steps.append((step, now - seconds, now))
            return original_record(timer, step, seconds)
        StepTimer.record = record
        return self

    def __exit__(self, *exc) -> None:
        for method in ("run", "run_with_iobinding"):
            setattr(ort.InferenceSession, method, self._saved[method])
        StepTimer.record = self._saved["record"]

    def clear(self) -> None:
        self.runs.clear()
        self.steps.clear()


def label_of(labels: dict[int, str], sessions: dict[int, ort.InferenceSession], key: int) -> str:
    """A session's role (encoder, decoder, head, screen, ...) or, for the runtime's own one-node sessions
    (log-softmax, top-k), their graph's name."""
    if key in labels:
        return labels[key]
    session = sessions.get(key)
    name = session.get_modelmeta().graph_name if session is not None else ""
    return f"{name or 'other'} (runtime's own)"


@contextlib.contextmanager
def forced_policy(name: str | None):
    """load() under the thread policy `name` (None: the machine's choice), through its environment setting."""
    saved = os.environ.get(ENV_POLICY)
    if name is not None:
        os.environ[ENV_POLICY] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_POLICY, None)
        else:
            os.environ[ENV_POLICY] = saved


def _prompts(model, batch: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """Token ids drawn from the tokens the model may read (specials and the first ids left out)."""
    rng = np.random.default_rng(seed)
    vocab = int(model.manifest.tokens["vocab_size"])
    low = min(260, vocab // 2)
    return [rng.integers(low, vocab, size=prompt_tokens).tolist() for _ in range(batch)]


def _generate(model, rows: list[list[int]], beams: int, new_tokens: int):
    return model.generate(input_ids=rows, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams)


def step_breakdown(model, rows: list[list[int]], beams: int, new_tokens: int, rounds: int) -> dict:
    """Section 1: per session, milliseconds per decode step (the steps after the first token) and calls per step;
    the host's share is the steps' wall time less the sessions'. Medians over `rounds` generations."""
    _generate(model, rows, beams, min(new_tokens, 4))  # warm-up: first runs allocate
    per_round = []
    with SessionClock() as clock:
        for _ in range(rounds):
            clock.clear()
            output = _generate(model, rows, beams, new_tokens)
            sessions = {id(s): s for s in model.sessions.values()}
            sessions.update({id(s): s for s in _own_sessions(model)})
            labels = {id(session): role for role, session in model.sessions.items()}
            windows = [(start, end) for step, start, end in clock.steps if step > 0]
            first = [(start, end) for step, start, end in clock.steps if step == 0]
            ms, calls, first_ms = defaultdict(float), defaultdict(int), defaultdict(float)
            for key, start, end in clock.runs:
                label = label_of(labels, sessions, key)
                if any(s <= start and end <= e for s, e in windows):
                    ms[label] += (end - start) * 1e3
                    calls[label] += 1
                elif any(s <= start and end <= e for s, e in first):
                    first_ms[label] += (end - start) * 1e3
            steps = len(output.metrics["step_seconds"])
            step_ms = np.array(output.metrics["step_seconds"]) * 1e3
            per_round.append({"steps": steps, "step_ms": float(step_ms.mean()),
                              "step_p50_ms": float(np.percentile(step_ms, 50)),
                              "step_p90_ms": float(np.percentile(step_ms, 90)),
                              "first_token_ms": output.metrics["prefill_seconds"] * 1e3,
                              "sessions_ms": {k: v / steps for k, v in ms.items()},
                              "calls_per_step": {k: v / steps for k, v in calls.items()},
                              "first_token_sessions_ms": dict(first_ms)})
    middle = sorted(per_round, key=lambda r: r["step_ms"])[len(per_round) // 2]
    middle["host_ms"] = middle["step_ms"] - sum(middle["sessions_ms"].values())
    middle["rounds_step_ms"] = [r["step_ms"] for r in per_round]
    return middle


def _own_sessions(model) -> list[ort.InferenceSession]:
    """The runtime's own one-node sessions (log-softmax, top-k), made on first use; labelled by their graph's name."""
    return list(getattr(model.runner, "_own_sessions", {}).values())


def op_profile(folder: str, variant: str | None, rows: list[list[int]], beams: int, new_tokens: int,
               top: int = 8) -> dict:
    """Section 2: onnxruntime's profiler on every session of a model loaded under the machine's policy: node times
    of the measured generation's decode steps (the warm-up's runs and the first token's left out), per op type, in
    microseconds per step; a session that runs once per request (mT0's encoder) is given per request."""
    policy, _ = policy_and_record()
    with tempfile.TemporaryDirectory(prefix="xmtf-profile-") as folder_out:
        options = default_options(policy)
        options.enable_profiling = True
        with _own_profile_files(folder_out):
            model = load(folder, variant=variant, verify=False, session_options=options)
        _generate(model, rows, beams, min(new_tokens, 4))  # warm-up, left out below
        with SessionClock() as clock:
            _generate(model, rows, beams, new_tokens)
        counts = defaultdict(int)
        for key, _, _ in clock.runs:
            counts[key] += 1
        result = {}
        for role, session in model.sessions.items():
            path = session.end_profiling()
            events = _read_trace(path)
            result[role] = _summarize(events, counts.get(id(session), 0), top)
        del model
    return result


@contextlib.contextmanager
def _own_profile_files(folder: str):
    """Each session made meanwhile writes its profile under a prefix of its own: onnxruntime names the file by the
    time, and sessions made within the same millisecond would share (and truncate) one file."""
    original, made = ort.InferenceSession.__init__, [0]

    def init(session, *args, **kwargs):
        options = kwargs.get("sess_options") or (args[1] if len(args) > 1 else None)
        if options is not None and options.enable_profiling:
            made[0] += 1
            options.profile_file_prefix = os.path.join(folder, f"session{made[0]}")
        original(session, *args, **kwargs)
    ort.InferenceSession.__init__ = init
    try:
        yield
    finally:
        ort.InferenceSession.__init__ = original


def _read_trace(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _summarize(events: list[dict], runs: int, top: int) -> dict:
    """Node kernel times inside the last `runs` model runs of a trace, the first of them (the prompt, the first
    token) left out when there are several -> per op type, microseconds per run and nodes per run."""
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
               and e.get("name") == "model_run"][-runs:] if runs else []
    if len(windows) > 1:
        windows = windows[1:]
    by_type, calls, by_node = defaultdict(float), defaultdict(int), defaultdict(float)
    starts = np.array([s for s, _ in windows])
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time") or not windows:
            continue
        position = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if position < 0 or event["ts"] > windows[position][1]:
            continue
        op = event.get("args", {}).get("op_name", "?")
        by_type[op] += event["dur"]
        calls[op] += 1
        by_node[event["name"][:-len("_kernel_time")]] += event["dur"]
    count = max(1, len(windows))
    kernel_us = sum(by_type.values())
    ranked = sorted(by_type.items(), key=lambda item: -item[1])
    largest = max(by_node.items(), key=lambda item: item[1]) if by_node else ("", 0.0)
    return {"runs": len(windows), "unit": "step" if len(windows) > 1 else "request",
            "run_us": sum(e - s for s, e in windows) / count, "kernel_us": kernel_us / count,
            "nodes": sum(calls.values()) / count,
            "op_types": [{"op": op, "us": us / count, "nodes": calls[op] / count, "share": us / kernel_us}
                         for op, us in ranked[:top]],
            "other_op_types": len(ranked) - min(top, len(ranked)),
            "largest_node": {"name": largest[0], "us": largest[1] / count}}


def _weight_bytes(model) -> int:
    entry = model.manifest.variant(model.variant)
    files = {item["path"]: item["bytes"] for file in entry["files"].values() for item in [file, *file.get("data", [])]}
    return sum(files.values())


def policy_comparison(folder: str, variant: str | None, rows: list[list[int]], beams: int, new_tokens: int,
                      rounds: int, weight_bytes: int, progress) -> dict:
    """Section 3: each thread policy on this model, interleaved round by round (A B C D A B C D ...). The models stay
    loaded together when four copies of the packed weights fit in memory; otherwise each is loaded for its turn."""
    from xmtf_onnx.export.validation import available_memory

    together = 4 * 1.5 * weight_bytes < 0.6 * available_memory()
    models = {}
    if together:
        for policy in POLICIES:
            with forced_policy(policy.name):
                models[policy.name] = load(folder, variant=variant, verify=False)
    results = {policy.name: {"tokens_per_second": [], "p50_ms": [], "p90_ms": []} for policy in POLICIES}
    for round_number in range(rounds):
        for policy in POLICIES:
            model = models.get(policy.name)
            if model is None:
                with forced_policy(policy.name):
                    model = load(folder, variant=variant, verify=False)
            _generate(model, rows, beams, min(new_tokens, 4))  # warm-up
            output = _generate(model, rows, beams, new_tokens)
            steps = np.array(output.metrics["step_seconds"])
            entry = results[policy.name]
            entry["tokens_per_second"].append(len(rows) * len(steps) / steps.sum() if steps.size else 0.0)
            entry["p50_ms"].append(float(np.percentile(steps, 50) * 1e3) if steps.size else 0.0)
            entry["p90_ms"].append(float(np.percentile(steps, 90) * 1e3) if steps.size else 0.0)
            if not together:
                del model
        progress(f"   policies, round {round_number + 1}/{rounds}: " + ", ".join(
            f"{name} {values['tokens_per_second'][-1]:.1f}" for name, values in results.items()) + " tok/s")
    return {"loaded_together": together, "policies": {
        name: {"decode_tokens_per_second_median": float(np.median(v["tokens_per_second"])),
               "decode_tokens_per_second_best": float(np.max(v["tokens_per_second"])),
               "p50_ms_median": float(np.median(v["p50_ms"])), "p90_ms_median": float(np.median(v["p90_ms"])),
               "rounds": v["tokens_per_second"]} for name, v in results.items()}}


def session_split(rounds: int = 7, steps: int = 16) -> dict:
    """Section 4: tuning's synthetic decode step (mt0-small's shapes: 64 projections and small ops, then a 16k-row
    head) run as one session, and as two (body, then head) as a real step runs, under each policy; the policies and
    both forms interleaved, medians of `rounds`. The difference is what one more session per step costs."""
    forms = {"one": synthetic_step(fused=True), "two": synthetic_step()}
    ms = time_chains({(policy.name, form): [small_session(graph, policy=policy) for graph in graphs]
                      for policy in POLICIES for form, graphs in forms.items()}, rounds, steps)
    return {policy.name: {"one_session_ms": ms[(policy.name, "one")], "two_sessions_ms": ms[(policy.name, "two")]}
            for policy in POLICIES}


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Where the time goes: {report['model']} ({report['variant']}), {report['setting']}",
             "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, onnxruntime {m.get('onnxruntime', '?')}; "
             f"{report['new_tokens']} tokens generated (forced), prompts of {report['prompt_tokens']} tokens; "
             f"thread policy load() gives here: **{report['policy']}** ({report['policy_source']}). "
             f"Created {report['created']}.", ""]
    steps = report.get("steps")
    if steps:
        lines += ["## 1. A decode step, by session (median round)", "",
                  f"Step {steps['step_ms']:.2f} ms on average (per-token p50 {steps['step_p50_ms']:.2f}, p90 "
                  f"{steps['step_p90_ms']:.2f} ms; rounds {', '.join(f'{v:.2f}' for v in steps['rounds_step_ms'])});"
                  f" first token {steps['first_token_ms']:.1f} ms.", "",
                  "| session | ms per step | share | runs per step |", "|---|---|---|---|"]
        for label, ms in sorted(steps["sessions_ms"].items(), key=lambda item: -item[1]):
            lines.append(f"| {label} | {ms:.3f} | {ms / steps['step_ms']:.0%} | {steps['calls_per_step'][label]:.2f} |")
        lines += [f"| host (numpy, IO binding, the token's choice) | {steps['host_ms']:.3f} | "
                  f"{steps['host_ms'] / steps['step_ms']:.0%} | – |", ""]
    ops = report.get("ops")
    if ops:
        lines += ["## 2. Per op type (onnxruntime's profiler, in a run of its own)", "",
                  "onnxruntime's profiler slows a run by a fixed cost per node, so small ops look larger than they are "
                  "and the run longer than in section 1 (compared below): read the shares of the large ops, and the "
                  "small ops as an upper bound.", ""]
        for role, summary in ops.items():
            if not summary["runs"]:
                continue
            unprofiled = (steps or {}).get("sessions_ms", {}).get(role) if summary["unit"] == "step" else None
            lines += [f"**{role}** (per {summary['unit']}): a run takes {summary['run_us']:.0f} µs profiled"
                      + (f" ({unprofiled * 1e3:.0f} µs without the profiler: its cost is about "
                         f"{max(0.0, summary['run_us'] - unprofiled * 1e3) / max(summary['nodes'], 1):.1f} µs a node)"
                         if unprofiled else "")
                      + f", {summary['kernel_us']:.0f} µs in {summary['nodes']:.0f} nodes' kernels; the largest node "
                      f"`{summary['largest_node']['name']}` {summary['largest_node']['us']:.0f} µs.", "",
                      "| op type | µs | share of kernels | nodes | µs per node |", "|---|---|---|---|---|"]
            lines += [f"| {o['op']} | {o['us']:.0f} | {o['share']:.0%} | {o['nodes']:.0f} | "
                      f"{o['us'] / max(o['nodes'], 1e-9):.1f} |" for o in summary["op_types"]]
            if summary["other_op_types"]:
                lines.append(f"| ({summary['other_op_types']} more op types) | | | | |")
            lines.append("")
    policies = report.get("policies")
    if policies:
        lines += ["## 3. Thread policies on this model (interleaved rounds)", "",
                  "| policy | decode tok/s median | best | per-token p50 ms | p90 ms | p90 / p50 |",
                  "|---|---|---|---|---|---|"]
        for name, p in policies["policies"].items():
            mark = " (load() default here)" if name == report["policy"] else ""
            lines.append(f"| {name}{mark} | {p['decode_tokens_per_second_median']:.1f} | "
                         f"{p['decode_tokens_per_second_best']:.1f} | {p['p50_ms_median']:.2f} | "
                         f"{p['p90_ms_median']:.2f} | {p['p90_ms_median'] / max(p['p50_ms_median'], 1e-9):.2f} |")
        lines.append("")
    split = report.get("sessions")
    if split:
        per_step = sum(steps["calls_per_step"].values()) if steps else None
        lines += ["## 4. One session or two per step (tuning's synthetic step, mt0-small's shapes)", "",
                  "The same work as one graph, and split into a body and a head session as a real step runs; the "
                  "difference is what one more session per step costs"
                  + (f" (this model's step runs {per_step:.0f} sessions)." if per_step else "."), "",
                  "| policy | one session ms | two sessions ms | one more session costs µs |", "|---|---|---|---|"]
        for name, s in split.items():
            lines.append(f"| {name} | {s['one_session_ms']:.3f} | {s['two_sessions_ms']:.3f} | "
                         f"{(s['two_sessions_ms'] - s['one_session_ms']) * 1e3:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xmtf-onnx bench profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  xmtf-onnx export preset:mt0-small exported/mt0-small --quantize int8\n"
               "  xmtf-onnx bench profile exported/mt0-small --variant int8\n"
               "  xmtf-onnx bench profile exported/bloomz-560m --variant int4-weight --setting 8x4 --skip policies,sessions")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an exported folder")
    parser.add_argument("--variant", help="the variant to profile (default: the folder's default)")
    parser.add_argument("--setting", default="1x1", help="BATCHxBEAMS (default 1x1: batch 1, greedy)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run, forced (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=24, help="prompt length in tokens (default 24)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement (default 3)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: steps, ops, policies, "
                                                   "sessions")
    parser.add_argument("--out", default="bench-results", help="where profile.json and profile.md go")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"steps", "ops", "policies", "sessions"}
    try:
        batch, beams = (int(v) for v in args.setting.lower().split("x"))
    except ValueError:
        batch = beams = 0
    if unknown or batch < 1 or beams < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or args.rounds < 1:
        parser.error(f"unknown sections {sorted(unknown)}" if unknown else
                     "--setting is BATCHxBEAMS (e.g. 1x1, 8x4), --new-tokens at least 2, --prompt-tokens and "
                     "--rounds at least 1")

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from .suite import machine

    try:
        policy, record = policy_and_record(progress=progress)
        model = load(args.model_dir, variant=args.variant, verify=False)
    except XmtfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = _prompts(model, batch, args.prompt_tokens)
    report = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "model": os.path.basename(os.path.normpath(args.model_dir)),
              "variant": model.variant, "setting": f"{batch}x{beams}", "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
              "machine": {**machine(), "onnxruntime": ort.__version__}, "policy": policy.name,
              "policy_source": record.get("source", "?"), "policy_ms_per_synthetic_step": record.get("ms_per_step")}
    weight_bytes = _weight_bytes(model)
    if "steps" not in skip:
        progress(f"== 1/4 the step by session ({args.rounds} rounds of {args.new_tokens} tokens)")
        report["steps"] = step_breakdown(model, rows, beams, args.new_tokens, args.rounds)
    del model
    if "ops" not in skip:
        progress("== 2/4 per op type (onnxruntime's profiler)")
        report["ops"] = op_profile(args.model_dir, args.variant, rows, beams, args.new_tokens)
    if "policies" not in skip:
        progress(f"== 3/4 thread policies on this model ({args.rounds} interleaved rounds)")
        report["policies"] = policy_comparison(args.model_dir, args.variant, rows, beams, args.new_tokens,
                                               args.rounds, weight_bytes, progress)
    if "sessions" not in skip:
        progress("== 4/4 one session or two per step (synthetic)")
        report["sessions"] = session_split()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    text = render(report)
    with open(os.path.join(args.out, "profile.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    print(text)
    progress(f"written: {os.path.join(args.out, 'profile.md')} and profile.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
