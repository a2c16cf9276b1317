"""xmtf-onnx bench: the runtime against PyTorch and the rivals on the same token ids, one process per backend.

Prepares, per model: a checkpoint folder (a real-architecture preset with random weights and a synthetic
word-level tokenizer so CTranslate2 can convert it), the xmtf export (every quantized variant it holds is
benchmarked), CTranslate2 conversions and Optimum's export when those are installed. Then it runs every
backend on the settings grid with the generated length forced (min = max new tokens), and writes
results.json, results.md and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

# The main job of a fresh machine: minutes and a few GB. Optimum's export alone takes minutes and GBs, and the
# full grid's fp32 rivals are what --quick leaves to the full run.
QUICK = {"models": ["mt0-small"], "settings": ["1x1", "1x4", "8x1"], "repeats": 2,
         "backends": ["xmtf", "pytorch", "ctranslate2"], "quantize": "int8"}
# both int8 forms: int8-dynamic is the faster one for beams and batches, int8-weight at batch 1
FULL = {"models": ["mt0-small", "mt0-base", "bloomz-560m"], "settings": ["1x1", "1x4", "8x1", "8x4"], "repeats": 3,
        "quantize": "int8,int8-weight"}
ALL_BACKENDS = ["xmtf", "pytorch", "pytorch-int8", "ctranslate2", "optimum", "llama-cpp"]
LLAMA_CPP_TYPES = ("f32", "q8_0", "q4_0")
SHARED_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "prompts.jsonl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xmtf-onnx bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="examples:\n  xmtf-onnx bench --quick\n  xmtf-onnx bench --models bloomz-560m --settings 1x1,8x4\n"
               "  xmtf-onnx bench --backends xmtf,pytorch --new-tokens 16 --repeats 1\n"
               "  xmtf-onnx bench large --help     # export cost and the large presets (mt0-xl ... bloomz-7b1)\n"
               "  xmtf-onnx bench profile --help   # where a decode step's time goes on this machine")
    parser.add_argument("--quick", action="store_true",
                        help=f"small grid (about 4 minutes and 3 GB of disk on 2 cores): {QUICK['models']} x "
                             f"{QUICK['settings']}, {QUICK['repeats']} rounds, xmtf fp32 and int8 against PyTorch fp32 "
                             "and CTranslate2 int8")
    parser.add_argument("--models", help=f"comma-separated presets (NAME or preset:NAME) or checkpoint folders "
                                         f"(default {','.join(FULL['models'])})")
    parser.add_argument("--settings", help="comma-separated BATCHxBEAMS, or BATCHxsample for sampling (top-k 50, "
                                           "temperature 1, seeded; not llama.cpp) (default 1x1,1x4,8x1,8x4)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated subset of {','.join(ALL_BACKENDS)} (llama-cpp runs when --llama-cpp "
                             "is given)")
    parser.add_argument("--llama-cpp", metavar="DIR",
                        help="a llama.cpp source folder (its convert_hf_to_gguf.py converts the checkpoint; e.g. "
                             "vendor/llama.cpp of the llama-cpp-python sdist): adds llama.cpp f32, q8_0 and q4_0 "
                             "(--pure) as B=1 greedy rivals; needs llama-cpp-python (pip install 'xmtf-onnx[llama]')")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (forced)")
    parser.add_argument("--prompt-tokens", default="24",
                        help="prompt length in tokens, or 'real' for lengths of ../shared/data prompts")
    parser.add_argument("--repeats", type=int,
                        help="rounds: every backend runs each setting once per round (warm-up first), rounds "
                             "interleaved A B C A B C; tables give the median and the best round")
    parser.add_argument("--threads", type=int,
                        help="threads for every backend (default: the rivals one per core; xmtf its machine's thread "
                             "policy, as load() gives a user: see xmtf-onnx tune)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quantize", default=None,
                        help="comma-separated xmtf variants to add to each export ('' for none; default int8 with "
                             "--quick, else int8,int8-weight: the fastest int8 for beams and batches, and at batch 1)")
    parser.add_argument("--restrict", default="", metavar="ROWS",
                        help="comma-separated row counts (e.g. 16000,32000): add restricted-vocabulary variants of "
                             "fp32 and each quantized variant, keeping the tokens of ../shared/data prompts by "
                             "frequency (then the lowest ids) up to ROWS; the table gives the rows and coverage")
    parser.add_argument("--no-fp32", action="store_true",
                        help="quantized only, for the large presets: xmtf exports without the fp32 variant and the "
                             "rivals convert only their int8 form (CTranslate2 loading the checkpoint in fp16)")
    parser.add_argument("--work-dir", default="bench-results/work", help="checkpoints, exports and conversions")
    parser.add_argument("--out", default="bench-results", help="where results.json/.md and plots go")
    parser.add_argument("--fidelity-prompts", type=int, default=16,
                        help="prompts for the fidelity report of each quantized variant against fp32 (0: skip)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.backends_given = args.backends is not None
    base = QUICK if args.quick else FULL
    args.models = args.models.split(",") if args.models else base["models"]
    args.settings = args.settings.split(",") if args.settings else base["settings"]
    args.repeats = args.repeats or base["repeats"]
    args.quantize = base["quantize"] if args.quantize is None else args.quantize
    backends = args.backends.split(",") if args.backends else base.get("backends", ALL_BACKENDS)
    args.backends = [b for b in backends if b and (b != "llama-cpp" or args.llama_cpp)]
    args.quantized_rivals_only = args.no_fp32 or (args.quick and not args.backends_given)
    unknown = set(args.backends) - set(ALL_BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}; choose from {ALL_BACKENDS}")
    args.models = [_model_entry(entry, parser) for entry in args.models]
    for setting in args.settings:
        try:
            parse_setting(setting)
        except ValueError:
            parser.error(f"setting {setting!r} is not BATCHxBEAMS with positive integers (e.g. 8x4), or BATCHxsample "
                         "(e.g. 8xsample)")
    return args


def parse_setting(setting: str) -> tuple[int, int, bool]:
    """'8x4' -> (8, 4, False): batch 8, 4 beams; '8xsample' -> (8, 1, True): batch 8, sampled. ValueError else."""
    batch, _, kind = setting.partition("x")
    batch = int(batch)
    beams, sample = (1, True) if kind == "sample" else (int(kind), False)
    if batch < 1 or beams < 1:
        raise ValueError(setting)
    return batch, beams, sample


def _model_entry(entry: str, parser: argparse.ArgumentParser) -> str:
    """A --models entry -> a checkpoint folder, or preset:NAME. preset:NAME is always the preset; a bare preset name
    that is also a folder here (an export of that name, say) is the preset when the folder holds no checkpoint."""
    from xmtf_onnx.export.presets import PRESETS

    name = entry[len("preset:"):] if entry.startswith("preset:") else entry
    export = os.path.isfile(os.path.join(entry, "xmtf_manifest.json"))
    if entry.startswith("preset:") or not os.path.isdir(entry) or (export and name in PRESETS):
        if name not in PRESETS:
            parser.error(f"{entry!r} is neither a checkpoint folder nor a preset; presets: {', '.join(PRESETS)}")
        if os.path.isdir(entry) and not entry.startswith("preset:"):
            _log(f"note: the folder {entry} is an xmtf export, not a checkpoint: benchmarking the preset {name}")
        return f"preset:{name}"
    if export:
        parser.error(f"{entry} is an xmtf export: the suite converts one checkpoint for every backend, so pass the "
                     "checkpoint folder it came from or preset:NAME; `xmtf-onnx bench profile "
                     f"{entry}` measures an export on its own")
    return entry


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, file=sys.stderr)
    except ImportError:
        return iterable


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_checkpoint(preset: str, folder: str, dtype: str = "float32") -> str:
    """The preset with random weights in `dtype`, saved with a word-level tokenizer covering every id (t0, t1, ...)."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    from tokenizers import Tokenizer, models
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from xmtf_onnx.export.presets import preset_source
    from xmtf_onnx.export.weights import write_checkpoint

    config, weights = preset_source(preset)
    specials = ({0: "<pad>", 1: "</s>", 2: "<unk>"} if config.model_type == "mt5"
                else {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>"})
    vocab = {specials.get(i, f"t{i}"): i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>",
                                   pad_token="<pad>", **({"bos_token": "<s>"} if "<s>" in vocab else {}))
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    # Streamed tensor by tensor (no torch model): the large presets fit.
    write_checkpoint(weights, weights.names(), partial, dtype)
    # Converters (llama.cpp's, CTranslate2's) pick the model class from config.json's architectures.
    config.architectures = ["MT5ForConditionalGeneration" if config.model_type == "mt5" else "BloomForCausalLM"]
    config.save_pretrained(partial)
    GenerationConfig.from_model_config(config).save_pretrained(partial)
    fast.save_pretrained(partial)
    os.rename(partial, folder)
    return folder


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' warnings off while a rival's own code calls it (they are the rival's to fix, not the user's)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def prepare_rivals(checkpoint: str, work: str, backends: list[str], is_seq2seq: bool,
                   quantized_only: bool = False, llama_cpp: str | None = None,
                   threads: int = 1) -> dict[str, str | Exception]:
    """Conversions the rivals need; an exception is kept and reported as that rival's failure."""
    prepared: dict[str, str | Exception] = {}
    if "llama-cpp" in backends and llama_cpp:
        from . import llama

        kinds = [k for k in LLAMA_CPP_TYPES if not (quantized_only and k == "f32")]
        try:
            prepared.update({f"llamacpp-{k}": path for k, path in
                             llama.prepare(checkpoint, llama_cpp, os.path.join(work, "gguf"), kinds, threads).items()})
        except Exception as e:
            prepared.update({f"llamacpp-{k}": e for k in kinds})
    if "ctranslate2" in backends:
        for quantization in ("int8",) if quantized_only else ("float32", "int8"):
            target = os.path.join(work, f"ct2-{quantization}")
            try:
                if not os.path.isdir(target):
                    import ctranslate2.converters

                    # fp16 loading halves the converter's memory (it loads the whole model); int8 is the same
                    converter = ctranslate2.converters.TransformersConverter(checkpoint,
                                                                             load_as_float16=quantized_only)
                    with _transformers_quiet():  # its from_pretrained(torch_dtype=...) warns of a deprecation
                        converter.convert(target, quantization=quantization)
                prepared[f"ct2-{quantization}"] = target
            except Exception as e:
                prepared[f"ct2-{quantization}"] = e
    if "optimum" in backends and not quantized_only:
        target = os.path.join(work, "optimum")
        try:
            if not os.path.isdir(target):
                from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM

                auto = ORTModelForSeq2SeqLM if is_seq2seq else ORTModelForCausalLM
                auto.from_pretrained(checkpoint, export=True, use_cache=True).save_pretrained(target)
            prepared["optimum-fp32"] = target
            prepared["optimum-int8"] = _optimum_int8(target)
        except Exception as e:
            prepared.setdefault("optimum-fp32", e)
            prepared["optimum-int8"] = e
    return prepared


def _optimum_int8(source: str) -> str:
    """Optimum's own dynamic int8 (AVX512-VNNI, per channel) of every graph in its export."""
    target = source + "-int8"
    if os.path.isdir(target):
        return target
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    partial = target + ".partial"
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    for name in sorted(os.listdir(source)):
        if name.endswith(".onnx"):
            ORTQuantizer.from_pretrained(source, file_name=name).quantize(config, save_dir=partial)
    for name in os.listdir(source):  # configs and tokenizer files beside the graphs
        if not name.endswith((".onnx", ".onnx_data")) and not os.path.exists(os.path.join(partial, name)):
            with open(os.path.join(source, name), "rb") as src, open(os.path.join(partial, name), "wb") as dst:
                dst.write(src.read())
    for name in os.listdir(partial):  # keep Optimum's file names so from_pretrained finds them
        if name.endswith("_quantized.onnx"):
            os.rename(os.path.join(partial, name), os.path.join(partial, name.replace("_quantized.onnx", ".onnx")))
    os.rename(partial, target)
    return target


def prompt_rows(vocab: int, batch: int, spec: str, seed: int) -> list[list[int]]:
    """Token ids (ids 4.. so no special token) of `spec` tokens, or real prompt lengths from ../shared/data."""
    rng = np.random.default_rng(seed)
    if spec == "real":
        lengths = _real_prompt_lengths()
        chosen = [lengths[i % len(lengths)] for i in range(seed, seed + batch)]
    else:
        chosen = [int(spec)] * batch
    return [rng.integers(4, vocab, size=n).tolist() for n in chosen]


def _real_prompt_lengths() -> list[int]:
    """Token counts of the shared multilingual prompts; synthetic 24 tokens when the data is absent."""
    return [len(ids) for ids in shared_prompt_ids()] or [24]


def shared_prompt_ids(limit: int | None = None, vocab: int | None = None) -> list[list[int]]:
    """The shared multilingual prompts under a byte-level BPE trained on them for this run (no real mT5/BLOOM
    tokenizer is available offline), ids shifted past the special tokens and kept below `vocab`.
    Empty when ../shared/data is absent."""
    if not os.path.isfile(SHARED_PROMPTS):
        _log("../shared/data/prompts.jsonl not found: using synthetic prompts")
        return []
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    with open(SHARED_PROMPTS, encoding="utf-8") as handle:
        texts = [json.loads(line)["prompt"] for line in handle][:limit]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, show_progress=False))
    span = (vocab - 4) if vocab else None  # ids 0-3 are special in both families: never prompt them
    return [[4 + (i % span if span else i) for i in e.ids] for e in tokenizer.encode_batch(texts) if e.ids]


def add_restricted(export_dir: str, sizes: list[int], vocab: int, work: str) -> None:
    """Restricted variants of every full variant, one per size: the shared prompts' tokens (under the run's BPE, as
    the prompts are) by frequency, then the lowest remaining ids, up to `size` rows; special tokens always kept."""
    from xmtf_onnx.export.restrict import restrict
    from xmtf_onnx.runtime.manifest import read_manifest, write_manifest

    manifest = read_manifest(export_dir)
    corpus = [t for row in shared_prompt_ids(vocab=vocab) for t in row]  # ids below the tokenizer's vocabulary
    width = int(manifest.tokens["vocab_size"])  # the head's rows: wider than the tokenizer's vocabulary
    counts = np.bincount(np.array(corpus, np.int64), minlength=width) if corpus else np.zeros(width, np.int64)
    ranked = np.lexsort((np.arange(width), -counts))  # most frequent first, then ascending ids
    for size in sizes:
        ids_path = os.path.join(work, f"restrict-{size}.txt")
        with open(ids_path, "w", encoding="utf-8") as handle:
            handle.write(" ".join(map(str, sorted(ranked[:size].tolist()))))
        for base in [v for v, entry in manifest.variants.items() if not entry.get("restricted")]:
            name = f"{base}-{size // 1000}k" if size % 1000 == 0 else f"{base}-{size}"
            if name not in manifest.variants:
                _log(f"   restricting {base} to {size} rows ({name})")
                record = restrict(export_dir, name, token_ids=ids_path, variant=base)
                covered = float(counts[sorted(ranked[:size].tolist())].sum() / counts.sum()) if corpus else None
                record["coverage"] = {"corpus": "../shared/data/prompts.jsonl under the run's BPE" if corpus
                                      else "none (../shared/data absent)", "corpus_share": covered}
                manifest = read_manifest(export_dir)
                manifest.data["variants"][name]["restricted"]["coverage"] = record["coverage"]
                write_manifest(export_dir, manifest.data)


def fidelity_rows(vocab: int, count: int) -> tuple[list[list[int]], str]:
    """`count` prompts for the fidelity report: the shared prompts (at most 64 tokens each) or synthetic ids."""
    rows = [row[:64] for row in shared_prompt_ids(count, vocab)]
    if rows:
        return rows, "../shared/data/prompts.jsonl, BPE trained for this run"
    rng = np.random.default_rng(1234)
    return [rng.integers(4, vocab, size=24).tolist() for _ in range(count)], "synthetic 24-token ids"


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return info


def export_fingerprint(modes: list[str], fp32: bool) -> dict:
    """What a cached export in the work dir must match to be reused: the variants asked for, and the exporter's
    own source (a changed default, such as a block size, changes what the same options write)."""
    import hashlib

    import xmtf_onnx.export as package
    from xmtf_onnx.export.quantize import resolve_mode

    digest = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(package.__file__))
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            digest.update(os.path.relpath(os.path.join(folder, name), root).encode())
            with open(os.path.join(folder, name), "rb") as handle:
                digest.update(handle.read())
    return {"variants": sorted({resolve_mode(m) for m in modes} | ({"fp32"} if fp32 else set())),
            "exporter_source": digest.hexdigest()}


def versions() -> dict:
    found = {}
    for name in ("xmtf-onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers", "optimum", "optimum-onnx",
                 "ctranslate2", "numpy", "tokenizers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def jobs_for(model_name: str, export_dir: str, checkpoint: str, rivals: dict, backends: list[str]) -> list[dict]:
    from xmtf_onnx.runtime.manifest import read_manifest

    jobs = []
    if "xmtf" in backends:
        for variant in read_manifest(export_dir).variants:
            jobs.append({"name": f"xmtf {variant}", "backend": "xmtf", "variant": variant})
    if "pytorch" in backends:
        jobs.append({"name": "pytorch fp32", "backend": "pytorch", "variant": "fp32"})
    if "pytorch-int8" in backends:
        jobs.append({"name": "pytorch int8-dynamic", "backend": "pytorch", "variant": "int8-dynamic"})
    for key, target in rivals.items():
        backend, variant = key.split("-", 1)
        backend = {"ct2": "ctranslate2", "llamacpp": "llama-cpp"}.get(backend, backend)
        jobs.append({"name": f"{backend} {variant}", "backend": backend, "variant": variant,
                     "rival_dir": target if isinstance(target, str) else None,
                     "prepare_error": None if isinstance(target, str) else f"{type(target).__name__}: {target}"})
    for job in jobs:
        job.update(model=model_name, export_dir=export_dir, checkpoint=checkpoint)
    return jobs


def run_job(job: dict, settings: dict, args: argparse.Namespace, repeats: int | None = None) -> dict:
    if job.get("prepare_error"):
        return {"name": job["name"], "status": "failed", "error": job["prepare_error"], "settings": {}}
    spec = dict(job, settings=settings, new_tokens=args.new_tokens, repeats=repeats or args.repeats, warmup=1,
                threads=args.threads or os.cpu_count(), xmtf_threads=args.threads, provider=args.provider)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        completed = subprocess.run([sys.executable, "-m", "xmtf_onnx.benchmarks.worker", handle.name],
                                   capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (completed.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"name": job["name"], "status": "failed", "settings": {},
                "error": f"worker exited {completed.returncode}: {tail[0][:400]}"}
    return json.loads(lines[-1])


def run_interleaved(jobs: list[dict], settings: dict, args: argparse.Namespace, progress: bool) -> list[dict]:
    """Every job once per round, rounds repeated (A B C A B C ...): a machine whose speed drifts (a noisy VM
    neighbour, thermal limits) then slows every backend alike instead of whichever ran during the slow minute.
    Each round is a fresh process with its own warm-up; runs are pooled per setting, peak RSS is the highest."""
    merged: dict[str, dict] = {}
    for round_index in range(args.repeats):
        for job in _progress(jobs, progress, f"round {round_index + 1}/{args.repeats}"):
            result = run_job(job, settings, args, repeats=1)
            previous = merged.setdefault(job["name"], result)
            if previous is result:
                continue
            if result["status"] != "ok" and previous["status"] == "ok":
                merged[job["name"]] = result  # a failure in any round is reported
            elif result["status"] == "ok" and previous["status"] == "ok":
                for key, entry in result["settings"].items():
                    previous["settings"].setdefault(key, {"runs": []})["runs"] += entry["runs"]
                if result["peak_rss_bytes"] > previous["peak_rss_bytes"]:  # the split of the round with the peak
                    previous.update({k: result[k] for k in result if k.endswith("_bytes") and k != "size_bytes"})
                previous["load_seconds"] = min(previous["load_seconds"], result["load_seconds"])
    return list(merged.values())


def summarize(result: dict) -> None:
    """Add tokens/s (median and best run), first-token and per-token p50/p90 to every setting of a result."""
    for entry in result.get("settings", {}).values():
        runs = entry["runs"]
        totals = [r["total_seconds"] for r in runs]
        steps = [s for r in runs for s in r["step_seconds"]]
        firsts = [r["first_token_seconds"] for r in runs if r["first_token_seconds"] is not None]
        entry["tokens"] = runs[0]["tokens"]
        entry["tokens_per_second"] = runs[0]["tokens"] / float(np.median(totals))
        entry["tokens_per_second_best"] = runs[0]["tokens"] / float(np.min(totals))
        entry["total_seconds_median"] = float(np.median(totals))
        entry["first_token_seconds"] = float(np.median(firsts)) if firsts else None
        entry["step_p50_ms"] = float(np.percentile(steps, 50) * 1e3) if steps else None
        entry["step_p90_ms"] = float(np.percentile(steps, 90) * 1e3) if steps else None
        screened = sum(r.get("screened_rows", 0) for r in runs)
        if screened:  # xmtf greedy: the share of rows whose token the greedy screen certified
            entry["screened_share"] = screened / (screened + sum(r.get("full_rows", 0) for r in runs))


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "large":  # export cost and the runtime on the large presets: bench large --help
        from .large import main as large_main

        return large_main(argv[1:])
    if argv and argv[0] == "profile":  # where a decode step's time goes on this machine: bench profile --help
        from .profile import main as profile_main

        return profile_main(argv[1:])
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    report = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "xmtf-onnx bench " + " ".join(argv or []),
              "machine": machine(), "versions": versions(), "provider": args.provider,
              "threads": args.threads or os.cpu_count(), "xmtf_threads": args.threads,
              "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
              "checkpoint_dtype": "bfloat16" if args.quick else "float32 (bfloat16 from 2B parameters)",
              "warmup": 1, "models": {}}
    progress = not args.no_progress
    from .large import read_bandwidth

    report["read_bandwidth_bytes_per_second"] = read_bandwidth(threads=report["threads"])
    _log(f"memory read bandwidth ({report['threads']} threads): "
         f"{report['read_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s")
    if args.provider == "cpu":  # measured here once, not in the first worker's timed load
        from xmtf_onnx.runtime.tuning import policy_and_record

        policy, record = policy_and_record(progress=_log)
        report["thread_policy"] = {"name": policy.name, "summary": policy.summary,
                                   **{k: v for k, v in record.items() if k != "file"}}  # no home paths in a report
        _log(f"xmtf thread policy: {policy.name} ({record['source']}"
             + (f"; ms per synthetic step: {record['ms_per_step']}" if "ms_per_step" in record else "") + ")")
        from xmtf_onnx.runtime.runners import slow_denormals

        report["slow_denormals"] = slow_denormals()  # beam search's log-softmax takes wide rows through numpy
    for model in args.models:
        # preset:NAME, or a checkpoint folder (the tests use tiny ones)
        preset = model[len("preset:"):] if model.startswith("preset:") else None
        model_name = preset or os.path.basename(os.path.normpath(model))
        work = os.path.join(args.work_dir, model_name)
        os.makedirs(work, exist_ok=True)
        _log(f"== {model_name}: preparing checkpoint, export and rival conversions (cached in {work})")
        # fp32 as mT0 is published; bf16 (half the disk) for --quick and from 2B parameters. PyTorch fp32 then
        # converts at load, and its peak RSS includes that.
        from xmtf_onnx.export.families import family_for_model_type, parameter_count
        from xmtf_onnx.export.presets import preset_config

        if preset is None:
            checkpoint = model
        else:
            config = preset_config(preset)
            large = parameter_count(family_for_model_type(config.model_type), config) >= 2e9
            dtype = "bfloat16" if args.quick or large else "float32"
            checkpoint = prepare_checkpoint(preset, os.path.join(work, f"checkpoint-{dtype}"), dtype)
        export_dir = os.path.join(work, "xmtf")
        from xmtf_onnx.runtime.errors import ManifestError
        from xmtf_onnx.runtime.manifest import read_manifest

        modes = [m for m in args.quantize.split(",") if m]
        wanted = export_fingerprint(modes, not args.no_fp32)
        record = os.path.join(work, "xmtf-export.json")
        try:
            read_manifest(export_dir)
            with open(record) as handle:
                cached = json.load(handle)
        except (ManifestError, OSError, ValueError):  # none yet, or cached by another xmtf-onnx version
            cached = None
        stale = cached != wanted
        if stale and os.path.isdir(export_dir):
            _log("   re-exporting: the cached export was made with other --quantize / --no-fp32 options or by "
                 "another version of the exporter")
        if stale:
            from xmtf_onnx.export import export

            export(checkpoint, export_dir, progress=progress, quantize=modes, force=True, fp32=not args.no_fp32)
            with open(record, "w") as handle:
                json.dump(wanted, handle)

        manifest = read_manifest(export_dir)
        vocab = manifest.data["tokenizer"]["vocab_size"] if manifest.data.get("tokenizer") else manifest.tokens["vocab_size"]
        if args.restrict:
            add_restricted(export_dir, [int(r) for r in args.restrict.split(",") if r], vocab, work)
            manifest = read_manifest(export_dir)
        rivals = prepare_rivals(checkpoint, work, args.backends, manifest.kind == "seq2seq",
                                args.quantized_rivals_only, args.llama_cpp, report["threads"])
        settings = {}
        for index, setting in enumerate(args.settings):
            batch, beams, sample = parse_setting(setting)
            settings[setting] = {"batch": batch, "beams": beams, "sample": sample,
                                 "rows": prompt_rows(vocab, batch, args.prompt_tokens, seed=index)}
        results = run_interleaved(jobs_for(model_name, export_dir, checkpoint, rivals, args.backends), settings,
                                  args, progress)
        for result in results:
            summarize(result)
            if result["status"] != "ok":
                _log(f"   {result['name']}: FAILED {result.get('error')}")
        from .large import decode_bytes

        report["models"][model_name] = {
            "kind": manifest.kind, "num_parameters": manifest.data["num_parameters"],
            "decode_bytes": {variant: decode_bytes(manifest, variant) for variant in manifest.variants},
            "restricted": {variant: {k: entry["restricted"][k] for k in ("base", "rows", "kept_share", "coverage")}
                           for variant, entry in manifest.variants.items() if entry.get("restricted")},
            "settings": {k: {"batch": v["batch"], "beams": v["beams"], "sample": v["sample"],
                             "prompt_lengths": [len(r) for r in v["rows"]]} for k, v in settings.items()},
            "backends": results,
        }
        if "xmtf" in args.backends and args.fidelity_prompts > 0 and len(manifest.variants) > 1:
            from .fidelity import NOTE, measure

            _log(f"   fidelity of {', '.join(v for v in manifest.variants if v != 'fp32')} against fp32")
            rows, source = fidelity_rows(vocab, args.fidelity_prompts)
            report["models"][model_name]["fidelity"] = {
                "prompts": source, "new_tokens": args.new_tokens, "note": NOTE,
                "variants": measure(export_dir, rows, args.new_tokens, args.threads, args.provider)}
    from .report import write_reports

    paths = write_reports(report, args.out)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
