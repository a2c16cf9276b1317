"""llama.cpp as a rival: GGUF conversion of the bench's checkpoint and a B=1 greedy backend over llama-cpp-python.

llama.cpp runs both families (mT5 through its T5 encoder-decoder support, BLOOM natively) and is the strongest
B=1 CPU rival; it has no beam search and no batched generate in its Python API, so it takes part in the 1x1
settings only. Conversion uses the `convert_hf_to_gguf.py` of a llama.cpp source folder (`--llama-cpp DIR`, e.g.
the `vendor/llama.cpp` of the llama-cpp-python sdist); quantization (`--pure`: every matrix, head and embedding
included, in the one type, as our int4/int8 variants) and generation use the llama-cpp-python package
(`pip install "xmtf-onnx[llama]"`, built from source with the machine's native flags) or, with
LLAMA_CPP_LIB_PATH, a libllama.so built in that folder.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

# The preset checkpoints' word-level tokenizer has neither a known pre-tokenizer nor BPE merges, which llama.cpp's
# BPE vocabulary requires: the driver names the default pre-tokenizer and adds one merge (the speed measured does
# not depend on the tokenizer; prompts are token ids).
CONVERT_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py"] + sys.argv[2:]
import convert_hf_to_gguf
import gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
add_to_gguf = gguf.SpecialVocab.add_to_gguf
def with_a_merge(self, writer, *args, **kwargs):
    self.merges = self.merges or ["t 0"]
    return add_to_gguf(self, writer, *args, **kwargs)
gguf.SpecialVocab.add_to_gguf = with_a_merge
convert_hf_to_gguf.main()
"""
# llama.cpp's file types (llama.h, enum llama_ftype) for the types the suite converts to.
FILE_TYPES = {"f32": 0, "q8_0": 7, "q4_0": 2}


def _sentencepiece_view(checkpoint: str, work: str) -> str:
    """llama.cpp converts a T5 vocabulary from spiece.model only; a checkpoint with only tokenizer.json (the bench's
    presets: a word-level vocabulary) is given a folder of links to its files plus a SentencePiece model holding the
    same pieces at the same ids (the speed does not depend on the tokenizer; prompts are token ids)."""
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    from sentencepiece import sentencepiece_model_pb2

    with open(os.path.join(checkpoint, "tokenizer.json"), encoding="utf-8") as handle:
        tokenizer = json.load(handle)
    vocabulary = tokenizer["model"]["vocab"]
    pieces = dict(vocabulary) if isinstance(vocabulary, dict) else {piece: i for i, (piece, _) in enumerate(vocabulary)}
    special = {token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])}
    view = os.path.join(work, "sentencepiece-view")
    shutil.rmtree(view, ignore_errors=True)
    os.makedirs(view)
    for name in os.listdir(checkpoint):
        os.symlink(os.path.abspath(os.path.join(checkpoint, name)), os.path.join(view, name))
    model = sentencepiece_model_pb2.ModelProto()
    model.trainer_spec.model_type = 1  # unigram, as mT5's
    ordered = sorted({**pieces, **special}.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        raise ValueError(f"{checkpoint}/tokenizer.json does not number its pieces 0..n-1; give the checkpoint a "
                         "spiece.model")
    for piece, _ in ordered:
        entry = model.pieces.add()
        entry.piece, entry.score = piece, 0.0
        entry.type = 2 if piece == "<unk>" else (3 if piece in special or piece.startswith("<") else 1)
    model.trainer_spec.unk_id = pieces.get("<unk>", special.get("<unk>", 2))
    with open(os.path.join(view, "spiece.model"), "wb") as handle:
        handle.write(model.SerializeToString())
    return view


def convert(checkpoint: str, source_tree: str, target: str, outtype: str = "f32") -> str:
    """checkpoint -> GGUF (f32 or f16) with llama.cpp's own converter; cached at target."""
    if os.path.isfile(target):
        return target
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as handle:
        seq2seq = json.load(handle).get("is_encoder_decoder", False)
    if seq2seq and not any(os.path.isfile(os.path.join(checkpoint, n)) for n in ("spiece.model", "tokenizer.model")):
        checkpoint = _sentencepiece_view(checkpoint, os.path.dirname(target))
    script = os.path.join(source_tree, "convert_hf_to_gguf.py")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"{script} is missing: pass a llama.cpp source folder with --llama-cpp (for example "
                                "the vendor/llama.cpp folder of the llama-cpp-python sdist)")
    completed = subprocess.run([sys.executable, "-c", CONVERT_DRIVER, source_tree, checkpoint, "--outtype", outtype,
                                "--outfile", target + ".partial"], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed: {completed.stderr.strip()[-600:]}")
    os.rename(target + ".partial", target)
    return target


def quantize(source: str, target: str, kind: str, threads: int) -> str:
    """source GGUF -> kind (q8_0, q4_0), every tensor of the one type (llama-quantize --pure); cached at target."""
    if os.path.isfile(target):
        return target
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = FILE_TYPES[kind], True, threads
    status = llama_cpp.llama_model_quantize(source.encode(), (target + ".partial").encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed with status {status}")
    os.rename(target + ".partial", target)
    return target


def prepare(checkpoint: str, source_tree: str, work: str, kinds: list[str], threads: int) -> dict[str, str]:
    """GGUF files of the checkpoint per kind (f32, q8_0, q4_0), converted once and cached under work."""
    os.makedirs(work, exist_ok=True)
    base = convert(checkpoint, source_tree, os.path.join(work, "model-f32.gguf"))
    return {kind: base if kind == "f32" else quantize(base, os.path.join(work, f"model-{kind}.gguf"), kind, threads)
            for kind in kinds}


class LlamaCppBackend:
    """Greedy, one sequence: llama.cpp's encoder (mT5) or prompt prefill (BLOOM), then one decode per token,
    argmax over the logits with the eos ids masked (min = max new tokens, as every backend here)."""

    def __init__(self, spec: dict):
        try:
            import llama_cpp
        except ImportError as e:
            raise RuntimeError("llama.cpp needs llama-cpp-python: pip install 'xmtf-onnx[llama]' (it builds "
                               f"llama.cpp from source), or LLAMA_CPP_LIB_PATH for a libllama.so you built ({e})") from e
        self.lib = llama_cpp
        self.quiet = llama_cpp.llama_log_callback(lambda *args: None)  # kept alive: llama.cpp calls it later
        llama_cpp.llama_log_set(self.quiet, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(spec["rival_dir"].encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec['rival_dir']}")
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = context.n_batch = context.n_ubatch = 1024
        context.n_threads = context.n_threads_batch = spec["threads"]
        self.context = llama_cpp.llama_init_from_model(self.model, context)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(vocab)
        self.eos = [t for t in range(min(self.vocab_size, 8)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        self.encoder = llama_cpp.llama_model_has_encoder(self.model)
        self.start = llama_cpp.llama_model_decoder_start_token(self.model)
        self.size = os.path.getsize(spec["rival_dir"])

    def supports(self, batch: int, beams: int, sample: bool = False) -> bool:
        return batch == 1 and beams == 1 and not sample

    def _run_batch(self, tokens: list[int], encode: bool = False) -> None:
        array = (self.lib.llama_token * len(tokens))(*tokens)
        status = (self.lib.llama_encode if encode else self.lib.llama_decode)(
            self.context, self.lib.llama_batch_get_one(array, len(tokens)))
        if status != 0:
            raise RuntimeError(f"llama.cpp {'encode' if encode else 'decode'} failed with status {status}")

    def _next(self) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.context, -1), shape=(self.vocab_size,))
        logits[self.eos] = -np.inf  # the logits are llama.cpp's own buffer, rewritten by the next decode
        return int(np.argmax(logits))

    def run(self, rows, beams: int, new_tokens: int, sample: bool = False):
        if not self.supports(len(rows), beams, sample):
            raise ValueError("llama.cpp runs batch 1, greedy, here")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)
        began = time.perf_counter()
        if self.encoder:
            self._run_batch(rows[0] + self.eos[:1], encode=True)  # the seq2seq prompt ends with </s>, as CT2's
            self._run_batch([self.start])
        else:
            self._run_batch(rows[0])
        token = self._next()
        first = time.perf_counter() - began
        steps = []
        for _ in range(new_tokens - 1):
            step = time.perf_counter()
            self._run_batch([token])
            token = self._next()
            steps.append(time.perf_counter() - step)
        return new_tokens, first, steps, time.perf_counter() - began
