"""BLOOMZ / BLOOM: one decoder graph with a KV cache; ALiBi positions come from the attention mask, so
left-padded batches need no position ids."""

from __future__ import annotations

import copy
import gc

import numpy as np
import torch
from onnx import TensorProto

from ..graph import Graph, WeightPlan
from ..weights import WeightSource, layer_renamer
from . import Family, register_family
from .common import (Store, cache_fields, cache_names, compare, decoder_forms, embedding, head_logits,
                     output_graphs, run_decoder)


def _norm(graph: Graph, x: str, name: str, w: dict, eps: float, skip: str | None = None) -> tuple[str, str]:
    """LayerNorm of x (+ skip: the residual addition, fused): (normalized, the sum)."""
    return graph.norm(x, graph.weight(f"{name}.weight", w[f"{name}.weight"]), eps,
                      beta=graph.weight(f"{name}.bias", w[f"{name}.bias"]), skip=skip)


def _alibi_slopes(num_heads: int) -> np.ndarray:
    """transformers' own slopes: the bias of position 1 for every head."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)  # [heads, 1, 2]
    return alibi[:, 0, 1].numpy().astype(np.float32)


def build(config, w: WeightSource, store: Store, plan: WeightPlan) -> tuple[list, dict]:
    """The graphs from a config and a weight source, each weight written as it is read (see graph.py)."""
    heads = config.n_head
    hidden_size = config.hidden_size
    head_dim = hidden_size // heads  # BLOOM's own definition; recorded in the manifest for the runtime
    eps = config.layer_norm_epsilon
    tied = config.tie_word_embeddings
    graph = Graph("bloom_decoder", store.file("decoder.onnx.data"), plan)
    prefix = "transformer"

    input_ids = graph.input("input_ids", TensorProto.INT64, ["batch", "new"])
    attention_mask = graph.input("attention_mask", TensorProto.INT64, ["batch", "total"])
    beam_idx = graph.input("beam_idx", TensorProto.INT64, ["batch"])
    past = [(graph.input(f"past_key.{i}", TensorProto.FLOAT, ["past_batch", heads, "past", head_dim]),
             graph.input(f"past_value.{i}", TensorProto.FLOAT, ["past_batch", heads, "past", head_dim]))
            for i in range(config.n_layer)]
    table = f"{prefix}.word_embeddings"
    x = embedding(graph, input_ids, w, f"{table}.weight", graph.weights, table, tied)  # [batch, new, hidden]
    x, _ = _norm(graph, x, f"{prefix}.word_embeddings_layernorm", w, eps)

    zero, one = graph.const(0), graph.const(1)
    # ALiBi: bias = slope[head] * (number of real tokens before the key); [batch, heads, 1, total]
    mask_float = graph.op("Cast", [attention_mask], to=TensorProto.FLOAT)
    key_positions = graph.op("Mul", [graph.op("Sub", [graph.op("CumSum", [mask_float, one]),
                                                      graph.const(np.float32(1), np.float32)]), mask_float])
    slopes = graph.weight("alibi_slopes", _alibi_slopes(heads).reshape(1, heads, 1, 1))
    alibi = graph.op("Mul", [slopes, graph.op("Unsqueeze", [key_positions, graph.const([1, 2])])])
    # allowed[b, 1, q, k] = key is real and not in the future of the query
    # The mask spans the past and this step's tokens: the cache's own length axis is a capacity in the
    # shared-buffer form (Graph.cached_attention)
    new_length = graph.shape_dim(input_ids, 1)
    total_length = graph.shape_dim(attention_mask, 1)
    past_length = graph.op("Sub", [total_length, new_length])
    query = graph.op("Range", [graph.op("Squeeze", [past_length]), graph.op("Squeeze", [total_length]),
                               graph.op("Squeeze", [one])])
    key = graph.op("Range", [graph.op("Squeeze", [zero]), graph.op("Squeeze", [total_length]),
                             graph.op("Squeeze", [one])])
    causal = graph.op("LessOrEqual", [graph.op("Unsqueeze", [key, zero]), graph.op("Unsqueeze", [query, one])])
    real_key = graph.op("Cast", [graph.op("Unsqueeze", [attention_mask, graph.const([1, 2])])], to=TensorProto.BOOL)
    allowed = graph.op("And", [causal, real_key])  # [batch, 1, q, k]

    bias = graph.masked_bias(allowed, alibi)  # [batch, heads, q, k], shared by every layer
    lengths = graph.cache_lengths(attention_mask)

    presents = []
    pending = None  # the last sublayer's output, added to the residual stream x by the next norm
    for i in range(config.n_layer):
        p = f"{prefix}.h.{i}"
        normed, x = _norm(graph, x, f"{p}.input_layernorm", w, eps, skip=pending)
        residual = normed if config.apply_residual_connection_post_layernorm else x
        # The fused QKV rows are interleaved per head (head, q/k/v, d): regroup them as (q/k/v, head, d).
        qkv_weight = w[f"{p}.self_attention.query_key_value.weight"].reshape(heads, 3, head_dim, hidden_size)
        qkv_weight = qkv_weight.transpose(1, 0, 2, 3).reshape(3 * hidden_size, hidden_size)
        qkv_bias = w[f"{p}.self_attention.query_key_value.bias"].reshape(heads, 3, head_dim)
        qkv_bias = qkv_bias.transpose(1, 0, 2).reshape(3 * hidden_size)
        qkv = graph.matmul(normed, f"{p}.self_attention.query_key_value", qkv_weight, qkv_bias)
        q, k, v = graph.op("Split", [qkv, graph.const([hidden_size] * 3)], outputs=3, axis=-1)
        context, k, v = graph.cached_attention(q, k, v, past[i], beam_idx, bias, lengths, heads, head_dim,
                                               1.0 / np.sqrt(head_dim), packed=qkv)
        presents.append((k, v))
        attention = graph.matmul(context, f"{p}.self_attention.dense", w[f"{p}.self_attention.dense.weight"],
                                 w[f"{p}.self_attention.dense.bias"])
        normed, x = _norm(graph, attention, f"{p}.post_attention_layernorm", w, eps, skip=residual)
        residual = normed if config.apply_residual_connection_post_layernorm else x
        up = graph.matmul(normed, f"{p}.mlp.dense_h_to_4h", w[f"{p}.mlp.dense_h_to_4h.weight"],
                          w[f"{p}.mlp.dense_h_to_4h.bias"])
        pending = graph.matmul(graph.gelu_tanh(up), f"{p}.mlp.dense_4h_to_h", w[f"{p}.mlp.dense_4h_to_h.weight"],
                               w[f"{p}.mlp.dense_4h_to_h.bias"])
        x = residual
    x = graph.op("Add", [pending, x])

    last = graph.op("Gather", [x, graph.op("Sub", [graph.op("Squeeze", [new_length]), one])], axis=1)  # [b, h]
    hidden, _ = _norm(graph, last, f"{prefix}.ln_f", w, eps)
    if tied:  # the head reads the embedding where the decoder stores it: the tied weight is kept once
        outputs = output_graphs(hidden_size, w, f"{table}.weight", graph.weights, table, plan, tied=True)
    else:
        outputs = output_graphs(hidden_size, w, "lm_head.weight", store.file("head.onnx.data"), "lm_head.weight", plan)
    graph.output(hidden, "hidden", TensorProto.FLOAT, ["batch", hidden_size])
    for i, (k, v) in enumerate(presents):
        graph.output(k, f"present_key.{i}", TensorProto.FLOAT, ["batch", heads, "total", head_dim])
        graph.output(v, f"present_value.{i}", TensorProto.FLOAT, ["batch", heads, "total", head_dim])
    fields = {
        "cache": cache_fields(config.n_layer, heads, head_dim),
        "hidden_size": hidden_size,
        # transformers has stored BLOOM's cache as fused 3-D [batch*heads, d, seq] / [batch*heads, seq, d]
        # and, later, 4-D; this graph's layout is the one in "cache", whatever transformers does.
        "source_cache_layout_note": "graph cache is 4-D [batch, heads, sequence, head_dim] for keys and values",
    }
    return [(graph, "decoder.onnx", "decoder"), *outputs], fields


def validate(config, load_model, sessions: dict, fields: dict, rng: np.random.Generator) -> dict[str, dict]:
    """Logits and presents against PyTorch on a left-padded batch, first step and with past.

    load_model() builds the transformers model; it is dropped before the graphs run (memory holds one copy)."""
    batch, prompt = 3, 6
    input_ids = rng.integers(0, config.vocab_size, size=(batch, prompt + 1), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    attention_mask[2, :4] = 0
    model = load_model()
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                          use_cache=True)
    del model
    gc.collect()  # transformers modules hold reference cycles: free the weights before the graphs run
    heads, head_dim = fields["cache"]["num_heads"], fields["cache"]["head_dim"]
    empty = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    presents = cache_names(fields)
    real = attention_mask.astype(bool)[:, None, :, None]  # padded positions hold no meaningful cache
    diffs: dict[str, dict] = {}
    for form in decoder_forms(sessions):  # the portable graph and its shared-buffer form, each against PyTorch
        feeds = {"input_ids": input_ids[:, :prompt], "attention_mask": attention_mask[:, :prompt],
                 "beam_idx": np.arange(batch, dtype=np.int64)}
        out = run_decoder(sessions, form, feeds, {name: empty for name in presents}, presents)
        logits = head_logits(sessions, out["hidden"], diffs, "screen.no_past")
        diffs[f"{form}.logits.no_past"] = compare(logits, reference.logits[:, prompt - 1].numpy())
        feeds = {"input_ids": input_ids[:, prompt:], "attention_mask": attention_mask,
                 "beam_idx": np.arange(batch, dtype=np.int64)}
        out = run_decoder(sessions, form, feeds, {name: out[present] for name, present in presents.items()},
                          presents)
        logits = head_logits(sessions, out["hidden"], diffs, "screen.with_past")
        diffs[f"{form}.logits.with_past"] = compare(logits, reference.logits[:, prompt].numpy())
        for i in range(config.n_layer):
            key, value = _layer_cache(reference.past_key_values, i, batch, heads, head_dim)
            diffs[f"{form}.present_key.{i}"] = compare(out[f"present_key.{i}"], key, np.broadcast_to(real, key.shape))
            diffs[f"{form}.present_value.{i}"] = compare(out[f"present_value.{i}"], value,
                                                         np.broadcast_to(real, value.shape))
    return diffs


def _layer_cache(cache, i: int, batch: int, heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' cache for layer i as [batch, heads, seq, d], whichever layout this version uses."""
    if hasattr(cache, "layers"):
        key, value = cache.layers[i].keys.numpy(), cache.layers[i].values.numpy()
    else:
        key, value = cache[i][0].numpy(), cache[i][1].numpy()
    if key.ndim == 3:  # old fused layout: key [batch*heads, d, seq], value [batch*heads, seq, d]
        key = key.reshape(batch, heads, head_dim, -1).transpose(0, 1, 3, 2)
        value = value.reshape(batch, heads, -1, head_dim)
    return key, value


def parameters(config) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Every weight of BloomForCausalLM: shape and transformers' initial distribution (normal with
    initializer_range, zero biases, unit norms), for the random presets and for checking a checkpoint."""
    h, normal = config.hidden_size, ("normal", config.initializer_range)
    found = {"transformer.word_embeddings.weight": ((config.vocab_size, h), normal)}

    def norm(name: str) -> None:
        found[f"{name}.weight"], found[f"{name}.bias"] = ((h,), ("ones",)), ((h,), ("zeros",))

    def linear(name: str, out_features: int, in_features: int) -> None:
        found[f"{name}.weight"] = ((out_features, in_features), normal)
        found[f"{name}.bias"] = ((out_features,), ("zeros",))

    norm("transformer.word_embeddings_layernorm")
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        norm(f"{p}.input_layernorm")
        linear(f"{p}.self_attention.query_key_value", 3 * h, h)
        linear(f"{p}.self_attention.dense", h, h)
        norm(f"{p}.post_attention_layernorm")
        linear(f"{p}.mlp.dense_h_to_4h", 4 * h, h)
        linear(f"{p}.mlp.dense_4h_to_h", h, 4 * h)
    norm("transformer.ln_f")
    if not config.tie_word_embeddings:
        found["lm_head.weight"] = ((config.vocab_size, h), normal)
    return found


def truncate(config, select, vocab_rows: int):
    """A config with the layers select(n_layer) picks and the first vocab_rows rows of the vocabulary, and the
    name map from it to the full checkpoint."""
    layers = select(config.n_layer)
    small = copy.deepcopy(config)
    small.n_layer, small.vocab_size = len(layers), min(config.vocab_size, vocab_rows)
    rename = layer_renamer({r"^transformer\.h\.(\d+)\.": dict(enumerate(layers))})
    return small, rename, ("transformer.word_embeddings.weight", "lm_head.weight"), {"decoder": layers}


register_family(Family(name="bloom", kind="decoder", model_types=("bloom",), build=build, validate=validate,
                       parameters=parameters, truncate=truncate))
