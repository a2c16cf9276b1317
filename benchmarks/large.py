"""The whole family on one machine: export cost per preset, and the runtime on the large exports.

  xmtf-onnx bench large export-cost --presets mt0-xl,bloomz-7b1 [--quantize int4-weight --no-fp32]
      runs `xmtf-onnx export preset:NAME` for each preset in its own process: wall time and peak RSS
      (VmHWM of the export process), size on disk, parameters.
  xmtf-onnx bench large run --exports DIR[,DIR...] [--settings 1x1,8x4]
      loads each export (its default variant) in its own process: load time, RssAnon / RssFile after load,
      B=1 greedy and B x beams tokens/s with the generated length forced, peak RSS, the KV cache size, and
      the memory-bandwidth bound of B=1 (bytes read per token / measured read bandwidth).

  xmtf-onnx bench large llama-cpp --checkpoint DIR --llama-cpp DIR [--types q4_0,q8_0]
      the rival for BLOOM at B=1: converts the same checkpoint with llama.cpp's own convert_hf_to_gguf.py
      (its pre-tokenizer check is bypassed: a random-weight preset has a word-level tokenizer, and speed does
      not depend on it), quantizes with llama-quantize --pure (every tensor in the type asked, head included),
      and runs llama-bench (decode tokens/s, prompt of 24, 32 generated, the same threads). llama.cpp is an
      optional rival: build it yourself (cmake) and pass its folder; nothing of it ships with xmtf-onnx.

Results go to bench-results/large.json. Random-weight presets: speed depends on shapes only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from . import llama


def _status(pid: int | str = "self") -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def export_cost(presets: list[str], work: str, extra: list[str], progress: bool, keep: bool) -> list[dict]:
    """Each export in its own process; its peak RSS is polled from /proc (VmHWM of the exporting process). Each
    folder is deleted once measured unless keep."""
    results = []
    for preset in presets:
        target = os.path.join(work, preset)
        command = [sys.executable, "-m", "xmtf_onnx.runtime.cli", "export", f"preset:{preset}", target, "--force",
                   *extra]
        print(f"== export {preset}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.DEVNULL)
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, _status(process.pid).get("VmHWM", 0))
            except OSError:
                pass
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        entry = {"preset": preset, "options": extra, "seconds": seconds, "peak_rss_bytes": peak,
                 "status": "ok" if process.returncode == 0 else f"exit {process.returncode}"}
        if process.returncode == 0:
            with open(os.path.join(target, "xmtf_manifest.json"), encoding="utf-8") as handle:
                manifest = json.load(handle)
            entry.update(num_parameters=manifest["num_parameters"], size_bytes=folder_bytes(target),
                         variants=list(manifest["variants"]), validation=manifest["validation"]["mode"])
        results.append(entry)
        print(f"   {entry}", file=sys.stderr, flush=True)
        if not keep:
            import shutil

            shutil.rmtree(target, ignore_errors=True)
    return results


def read_bandwidth(size: int = 1 << 30, threads: int | None = None) -> float:
    """Bytes per second the machine reads from memory with all its cores: each thread reduces its share of a 1 GB
    array (numpy releases the GIL), best of 3 rounds of each of two reductions. Two, because one alone can be bound by
    the core rather than by memory: on an Intel Xeon (Emerald Rapids) guest a float64 sum read 15 GB/s with 2 threads
    where an int32 max read 30; on an AMD EPYC the sum read 34-35 GB/s. The faster one is the machine's figure."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = threads or os.cpu_count() or 1
    data = np.ones(size // 8, np.float64)
    reductions = ((np.sum, np.array_split(data, threads)), (np.max, np.array_split(data.view(np.int32), threads)))
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            for reduce, parts in reductions:
                began = time.perf_counter()
                list(pool.map(reduce, parts))
                best = min(best, time.perf_counter() - began)
    return size / best


def decode_bytes(manifest, variant: str) -> int:
    """Bytes of weights one greedy decode step reads at B=1: every external initializer of the decoder graph and of
    the head (or, where the variant has one, the greedy screen) counted once, except the tables read through a
    Gather (the embedding, the screen's exact rows: a step reads a few rows of them)."""
    import onnx

    files = manifest.variant(variant)["files"]
    read: dict[tuple[str, int], int] = {}
    for role in ("decoder", "screen" if "screen" in files else "head"):
        path = manifest.path(files[role]["path"])
        graph = onnx.load(path, load_external_data=False).graph
        gathered = {name for node in graph.node if node.op_type in ("Gather", "GatherBlockQuantized")
                    for name in node.input[:1]}
        for tensor in graph.initializer:
            info = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in info and tensor.name not in gathered:
                where = os.path.normpath(os.path.join(os.path.dirname(path), info["location"]))
                read[(where, int(info.get("offset", 0)))] = int(info["length"])
    return sum(read.values())


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux), so that each setting reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def run_one(folder: str, settings: list[tuple[int, int]], new_tokens: int, threads: int | None) -> dict:
    """Measured in this process (the caller starts one process per export)."""
    import numpy as np

    from xmtf_onnx.runtime import load

    began = time.perf_counter()
    model = load(folder, verify=False, threads=threads)
    loaded = time.perf_counter() - began
    after_load = _status()
    manifest = model.manifest
    entry = model.manifest.variant(model.variant)
    files = {item["path"]: item["bytes"] for file in entry["files"].values() for item in [file, *file.get("data", [])]}
    weight_bytes = sum(files.values())  # each file once: a tied head and the embedding share one
    cache = manifest.cache
    result = {"folder": folder, "variant": model.variant, "num_parameters": manifest.data["num_parameters"],
              "load_seconds": loaded, "rss_after_load": after_load, "weight_bytes": weight_bytes,
              "decode_bytes": decode_bytes(manifest, model.variant), "settings": {}}
    rng = np.random.default_rng(0)
    vocab = manifest.tokens["vocab_size"]
    for batch, beams in settings:
        rows = [rng.integers(5, vocab, size=24).tolist() for _ in range(batch)]
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, output_scores=False)
        _reset_peak()
        model.generate(input_ids=rows, **dict(options, max_new_tokens=2, min_new_tokens=2))  # warm-up
        began = time.perf_counter()
        output = model.generate(input_ids=rows, **options)
        seconds = time.perf_counter() - began
        steps = output.metrics["step_seconds"]
        tokens = sum(len(s) for s in output.sequences)
        layers = cache["num_layers"] * (2 if manifest.kind == "seq2seq" else 1)  # mT0: self + cross caches
        kv_bytes = 2 * layers * batch * beams * cache["num_heads"] * cache["head_dim"] * (24 + new_tokens) * 4
        result["settings"][f"{batch}x{beams}"] = {
            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "first_token_seconds": output.metrics["prefill_seconds"],
            "step_p50_ms": float(np.percentile(steps, 50) * 1e3) if steps else None,
            # decode alone (prefill excluded), as llama-bench's tg figure: returned rows x steps / step time
            "decode_tokens_per_second": batch * len(steps) / sum(steps) if steps else None,
            "kv_cache_bytes": kv_bytes, "peak_rss_bytes": _status().get("VmHWM")}
    result["peak"] = _status()
    return result


def render(report: dict) -> str:
    """Markdown tables of what the report holds: export cost, the runtime, llama.cpp."""
    gb = lambda value: f"{value / 1e9:.2f}" if value else "–"  # noqa: E731
    machine = report.get("machine", {})
    lines = [f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; onnxruntime "
             f"{report.get('versions', {}).get('onnxruntime')}. Random-weight presets."]
    costs = report.get("export_cost", {})
    if costs:
        lines += ["", "| export | parameters | options | wall time | peak RSS GB | folder GB | validation |",
                  "|---|---|---|---|---|---|---|"]
        for entry in costs.values():
            lines.append(f"| {entry['preset']} | {entry.get('num_parameters', 0) / 1e9:.2f}B | "
                         f"{' '.join(entry['options']) or '(defaults)'} | {entry['seconds'] / 60:.1f} min | "
                         f"{gb(entry['peak_rss_bytes'])} | {gb(entry.get('size_bytes'))} | "
                         f"{entry.get('validation', entry['status'])} |")
    runs = report.get("runs", {})
    bandwidth = report.get("read_bandwidth_bytes_per_second")
    if runs:
        lines += ["", f"Read bandwidth (numpy sums over 1 GB, every core): {gb(bandwidth)} GB/s; the bound is "
                  "bandwidth / the bytes a decode step reads (the decoder and head files; mT0's encoder is not "
                  "read per token).", "",
                  "| model | variant | weights GB | load s | RssAnon / RssFile after load GB | peak RSS GB | setting | "
                  "tokens/s | decode tokens/s | bound tokens/s | TTFT s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, run in runs.items():
            if "settings" not in run:
                lines.append(f"| {name} | failed: {run.get('error', '')[:120]} |")
                continue
            load = run["rss_after_load"]
            for setting, values in run["settings"].items():
                step_bytes = run.get("decode_bytes") or run["weight_bytes"]
                bound = bandwidth / step_bytes if bandwidth and setting == "1x1" else None
                lines.append(f"| {name} | {run['variant']} | {gb(run['weight_bytes'])} | {run['load_seconds']:.1f} | "
                             f"{gb(load['RssAnon'])} / {gb(load['RssFile'])} | "
                             f"{gb(values.get('peak_rss_bytes') or run['peak']['VmHWM'])} | "
                             f"{setting} | {values['tokens_per_second']:.2f} | "
                             f"{values.get('decode_tokens_per_second') or 0:.2f} | "
                             f"{f'{bound:.2f}' if bound else '–'} | {values['first_token_seconds']:.2f} |")
    for name, result in report.get("llama_cpp", {}).items():
        lines += ["", f"llama.cpp on {name} (llama-bench, prompt 24, 32 generated):", "",
                  "| type | size GB | decode tokens/s | prompt tokens/s | peak RSS GB |", "|---|---|---|---|---|"]
        for kind, values in result.items():
            if isinstance(values, dict) and values.get("status") == "ok":
                lines.append(f"| {kind} | {gb(values['size_bytes'])} | {values['decode_tokens_per_second']:.2f} | "
                             f"{values['prompt_tokens_per_second'] or 0:.2f} | {gb(values['peak_rss_bytes'])} |")
    return "\n".join(lines) + "\n"


def llama_cpp(checkpoint: str, root: str, types: list[str], work: str, threads: int) -> dict:
    """Convert, quantize and run llama.cpp on the checkpoint; decode tokens/s and peak RSS per type."""
    binary = lambda name: os.path.join(root, "build", "bin", name)  # noqa: E731
    for name in ("llama-quantize", "llama-bench"):
        if not os.path.isfile(binary(name)):
            raise SystemExit(f"{binary(name)} is missing: build llama.cpp first (cmake -B build && cmake --build "
                             f"build --target llama-quantize llama-bench) and pass its folder with --llama-cpp")
    os.makedirs(work, exist_ok=True)
    f16 = os.path.join(work, "model-f16.gguf")
    results: dict = {"checkpoint": checkpoint, "llama_cpp": root}
    targets = {kind: os.path.join(work, f"model-{kind}.gguf") for kind in types}
    if not os.path.isfile(f16) and not all(os.path.isfile(t) for t in targets.values()):
        print(f"== llama.cpp: converting {checkpoint}", file=sys.stderr, flush=True)
        completed = subprocess.run([sys.executable, "-c", llama.CONVERT_DRIVER, root, checkpoint, "--outtype", "f16",
                                    "--outfile", f16 + ".partial"], capture_output=True, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"convert_hf_to_gguf failed: {completed.stderr[-800:]}")
        os.rename(f16 + ".partial", f16)
    for kind, target in targets.items():
        if not os.path.isfile(target):
            print(f"== llama.cpp: quantizing to {kind} (--pure)", file=sys.stderr, flush=True)
            completed = subprocess.run([binary("llama-quantize"), "--pure", f16, target + ".partial", kind.upper(),
                                        str(threads)], capture_output=True, text=True)
            if completed.returncode != 0:
                raise SystemExit(f"llama-quantize failed: {completed.stderr[-800:]}")
            os.rename(target + ".partial", target)
    for kind, target in targets.items():
        print(f"== llama.cpp: llama-bench {kind}", file=sys.stderr, flush=True)
        timer = ["/usr/bin/time", "-f", "MAXRSS_KB %M"] if os.path.isfile("/usr/bin/time") else []
        completed = subprocess.run([*timer, binary("llama-bench"), "-m", target, "-p", "24", "-n", "32", "-t",
                                    str(threads), "-r", "3", "-o", "json"], capture_output=True, text=True)
        peak = [int(line.split()[1]) * 1024 for line in completed.stderr.splitlines() if line.startswith("MAXRSS_KB")]
        if completed.returncode != 0:
            results[kind] = {"status": "failed", "error": completed.stderr[-600:]}
            continue
        rows = json.loads(completed.stdout)
        decode = next(r for r in rows if r.get("n_gen", 0) > 0)
        prompt = next((r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
        results[kind] = {"status": "ok", "size_bytes": os.path.getsize(target),
                         "decode_tokens_per_second": decode["avg_ts"],
                         "prompt_tokens_per_second": prompt["avg_ts"] if prompt else None,
                         "peak_rss_bytes": peak[0] if peak else None, "threads": threads,
                         "build": decode.get("build_commit")}
        print(f"   {kind}: {results[kind]}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmtf-onnx bench large", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("export-cost", help="wall time and peak RSS of xmtf-onnx export per preset")
    cost.add_argument("--presets", required=True, help="comma-separated presets")
    cost.add_argument("--work-dir", default="bench-results/large")
    cost.add_argument("--keep", action="store_true", help="keep the exported folders (default: delete each)")
    cost.add_argument("export_args", nargs=argparse.REMAINDER,
                      help="options passed to xmtf-onnx export after --, e.g. -- --quantize int4-weight --no-fp32")
    run = commands.add_parser("run", help="the runtime on exported folders, one process each")
    run.add_argument("--exports", required=True, help="comma-separated exported folders")
    run.add_argument("--settings", default="1x1,8x4", help="BATCHxBEAMS list (default 1x1,8x4)")
    run.add_argument("--new-tokens", type=int, default=32)
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this folder in this process
    rival = commands.add_parser("llama-cpp", help="llama.cpp on the same checkpoint (BLOOM; B=1 decode)")
    rival.add_argument("--checkpoint", required=True, help="the checkpoint folder (e.g. bench's preset checkpoint)")
    rival.add_argument("--llama-cpp", required=True, help="a llama.cpp source folder with build/bin built")
    rival.add_argument("--types", default="q4_0,q8_0")
    rival.add_argument("--work-dir", default="bench-results/llama-cpp")
    rival.add_argument("--threads", type=int, default=os.cpu_count())
    for command in (cost, run, rival):
        command.add_argument("--out", default="bench-results", help="where large.json goes")
        command.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, "large.json")
    report = {}
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as handle:
            report = json.load(handle)
    from .suite import machine, versions

    report.update(machine=machine(), versions=versions())
    if args.command == "export-cost":
        extra = [a for a in args.export_args if a != "--"]
        results = export_cost(args.presets.split(","), args.work_dir, extra, not args.no_progress, args.keep)
        report.setdefault("export_cost", {}).update({f"{r['preset']} {' '.join(extra)}".strip(): r for r in results})
    elif args.command == "llama-cpp":
        name = os.path.basename(os.path.normpath(args.checkpoint))
        report.setdefault("llama_cpp", {})[name] = llama_cpp(args.checkpoint, args.llama_cpp, args.types.split(","),
                                                             os.path.join(args.work_dir, name), args.threads)
    else:
        settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]
        if args.one:
            print(json.dumps(run_one(args.one, settings, args.new_tokens, args.threads)))
            return 0
        report["read_bandwidth_bytes_per_second"] = read_bandwidth()
        for folder in args.exports.split(","):
            print(f"== run {folder} ({args.settings})", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "xmtf_onnx.benchmarks.large", "run", "--exports", folder, "--one", folder,
                       "--settings", args.settings, "--new-tokens", str(args.new_tokens), "--out", args.out]
            if args.threads:
                command += ["--threads", str(args.threads)]
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"folder": folder, "status": "failed",
                                                          "error": completed.stderr.strip()[-600:]}
            report.setdefault("runs", {})[os.path.basename(os.path.normpath(folder))] = result
            print(f"   {json.dumps(result)[:600]}", file=sys.stderr, flush=True)
    with open(report_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(args.out, "large.md"), "w", encoding="utf-8") as handle:
        handle.write(render(report))
    print(report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
