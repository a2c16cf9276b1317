"""Runs one backend on every setting in its own process: python -m xmtf_onnx.benchmarks.worker SPEC.json

Prints one JSON line: load seconds, peak RSS, size on disk and, per setting, the timings of each repeat.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback


def peak_rss_bytes() -> int:
    """This process's high-water RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a worker
    started by a parent holding a big model would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_split() -> dict:
    """Where the resident memory is at the end: anonymous (heap: packed weight copies, activations, caches) and
    file-backed (memory-mapped weights; clean pages the kernel can drop and re-read)."""
    found = {}
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                key = line.split(":")[0]
                if key in ("RssAnon", "RssFile"):
                    found[f"{key.lower().replace('rss', 'rss_')}_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found


def main(spec_path: str) -> int:
    started = time.perf_counter()
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    result: dict = {"name": spec["name"], "settings": {}}
    try:
        from .backends import BACKENDS

        backend = BACKENDS[spec["backend"]](spec)
        result["load_seconds"] = time.perf_counter() - started  # imports included, as a user pays them
        result["size_bytes"] = backend.size
        supports = getattr(backend, "supports", lambda batch, beams, sample: True)
        for key, setting in spec["settings"].items():
            rows, sample = setting["rows"], setting.get("sample", False)
            if not supports(len(rows), setting["beams"], sample):
                continue  # llama.cpp: batch 1 greedy only; the table shows – for the rest
            runs = []
            for repeat in range(spec["warmup"] + spec["repeats"]):
                tokens, first, steps, total = backend.run(rows, setting["beams"], spec["new_tokens"], sample)
                if repeat >= spec["warmup"]:
                    runs.append({"tokens": tokens, "first_token_seconds": first, "step_seconds": steps,
                                 "total_seconds": total, **getattr(backend, "notes", {})})
            result["settings"][key] = {"runs": runs}
        result["status"] = "ok"
    except Exception as e:  # a failing rival is reported with its error, not dropped
        result["status"] = "failed"
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
        result["traceback"] = traceback.format_exc()[-2000:]
    result["peak_rss_bytes"] = peak_rss_bytes()
    result.update(resident_split())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
