"""The `xmtf-onnx` command: export, quantize, restrict, generate, serve, bench, tune."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from .batching import BATCHING, DEFAULT_PREFILL_TOKENS
from .errors import XmtfError

FAILED = 1  # the command was well formed but could not do its job: a typed error (model, input, file) says why
USAGE = 2  # the command line itself is wrong (argparse's own code for unknown options and missing arguments)

EPILOG = """exit status: 0 done; 1 it could not be done (the message says why and what to do: a bad model folder,
  input or file, a missing extra); 2 the command line is wrong (unknown option, missing argument); 130 interrupted.

examples:
  xmtf-onnx export preset:mt0-small exported/mt0-small          # real architecture, random weights, offline
  xmtf-onnx export bigscience/mt0-small exported/mt0-small      # from the Hub (needs network)
  xmtf-onnx export ./my-checkpoint exported/mine --quantize int8
  xmtf-onnx export preset:bloomz-7b1 exported/bloomz-7b1 --quantize int4-weight --no-fp32   # 7B, ~2 GB of RAM
  xmtf-onnx generate exported/mt0-small "Translate to English: Je t'aime."
  xmtf-onnx generate exported/mt0-small --ids 250 3 17 --max-new-tokens 8
  xmtf-onnx bench --quick                                        # the benchmark suite, offline
  xmtf-onnx tune                                                 # this machine's thread policy (measured once)
"""


def _missing(command: str, extras: str, error: ImportError) -> int:
    """A command whose optional packages are not installed: say which extra brings them."""
    print(f"error: {command} needs optional packages: pip install 'xmtf-onnx[{extras}]' ({error})", file=sys.stderr)
    return FAILED


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The options bench and loadtest parse themselves (main() put a `--` before them)."""
    return args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args


def _export(args: argparse.Namespace) -> int:
    try:
        from xmtf_onnx.export import export
    except ImportError as e:
        return _missing("export", "export", e)
    output = export(args.model, args.output, force=args.force, tolerance=args.tolerance,
                    validate=not args.no_validate, progress=not args.quiet, quantize=args.quantize or (),
                    fp32=not args.no_fp32, validation=args.validation, block_size=args.block_size,
                    keep_fp32=_patterns(args.keep_fp32))
    print(f"{output}: {_variants(output)}")
    return 0


def _variants(folder: str) -> str:
    """What load(folder, variant=...) accepts, and which one load(folder) takes."""
    from .manifest import read_manifest

    manifest = read_manifest(folder)
    aliases = {v: a for a, v in manifest.data.get("aliases", {}).items()}
    names = [f"{n} (also loads as {aliases[n]})" if n in aliases else n for n in manifest.variants]
    return f"variants {', '.join(names)}; load() takes {manifest.default_variant} by default"


def _quantize(args: argparse.Namespace) -> int:
    try:
        from xmtf_onnx.export.quantize import quantize_folder
    except ImportError as e:
        return _missing("quantize", "export", e)
    if args.name and len(args.mode) > 1:
        print("error: --name names one variant; give one --mode with it", file=sys.stderr)
        return USAGE
    for mode in args.mode:
        name = quantize_folder(args.folder, mode, force=args.force, block_size=args.block_size,
                               keep_fp32=_patterns(args.keep_fp32), name=args.name)
        print(f"{args.folder}: added variant {name}; {_variants(args.folder)}")
    return 0


def _restrict(args: argparse.Namespace) -> int:
    try:
        from xmtf_onnx.export.restrict import restrict
    except ImportError as e:
        return _missing("restrict", "export", e)
    record = restrict(args.folder, args.name, texts=args.tokens_from or (), token_ids=args.token_ids,
                      min_count=args.min_count, held_out_every=args.held_out_every, variant=args.variant,
                      force=args.force)
    coverage = record["coverage"]
    print(f"{args.folder}: added variant {args.name} ({record['base']} with {record['rows']} of "
          f"{record['vocab_size']} output rows, {record['kept_share'] * 100:.1f}%)")
    if coverage:
        held = coverage["held_out_share"]
        print(f"coverage: {coverage['corpus_share'] * 100:.2f}% of the {coverage['corpus_tokens']} corpus tokens it was "
              "made from" + (f", {held * 100:.2f}% of the {coverage['held_out_tokens']} held-out tokens"
                             if held is not None else ""))
    print(f"load it with load({args.folder!r}, variant={args.name!r}) or --variant {args.name}")
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    try:
        from xmtf_onnx.benchmarks.loadtest import main as loadtest_main
    except ImportError as e:
        return _missing("loadtest", "bench", e)
    return loadtest_main(_forwarded(args))


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from .serve import Limits, Server, build_app
    except ImportError as e:
        return _missing("serve", "serve", e)
    from .manifest import read_manifest

    read_manifest(args.model_dir)  # a wrong folder fails here, before the server starts
    limits = Limits(max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                    max_prefill_tokens=args.max_prefill_tokens, batching=args.batching,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_n=args.max_n,
                    max_beams=args.max_beams, request_timeout=args.request_timeout, drain_seconds=args.drain_seconds)
    api_key = args.api_key or os.environ.get("XMTF_API_KEY")
    if args.ray:
        return _serve_ray(args, limits, api_key)
    server = Server(args.model_dir, args.variant, args.threads, limits, api_key=api_key, name=args.name)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=int(args.drain_seconds))
    return 0


def _serve_ray(args: argparse.Namespace, limits, api_key: str | None) -> int:
    """The same app as Ray Serve replicas on this machine's Ray (started here unless RAY_ADDRESS names one)."""
    import time

    try:
        import ray
        from ray import serve

        from .serve.ray_app import deployment
    except ImportError as e:
        return _missing("--ray", "ray", e)
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(args.model_dir, variant=args.variant, threads=args.threads or 1, num_replicas=args.replicas,
                         limits=limits, api_key=api_key, name=args.name), name="xmtf-onnx", route_prefix="/")
    signal.signal(signal.SIGTERM, _terminated)  # ray.init installed its own, which aborts without shutting down
    print(f"serving {args.model_dir} on http://{args.host}:{args.port} with {args.replicas} Ray Serve replica(s); "
          "Ctrl-C or SIGTERM stops", file=sys.stderr)
    try:
        while True:
            time.sleep(1)
    finally:
        serve.shutdown()
    return 0


def _patterns(text: str | None) -> tuple[str, ...] | None:
    """--keep-fp32: None (not given) means each mode's default."""
    return None if text is None else tuple(p for p in text.split(",") if p)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        return args.prompts
    if args.file:
        with open(args.file, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle if line.strip()]
    if not sys.stdin.isatty():
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return []


def _generate(args: argparse.Namespace) -> int:
    from .model import load

    model = load(args.model_dir, provider=args.provider, threads=args.threads, variant=args.variant)
    options = {k: v for k, v in dict(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences, do_sample=args.do_sample or None,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        length_penalty=args.length_penalty, stop_strings=args.stop or None).items() if v is not None}
    options["output_scores"] = args.jsonl  # only --jsonl prints scores; without them greedy takes the screen
    if args.ids:
        output = model.generate(input_ids=[args.ids], **options)
        _print(output, [args.ids], args.jsonl)
        return 0
    prompts = _read_prompts(args)
    if prompts and not model.has_tokenizer:
        print(f"error: {args.model_dir} has no tokenizer.json (its checkpoint had none): "
              "pass token ids with --ids 5 6 7", file=sys.stderr)
        return FAILED
    if not prompts:
        print("error: no prompt: give PROMPT arguments, --file FILE, text on stdin, or --ids", file=sys.stderr)
        return USAGE
    if len(prompts) == 1 and not args.jsonl and not args.no_stream:
        for piece in model.stream(prompts[0], **options):
            print(piece, end="", flush=True)
        print()
        return 0
    _print(model.generate(prompts, **options), prompts, args.jsonl)
    return 0


def _print(output, inputs: list, jsonl: bool) -> None:
    per_input = len(output.sequences) // len(inputs)
    for index, sequence in enumerate(output.sequences):
        text = output.texts[index] if output.texts is not None else None
        if jsonl:
            print(json.dumps({"input": inputs[index // per_input], "text": text, "ids": sequence,
                              "score": output.scores[index]}, ensure_ascii=False))
        else:
            print(text if text is not None else " ".join(map(str, sequence)))


def _bench(args: argparse.Namespace) -> int:
    try:
        from xmtf_onnx.benchmarks.suite import main as bench_main
    except ImportError as e:
        return _missing("bench", "export,bench", e)
    return bench_main(_forwarded(args))


def _tune(args: argparse.Namespace) -> int:
    from .tuning import ENV_POLICY, MARGIN, POLICIES, policy_and_record

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from .runners import slow_denormals

    policy, record = policy_and_record(refresh=args.refresh, progress=progress)
    denormals = slow_denormals()  # measured in this process, ~15 ms
    if args.json:
        print(json.dumps({"policy": policy.name, **record, "slow_denormals": denormals}, indent=1))
        return 0
    machine = record.get("machine", {})
    print(f"thread policy: {policy.name} ({policy.summary})")
    print(f"  chosen by: {record['source']}" + (f" ({record['setting']})" if "setting" in record else "")
          + (f", {record['measured_at']}" if "measured_at" in record else ""))
    if machine:
        print(f"  machine: {machine.get('cpu')}, {machine.get('cores')} usable cores, onnxruntime "
              f"{machine.get('onnxruntime')}")
    for name, ms in record.get("ms_per_step", {}).items():
        print(f"  {name:15s} {ms:7.2f} ms per synthetic step{'  <- chosen' if name == policy.name else ''}")
    if "ms_per_step" in record:
        print(f"  (the first policy is kept unless another is at least {MARGIN:.0%} faster)")
    for key in ("file", "note"):
        if key in record:
            print(f"  {key}: {record[key]}")
    print(f"  force one: {ENV_POLICY}=" + "|".join(p.name for p in POLICIES) + " (or fixed, never measured)")
    print("denormals: " + ("slow here: beam search's log-softmax takes rows whose exps are denormals through numpy, "
                           "with exp's argument floored" if denormals else "no slower than other floats here"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmtf-onnx", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Export mT0 / BLOOMZ to ONNX and run them with onnxruntime (no torch at run time).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export", help="checkpoint -> self-describing ONNX folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export MODEL to the folder OUTPUT: ONNX graphs with KV cache, tokenizer.json, manifest.\n"
                    "Weights are streamed (read, transformed and written one tensor at a time), so memory does not\n"
                    "grow with the model: mt0-xxl and bloomz-7b1 export in a few GB. The graphs are checked against\n"
                    "PyTorch before the folder appears; a failed export leaves nothing behind.",
        epilog="examples:\n"
               "  xmtf-onnx export preset:mt0-small exported/mt0-small --quantize int8\n"
               "  xmtf-onnx export preset:bloomz-7b1 exported/bloomz-7b1 --quantize int4-weight --no-fp32\n"
               "  xmtf-onnx export ./mt0-xl-checkpoint exported/mt0-xl --quantize int8 --no-fp32 --validation full")
    export.add_argument("model", metavar="MODEL",
                        help="a Hugging Face model id, a local checkpoint folder, or preset:NAME "
                             "(mt0-small, mt0-base, mt0-large, mt0-xl, mt0-xxl, bloomz-560m, bloomz-1b1, "
                             "bloomz-1b7, bloomz-3b, bloomz-7b1: published shapes, random weights)")
    export.add_argument("output", metavar="OUTPUT", help="the folder to create")
    export.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    export.add_argument("--quantize", action="append", metavar="MODE",
                        help="also write a quantized variant (repeatable): int8 (= int8-dynamic, the fastest CPU "
                             "int8 for batches and beams), int8-weight (the fastest int8 at batch 1; CPU and CUDA), "
                             "int4-weight, fp16 (for CUDA)")
    export.add_argument("--tolerance", type=float, default=1e-3,
                        help="max |ONNX - PyTorch| relative to max(1, |PyTorch|) (default 1e-3)")
    export.add_argument("--no-fp32", action="store_true",
                        help="write only the quantized variant(s), straight from the checkpoint: no fp32 graphs are "
                             "written or held (the large models: mt0-xl, mt0-xxl, bloomz-3b, bloomz-7b1)")
    export.add_argument("--block-size", type=int, default=None,
                        help="weights per scale in the weight-only modes (MatMulNBits; a power of two >= 16; default "
                             "128, 32 for mT5's int4-weight)")
    export.add_argument("--keep-fp32", default=None, metavar="PATTERNS",
                        help="comma-separated globs of weight names kept fp32 in quantized variants ('' for none; "
                             "default: mT5's '*DenseReluDense.wo' for int8-dynamic and fp16, none for the weight-only "
                             "modes); the output projection is 'lm_head', the embedding 'shared' or "
                             "'transformer.word_embeddings'")
    export.add_argument("--validation", default="auto", choices=["auto", "full", "reduced", "none"],
                        help="full: the whole model against transformers (needs ~2.2x the fp32 weights in memory); "
                             "reduced: first and last layers of the real weights, full width, against transformers, "
                             "plus every quantized weight read back; auto (default): full below 3B parameters when "
                             "it fits in memory, reduced above")
    export.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch "
                                                                   "(--validation none)")
    export.add_argument("--quiet", action="store_true", help="no progress output")
    export.set_defaults(handler=_export)

    restrict = commands.add_parser(
        "restrict", help="add a variant whose output vocabulary is restricted to the tokens a deployment uses",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Add variant NAME to FOLDER: a base variant whose head and greedy screen keep only the tokens of\n"
                    "your text (or the ids you list), plus every special token. At B=1 the head is most of the bytes a\n"
                    "step reads, so a 32k-row head is several times faster. Exact: greedy equals transformers with every\n"
                    "other token suppressed; scores are log-probabilities renormalised over the kept tokens. Prompts may\n"
                    "use any token.",
        epilog="examples:\n"
               "  xmtf-onnx restrict exported/mt0-small --name int8-fr --variant int8 --tokens-from corpus-fr.txt\n"
               "  xmtf-onnx restrict exported/mt0-small --name ids-32k --token-ids kept-ids.txt")
    restrict.add_argument("folder", metavar="FOLDER")
    restrict.add_argument("--name", required=True, help="the new variant's name")
    sources = restrict.add_mutually_exclusive_group(required=True)
    sources.add_argument("--tokens-from", nargs="+", metavar="TEXTFILE",
                         help="UTF-8 text files, tokenized with the export's tokenizer; the tokens seen are kept")
    sources.add_argument("--token-ids", metavar="FILE", help="a file of token ids separated by whitespace")
    restrict.add_argument("--min-count", type=int, default=1, help="keep tokens seen at least this often (default 1)")
    restrict.add_argument("--held-out-every", type=int, default=10, metavar="N",
                          help="hold out every Nth line to report the coverage of unseen text (default 10; 0: none)")
    restrict.add_argument("--variant", help="the variant to restrict (default: the folder's default)")
    restrict.add_argument("--force", action="store_true", help="replace a variant of that name")
    restrict.set_defaults(handler=_restrict)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server over an exported folder (the serve extra)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve MODEL_DIR: POST /v1/completions (OpenAI's completions API; stream: true for SSE), GET\n"
                    "/v1/models, /health, /ready, /metrics (Prometheus). Requests join a running batch between decode\n"
                    "steps and leave it when done — greedy ones, and sampled ones of one prompt (each with its own\n"
                    "temperature, top-p, top-k, seed and n) — each answered as generate() would answer it alone; beams,\n"
                    "logprobs and repetition penalties run alone between batches, and so does every request of a variant\n"
                    "this machine computes differently alone and batched (the server says so at start). A field a\n"
                    "request leaves out takes the export's generation defaults (greedy), not OpenAI's; temperature 0\n"
                    "is greedy. Binds 127.0.0.1 unless --host says otherwise.",
        epilog="examples:\n"
               "  xmtf-onnx serve exported/mt0-small --port 8000\n"
               "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"prompt\": \"Translate to English: Bonjour.\", \"max_tokens\": 16}'")
    serve.add_argument("model_dir", metavar="MODEL_DIR")
    serve.add_argument("--variant", help="the variant to serve (default: the folder's default)")
    serve.add_argument("--name", help="the model name clients send and /v1/models lists (default: the folder's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: the cores)")
    serve.add_argument("--max-batch-size", type=int, default=16, help="sequences per batch (default 16)")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    serve.add_argument("--max-prefill-tokens", type=int, default=DEFAULT_PREFILL_TOKENS,
                       help="prompt tokens prefilled between two decode steps, at least one request's (default "
                            f"{DEFAULT_PREFILL_TOKENS}): lower keeps the running rows' inter-token time steady under "
                            "a burst, higher admits a burst sooner")
    serve.add_argument("--batching", choices=BATCHING, default="exact",
                       help="exact (default): every answer equals generate() of that request alone; rows whose "
                            "caches have one length share a decoder run, the output projection runs once for all. "
                            "padded: every row in one decoder run, padded (faster: mt0-small 1.4x, bloomz-560m "
                            "1.4x at 16 clients on 2 cores), but a padded row rounds differently and a greedy "
                            "near-tie can flip (6%% of mt0-small answers differed). A variant whose rows are not "
                            "computed alike alone and in a batch on this machine (int8-dynamic; weight-only "
                            "variants on some CPUs: see the note at start) runs requests one at a time under exact; "
                            "padded batches them anyway")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on every endpoint but /health "
                                         "(or set XMTF_API_KEY)")
    serve.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask")
    serve.add_argument("--max-prompt-tokens", type=int, default=1024, help="the longest prompt, in tokens")
    serve.add_argument("--max-n", type=int, default=8, help="the largest n")
    serve.add_argument("--max-beams", type=int, default=8, help="the largest num_beams")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body (413 above)")
    serve.add_argument("--request-timeout", type=float, default=120.0,
                       help="seconds before a request is dropped with 504 (default 120)")
    serve.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve (the ray extra): --replicas copies of the app, each with its own "
                            "model and --threads CPUs; the same deployment scales to a Ray cluster (ray_app.py)")
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray; default 1)")
    serve.add_argument("--drain-seconds", type=float, default=30.0,
                       help="on SIGTERM, how long in-flight requests may finish (default 30)")
    serve.set_defaults(handler=_serve)

    quantize = commands.add_parser("quantize", help="add quantized variants to an exported folder",
                                   description="Add quantized variants to FOLDER, recorded in its manifest.")
    quantize.add_argument("folder", metavar="FOLDER")
    quantize.add_argument("--mode", action="append", required=True,
                          help="int8 (= int8-dynamic, the fastest CPU int8 for batches and beams), int8-weight (the "
                               "fastest int8 at batch 1; CPU and CUDA), int4-weight, fp16 (for CUDA); repeatable")
    quantize.add_argument("--force", action="store_true", help="replace a variant that exists")
    quantize.add_argument("--block-size", type=int, default=None,
                          help="weights per scale for int8-weight / int4-weight (power of two >= 16; default 128, 32 "
                               "for mT5's int4-weight)")
    quantize.add_argument("--keep-fp32", metavar="PATTERNS",
                          help="comma-separated weight-name globs whose MatMuls stay fp32, e.g. "
                               "'lm_head,*DenseReluDense.wo' ('' keeps none)")
    quantize.add_argument("--name", help="variant name (default: the mode's), to keep several of one mode")
    quantize.set_defaults(handler=_quantize)

    generate = commands.add_parser(
        "generate", help="generate text from an exported folder",
        description="Generate from MODEL_DIR. Prompts come from arguments, --file (one per line) or stdin; "
                    "one prompt streams its text as it is produced.")
    generate.add_argument("model_dir", metavar="MODEL_DIR")
    generate.add_argument("prompts", nargs="*", metavar="PROMPT")
    generate.add_argument("--file", help="read prompts from FILE, one per line")
    generate.add_argument("--ids", nargs="+", type=int, help="token ids instead of text (exports without tokenizer)")
    generate.add_argument("--jsonl", action="store_true", help="one JSON object per output: input, text, ids, score")
    generate.add_argument("--no-stream", action="store_true", help="print a single prompt's text at the end")
    generate.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    generate.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's choice)")
    generate.add_argument("--variant", help="a variant of the folder (default: the one its manifest names, fp32 "
                                            "when it has it)")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--min-new-tokens", type=int)
    generate.add_argument("--num-beams", type=int)
    generate.add_argument("--num-return-sequences", type=int)
    generate.add_argument("--length-penalty", type=float)
    generate.add_argument("--do-sample", action="store_true")
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--repetition-penalty", type=float)
    generate.add_argument("--no-repeat-ngram-size", type=int)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.set_defaults(handler=_generate)

    bench = commands.add_parser("bench", help="benchmark the runtime against PyTorch and rivals",
                                description="Run the benchmark suite; `xmtf-onnx bench --help` lists its options.",
                                add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_bench)
    tune = commands.add_parser(
        "tune", help="this machine's thread policy for CPU sessions: measured once, used by every load()",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the thread policy load() uses on this machine, measuring it first if no cached choice "
                    "exists (a few seconds: a synthetic decode step under each policy, interleaved). How threads spin "
                    "between a decode step's sessions decides speed on small models, and the best policy depends on "
                    "the machine (on a 2-core AMD EPYC guest, pools left spinning halved mt0-small's tokens/s). It also "
                    "says whether this CPU computes denormal floats slowly (measured in the process, ~15 ms), in which "
                    "case beam search takes the rows whose exps would be denormals through numpy.",
        epilog="environment: XMTF_ONNX_THREAD_POLICY=auto (default) | fixed | a policy's name; XMTF_ONNX_CACHE="
               "the cache folder (default ~/.cache/xmtf-onnx).\nexample:\n  xmtf-onnx tune --refresh   "
               "# measure again (after moving the cache to another machine kind, or a busy first measurement)")
    tune.add_argument("--refresh", action="store_true", help="measure again and rewrite the cached choice")
    tune.add_argument("--json", action="store_true", help="print the record as JSON")
    tune.set_defaults(handler=_tune)
    loadtest = commands.add_parser("loadtest", help="concurrent clients against a running xmtf-onnx serve",
                                   description="`xmtf-onnx loadtest --help` lists its options.", add_help=False)
    loadtest.add_argument("bench_args", nargs=argparse.REMAINDER)
    loadtest.set_defaults(handler=_loadtest)
    return parser


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["bench"], ["loadtest"]):  # they parse their own options (argparse cannot forward leading flags)
        argv = [argv[0], "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    # SIGTERM (a service manager, `kill`, a CI timeout) unwinds like Ctrl-C, so an export in progress removes its
    # partial folder instead of leaving gigabytes behind.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.handler(args)
    except XmtfError as e:
        print(f"error: {e}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
