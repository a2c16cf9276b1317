"""One class per backend, all doing the same work: generate exactly N new tokens for a batch of token ids, by
beam search (1 beam: greedy) or by sampling (SAMPLING: top-k 50 at temperature 1, seeded).

Each backend is run in its own process by worker.py, so that peak RSS belongs to it alone.
`run` returns (tokens returned, seconds to first token or None, per-step seconds).
"""

from __future__ import annotations

import os
import time

# a sampled setting (BATCHxsample): transformers' sampling defaults, top-k 50 at temperature 1, seeded, in every backend
SAMPLING = {"top_k": 50, "temperature": 1.0, "seed": 0}


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


class XmtfBackend:
    def __init__(self, spec: dict):
        from xmtf_onnx.runtime import load

        self.model = load(spec["export_dir"], provider=spec["provider"], threads=spec.get("xmtf_threads"),
                          variant=spec["variant"], verify=False)
        entry = self.model.manifest.variant(spec["variant"])
        # Files shared by several graphs (mT0's embedding) count once.
        self.size = sum({item["path"]: item["bytes"] for f in entry["files"].values()
                         for item in [f, *f["data"]]}.values())

    def run(self, rows, beams: int, new_tokens: int, sample: bool = False):
        began = time.perf_counter()
        out = self.model.generate(input_ids=rows, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  num_beams=beams, output_scores=False, **(dict(SAMPLING, do_sample=True) if sample
                                                                          else {}))
        total = time.perf_counter() - began
        steps = out.metrics["step_seconds"]
        first = total - sum(steps)  # encode/prefill + selection of the first token
        self.notes = {"screened_rows": out.metrics["screened_rows"], "full_rows": out.metrics["full_rows"]}
        return sum(len(s) for s in out.sequences), first, steps, total


class TorchBackend:
    def __init__(self, spec: dict):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        torch.set_num_threads(spec["threads"])
        config = AutoConfig.from_pretrained(spec["checkpoint"])
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        self.model = auto.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()
        self.device = "cuda" if spec["provider"] == "cuda" else "cpu"
        if spec["variant"] == "int8-dynamic":
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model.to(self.device)
        self.size = folder_bytes(os.path.join(spec["checkpoint"], "model.safetensors"))
        self.decoder_only = not config.is_encoder_decoder
        self.pad = config.pad_token_id or 0

    def run(self, rows, beams: int, new_tokens: int, sample: bool = False):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        length = max(map(len, rows))
        ids = torch.full((len(rows), length), self.pad)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if self.decoder_only else slice(0, len(row))
            ids[i, span], mask[i, span] = torch.tensor(row), 1
        sampling = {"do_sample": False}
        if sample:
            torch.manual_seed(SAMPLING["seed"])
            sampling = {"do_sample": True, "top_k": SAMPLING["top_k"], "temperature": SAMPLING["temperature"]}
        began = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams,
                                      logits_processor=LogitsProcessorList([Stamp()]), **sampling)
        total = time.perf_counter() - began
        generated = out.shape[1] - (length if self.decoder_only else 1)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return generated * len(rows), stamps[0] - began if stamps else None, steps, total


class OptimumBackend:
    def __init__(self, spec: dict):
        from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM
        from transformers import AutoConfig

        import onnxruntime as ort

        config = AutoConfig.from_pretrained(spec["checkpoint"])
        auto = ORTModelForSeq2SeqLM if config.is_encoder_decoder else ORTModelForCausalLM
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        provider = "CUDAExecutionProvider" if spec["provider"] == "cuda" else "CPUExecutionProvider"
        self.model = auto.from_pretrained(spec["rival_dir"], session_options=options, provider=provider,
                                          use_cache=True)
        self.size = folder_bytes(spec["rival_dir"])
        self.inner = TorchBackend.__new__(TorchBackend)
        self.inner.model, self.inner.device = self.model, "cpu"
        self.inner.decoder_only, self.inner.pad = not config.is_encoder_decoder, config.pad_token_id or 0

    def run(self, rows, beams: int, new_tokens: int, sample: bool = False):
        return TorchBackend.run(self.inner, rows, beams, new_tokens, sample)


class CTranslate2Backend:
    def __init__(self, spec: dict):
        import ctranslate2
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec["checkpoint"])
        device = "cuda" if spec["provider"] == "cuda" else "cpu"
        self.seq2seq = config.is_encoder_decoder
        cls = ctranslate2.Translator if self.seq2seq else ctranslate2.Generator
        self.model = cls(spec["rival_dir"], device=device, compute_type=spec["variant"], intra_threads=spec["threads"],
                         inter_threads=1)
        self.size = folder_bytes(spec["rival_dir"])
        self.eos = "</s>"

    def run(self, rows, beams: int, new_tokens: int, sample: bool = False):
        tokens = [[f"t{i}" for i in row] + ([self.eos] if self.seq2seq else []) for row in rows]
        first = None
        sampling = {"sampling_topk": SAMPLING["top_k"], "sampling_temperature": SAMPLING["temperature"]} \
            if sample else {}
        if sample:
            import ctranslate2

            ctranslate2.set_random_seed(SAMPLING["seed"])
        began = time.perf_counter()
        if self.seq2seq:
            results = self.model.translate_batch(tokens, beam_size=beams, max_decoding_length=new_tokens,
                                                 min_decoding_length=new_tokens, **sampling)
            generated = sum(len(r.hypotheses[0]) for r in results)
        else:
            results = self.model.generate_batch(tokens, beam_size=beams, max_length=new_tokens,
                                                min_length=new_tokens, include_prompt_in_result=False, **sampling)
            generated = sum(len(r.sequences_ids[0]) for r in results)
        total = time.perf_counter() - began
        if len(rows) == 1 and beams == 1:  # time to first token, from the streaming API
            began = time.perf_counter()
            if self.seq2seq:
                iterator = self.model.generate_tokens(tokens[0], max_decoding_length=new_tokens,
                                                      min_decoding_length=new_tokens, **sampling)
            else:
                iterator = self.model.generate_tokens(tokens[0], max_length=new_tokens, min_length=new_tokens,
                                                      **sampling)
            next(iter(iterator))
            first = time.perf_counter() - began
            for _ in iterator:
                pass
        return generated, first, [], total


def _llama_cpp(spec: dict):
    from .llama import LlamaCppBackend

    return LlamaCppBackend(spec)


BACKENDS = {"xmtf": XmtfBackend, "pytorch": TorchBackend, "optimum": OptimumBackend, "ctranslate2": CTranslate2Backend,
            "llama-cpp": _llama_cpp}
