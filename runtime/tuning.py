"""How the CPU sessions of this machine schedule their threads: measured once per machine, cached, then used by every
load() that does not bring its own session options.

A decode step runs two or three sessions one after another (decoder, then head or screen), each a few hundred small
ops around a few large MatMuls. Which thread policy is fastest depends on the machine and its hypervisor, not on the
model: on a 2-core AMD EPYC KVM guest, mt0-small int8 greedy ran 59.5 tokens/s with threads spinning while a run lasts
and stopped when it ends, 56.9 never spinning, 44.0 on one thread and 41.0 left spinning (onnxruntime's default; one
process per policy, interleaved, median of 3); an Intel Xeon guest showed a per-token p90 twice its p50 under the
first. So the first load() on a machine times each policy on a synthetic decode step (two sessions: 8 blocks of eight
512 x 384 projections and small ops, then a 512 x 16384 head; a few seconds), keeps the fastest (the first policy
unless another is at least 20% faster: the synthetic step ranks the policies as mt0-small does, but not to within 10%)
in a cache file keyed by the CPU, the cores this process may use and onnxruntime's version; every later load reads it.

XMTF_ONNX_THREAD_POLICY: "auto" (default: the cached choice, measured when there is none), "fixed" (the first policy,
never measured), or a policy's name to force it. XMTF_ONNX_CACHE: the cache folder (default
$XDG_CACHE_HOME/xmtf-onnx, else ~/.cache/xmtf-onnx). `xmtf-onnx tune` shows the measurement and can redo it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import threading
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

from .errors import ConfigurationError
from .session import (DEFAULT_POLICY as DEFAULT, FLOAT, POLICIES, ThreadPolicy, _cpu_flags,
                      small_model, small_session)

ENV_POLICY, ENV_CACHE = "XMTF_ONNX_THREAD_POLICY", "XMTF_ONNX_CACHE"
MARGIN = 0.20  # another policy replaces the first only when its step is at least this much faster
LOCK_WAIT_S = 60.0  # how long a process waits for another one measuring the same machine
BY_NAME = {policy.name: policy for policy in POLICIES}

_chosen: dict[str, tuple[ThreadPolicy, dict]] = {}  # this process's choice per cache file
_lock = threading.Lock()


def cache_file() -> str:
    """The file this machine's choice is kept in."""
    folder = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "xmtf-onnx")
    return os.path.join(folder, f"thread-policy-{machine_key()}.json")


def machine() -> dict:
    """What the choice depends on: the CPU, the cores this process may use, onnxruntime's version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "onnxruntime": ort.__version__, "arch": platform.machine(),
            "flags": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:12]}


def machine_key() -> str:
    return hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]


def machine_policy(refresh: bool = False, progress: Callable[[str], None] | None = None) -> ThreadPolicy:
    """The thread policy for this machine's CPU sessions (see the module's text). refresh: measure again."""
    return policy_and_record(refresh, progress)[0]


def policy_and_record(refresh: bool = False,
                      progress: Callable[[str], None] | None = None) -> tuple[ThreadPolicy, dict]:
    """machine_policy and what it was chosen from: {"source": "fixed" | "forced" | "cache" | "measured" | ...,
    "ms_per_step": {policy: ms}, ...}."""
    setting = (os.environ.get(ENV_POLICY) or "auto").strip().lower()
    if setting == "fixed":
        return DEFAULT, {"source": "fixed", "setting": f"{ENV_POLICY}=fixed"}
    if setting in BY_NAME:
        return BY_NAME[setting], {"source": "forced", "setting": f"{ENV_POLICY}={setting}"}
    if setting != "auto":
        raise ConfigurationError(f"{ENV_POLICY}={setting!r} is not a thread policy; use auto (measure once per "
                                 f"machine), fixed ({DEFAULT.name}, never measured), or one of "
                                 f"{', '.join(BY_NAME)}.")
    path = cache_file()
    with _lock:
        if not refresh and path in _chosen:
            return _chosen[path]
        chosen = None if refresh else _read(path)
        if chosen is None:
            chosen = _measure_once(path, refresh, progress)
        _chosen[path] = chosen
        return chosen


def _read(path: str) -> tuple[ThreadPolicy, dict] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        return BY_NAME[record["policy"]], {**record, "source": "cache", "file": path}
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: measured again, then rewritten
        return None


def _measure_once(path: str, refresh: bool, progress: Callable[[str], None] | None) -> tuple[ThreadPolicy, dict]:
    """Measure under a lock on the cache file, so that processes started together (a server's workers, a benchmark)
    do not measure at the same time, each disturbing the others; the first writes the file, the rest read it."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(path + ".lock", "a")
    except OSError as e:  # a read-only home: measure for this process only
        return _measure(progress, note=f"not cached ({e.strerror}: {folder})")
    try:
        if not _lock_file(handle, LOCK_WAIT_S):
            return DEFAULT, {"source": "fixed", "note": f"another process held {path}.lock for {LOCK_WAIT_S:.0f} s"}
        if not refresh and (cached := _read(path)) is not None:
            return cached
        policy, record = _measure(progress)
        saved = {key: value for key, value in record.items() if key != "source"}
        try:
            partial = tempfile.NamedTemporaryFile("w", dir=folder, prefix=".thread-policy-", suffix=".json",
                                                  delete=False, encoding="utf-8")
            with partial:
                json.dump(saved, partial, indent=1)
            os.chmod(partial.name, 0o644)
            os.replace(partial.name, path)
            record["file"] = path
        except OSError as e:
            record["note"] = f"not cached ({e.strerror}: {folder})"
        return policy, record
    finally:
        handle.close()  # releases the lock


def _lock_file(handle, wait_s: float) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, measuring twice is harmless
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def _measure(progress: Callable[[str], None] | None, note: str | None = None) -> tuple[ThreadPolicy, dict]:
    if progress:
        progress(f"timing {len(POLICIES)} thread policies on a synthetic decode step (once per machine, a few seconds)")
    ms = measure(POLICIES)
    policy = choose(ms)
    record = {"policy": policy.name, "ms_per_step": {name: round(value, 3) for name, value in ms.items()},
              "machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "source": "measured"}
    if note:
        record["note"] = note
    return policy, record


def choose(ms_per_step: dict[str, float]) -> ThreadPolicy:
    """The first policy, unless another's step is at least MARGIN faster (a measurement of a few seconds is noisy:
    a switch must be worth it)."""
    best = min(ms_per_step, key=ms_per_step.get)
    if ms_per_step[best] * (1 + MARGIN) <= ms_per_step[DEFAULT.name]:
        return BY_NAME[best]
    return DEFAULT


def measure(policies=POLICIES, rounds: int = 5, steps: int = 8) -> dict[str, float]:
    """Median milliseconds of one synthetic decode step (a body session, then a head session) under each policy,
    the policies interleaved round by round (time_chains)."""
    graphs = synthetic_step()
    return time_chains({policy.name: [small_session(graph, policy=policy) for graph in graphs] for policy in policies},
                       rounds, steps)


def time_chains(chains: dict, rounds: int = 5, steps: int = 8, depth: int = 512) -> dict:
    """Median milliseconds of a step of each chain of sessions (each run's output "x" -> the next one's input, from
    x [1, depth]), the chains interleaved round by round; a pause after each lets a spinning pool go to sleep before
    the next."""
    x = np.random.default_rng(0).standard_normal((1, depth)).astype(np.float32)  # [1, d]

    def step(chain) -> None:
        value = x
        for session in chain:
            value = session.run(None, {"x": value})[0]

    times: dict = {key: [] for key in chains}
    for chain in chains.values():
        step(chain)  # warm-up: the first run allocates
    for _ in range(rounds):
        for key, chain in chains.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(chain)
            times[key].append((time.perf_counter() - start) / steps * 1e3)
            time.sleep(0.02)
    return {key: float(np.median(values)) for key, values in times.items()}


def synthetic_step(depth: int = 512, width: int = 384, blocks: int = 8, projections: int = 8, small_ops: int = 12,
                    vocab: int = 16384, fused: bool = False) -> list[bytes]:
    """Two models shaped like mt0-small's decoder step: body x [1, d] -> 8 blocks of 8 chained projections
    (d -> width -> d, as attention's q/k/v/o and the FFN's; each a parallel section of the pool) and small
    element-wise ops (one thread each), then head [1, d] -> [1, vocab]. fused: the same work as one model, x -> logits
    (what a step would cost in one session)."""
    nodes, weights, x = [], {}, "x"
    for b in range(blocks):
        y = x
        for p in range(projections):
            shape = (depth, width) if p % 2 == 0 else (width, depth)
            weights[f"w{b}_{p}"] = np.full(shape, 1 / shape[0], np.float32)  # the speed does not depend on values
            nodes.append(("MatMul", [y, f"w{b}_{p}"], [f"p{b}_{p}"], {}))
            y = f"p{b}_{p}"
        for i in range(small_ops):  # residual adds, the element-wise parts of norms and activations
            nodes.append(("Mul" if i % 2 else "Add", [y, x], [f"s{b}_{i}"], {}))
            y = f"s{b}_{i}"
        nodes.append(("Tanh", [y], [f"x{b}"], {}))  # keeps values bounded
        x = f"x{b}"
    projection = np.full((depth, vocab), 1 / depth, np.float32)
    if fused:
        nodes.append(("MatMul", [x, "projection"], ["logits"], {}))
        return [small_model(nodes, [("x", FLOAT)], [("logits", FLOAT)], {**weights, "projection": projection},
                            name="synthetic_step")]
    nodes.append(("Identity", [x], ["hidden"], {}))
    body = small_model(nodes, [("x", FLOAT)], [("hidden", FLOAT)], weights, name="synthetic_body")
    head = small_model([("MatMul", ["x", "projection"], ["logits"], {})], [("x", FLOAT)], [("logits", FLOAT)],
                       {"projection": projection}, name="synthetic_head")
    return [body, head]
