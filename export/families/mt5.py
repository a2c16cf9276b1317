"""mT0 / mT5 / T5: an encoder graph that also projects the cross-attention keys and values (once per
request), and a decoder graph with a self-attention KV cache that takes those keys and values as inputs."""

from __future__ import annotations

import copy
import gc

import numpy as np
import torch
from onnx import TensorProto

from ..errors import UnsupportedModelError
from ..graph import Graph, WeightPlan
from ..weights import WeightSource, layer_renamer
from . import Family, register_family
from .common import (Store, cache_fields, cache_names, compare, decoder_forms, embedding, head_logits,
                     output_graphs, run_decoder)

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


def _norm(graph: Graph, x: str, name: str, w: dict, eps: float, skip: str | None = None) -> tuple[str, str]:
    """T5's RMS norm of x (+ skip: the residual addition, fused): (normalized, the sum)."""
    return graph.norm(x, graph.weight(f"{name}.weight", w[f"{name}.weight"]), eps, skip=skip)


def _activation(graph: Graph, x: str, name: str) -> str:
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return graph.gelu_tanh(x)
    if name == "gelu":
        return graph.op("Gelu", [x], domain="com.microsoft")
    return graph.op("Relu", [x])


def _feed_forward(graph: Graph, x: str, prefix: str, w: dict, config) -> str:
    if config.is_gated_act:
        gate = _activation(graph, graph.matmul(x, f"{prefix}.wi_0", w[f"{prefix}.wi_0.weight"]), config.dense_act_fn)
        up = graph.matmul(x, f"{prefix}.wi_1", w[f"{prefix}.wi_1.weight"])
        hidden = graph.op("Mul", [gate, up])
    else:
        hidden = _activation(graph, graph.matmul(x, f"{prefix}.wi", w[f"{prefix}.wi.weight"]), config.dense_act_fn)
    return graph.matmul(hidden, f"{prefix}.wo", w[f"{prefix}.wo.weight"])


def _bucket_table(bias_weight: np.ndarray, relative_positions: np.ndarray, bidirectional: bool, config) -> np.ndarray:
    """Bias per relative position (key - query), computed by transformers' own bucket function."""
    from transformers.models.t5.modeling_t5 import T5Attention

    buckets = T5Attention._relative_position_bucket(
        torch.from_numpy(relative_positions), bidirectional=bidirectional,
        num_buckets=config.relative_attention_num_buckets, max_distance=config.relative_attention_max_distance,
    ).numpy()
    return np.ascontiguousarray(bias_weight[buckets])  # [positions, heads]


def _relative_bias(graph: Graph, query_start: str, query_length: str, key_length: str, table_name: str,
                   table: np.ndarray, offset: int, low: int, high: int, sign: int) -> str:
    """Gather the bias table at clip(sign * (key - query), low, high) + offset; returns [1, heads, q, k]."""
    zero, one = graph.const(0), graph.const(1)
    query_end = graph.op("Add", [query_start, query_length])
    query_positions = graph.op("Range", [graph.op("Squeeze", [query_start]), graph.op("Squeeze", [query_end]),
                                         graph.op("Squeeze", [one])])
    key_positions = graph.op("Range", [graph.op("Squeeze", [zero]), graph.op("Squeeze", [key_length]),
                                       graph.op("Squeeze", [one])])
    relative = graph.op("Sub", [graph.op("Unsqueeze", [key_positions, zero]),
                                graph.op("Unsqueeze", [query_positions, one])])  # [q, k]
    if sign < 0:
        relative = graph.op("Neg", [relative])
    index = graph.op("Add", [graph.op("Clip", [relative, graph.const(low), graph.const(high)]), graph.const(offset)])
    bias = graph.op("Gather", [graph.weight(table_name, table), index], axis=0)  # [q, k, heads]
    return graph.op("Unsqueeze", [graph.op("Transpose", [bias], perm=[2, 0, 1]), zero])


def _projections(graph: Graph, x: str, prefix: str, w: dict, names=("q", "k", "v")) -> list[str]:
    """[batch, seq, model] -> [batch, seq, heads*d] each (heads*d need not be d_model: mt0-small has 6 x 64 = 384
    for 512)."""
    return [graph.matmul(x, f"{prefix}.{n}", w[f"{prefix}.{n}.weight"]) for n in names]


def build(config, w: WeightSource, store: Store, plan: WeightPlan) -> tuple[list, dict]:
    """The graphs from a config and a weight source, each weight written as it is read (see graph.py)."""
    if config.dense_act_fn not in ACTIVATIONS:
        raise UnsupportedModelError(f"feed_forward_proj {config.feed_forward_proj!r} is not supported")
    heads, head_dim, eps = config.num_heads, config.d_kv, config.layer_norm_epsilon
    max_distance = config.relative_attention_max_distance
    shared = store.file("embeddings.bin")
    encoder = Graph("mt5_encoder", store.file("encoder.onnx.data"), plan)
    decoder = Graph("mt5_decoder", store.file("decoder.onnx.data"), plan)

    # Encoder: input_ids [batch, src] -> cross_key.i / cross_value.i [batch, heads, src, d] per decoder layer
    input_ids = encoder.input("input_ids", TensorProto.INT64, ["batch", "source"])
    attention_mask = encoder.input("attention_mask", TensorProto.INT64, ["batch", "source"])
    x = embedding(encoder, input_ids, w, "shared.weight", shared, "shared", config.tie_word_embeddings)  # [b, s, model]
    allowed = encoder.op("Cast", [encoder.op("Unsqueeze", [attention_mask, encoder.const([1, 2])])],
                         to=TensorProto.BOOL)  # [b, 1, 1, s]
    source_length = encoder.shape_dim(input_ids, 1)
    positions = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    table = _bucket_table(w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], positions,
                          True, config)
    bias = _relative_bias(encoder, encoder.const([0]), source_length, source_length, "encoder.relative_bias",
                          table, max_distance, -max_distance, max_distance, 1)
    bias = encoder.masked_bias(allowed, bias)  # [batch, heads, s, s], shared by every layer
    pending = None  # the last sublayer's output, added to the residual stream x by the next norm
    for i in range(config.num_layers):
        p = f"encoder.block.{i}.layer"
        normed, x = _norm(encoder, x, f"{p}.0.layer_norm", w, eps, skip=pending)
        q, k, v = _projections(encoder, normed, f"{p}.0.SelfAttention", w)
        context = encoder.attention(q, k, v, bias, heads, 1.0)  # T5 does not scale its scores
        attention = encoder.matmul(context, f"{p}.0.SelfAttention.o", w[f"{p}.0.SelfAttention.o.weight"])
        normed, x = _norm(encoder, attention, f"{p}.1.layer_norm", w, eps, skip=x)
        pending = _feed_forward(encoder, normed, f"{p}.1.DenseReluDense", w, config)
    hidden, _ = _norm(encoder, x, "encoder.final_layer_norm", w, eps, skip=pending)
    cache_shape = ["batch", heads, "source", head_dim]
    for i in range(config.num_decoder_layers):
        p = f"decoder.block.{i}.layer.1.EncDecAttention"
        key, value = [encoder.split_heads(projection, heads, head_dim)
                      for projection in _projections(encoder, hidden, p, w, ("k", "v"))]
        encoder.output(key, f"cross_key.{i}", TensorProto.FLOAT, cache_shape)
        encoder.output(value, f"cross_value.{i}", TensorProto.FLOAT, cache_shape)

    # Decoder: one or more new tokens against the self-attention cache and the cross keys/values
    input_ids = decoder.input("input_ids", TensorProto.INT64, ["batch", "new"])
    # Which cache positions (past and new) each row attends to: rows decoding together may be at different lengths
    # (continuous batching pads their caches on the left); the relative bias depends on distances only.
    self_mask = decoder.input("attention_mask", TensorProto.INT64, ["batch", "total"])
    encoder_mask = decoder.input("encoder_attention_mask", TensorProto.INT64, ["batch", "source"])
    beam_idx = decoder.input("beam_idx", TensorProto.INT64, ["batch"])
    past = [(decoder.input(f"past_key.{i}", TensorProto.FLOAT, ["past_batch", heads, "past", head_dim]),
             decoder.input(f"past_value.{i}", TensorProto.FLOAT, ["past_batch", heads, "past", head_dim]))
            for i in range(config.num_decoder_layers)]
    cross = [(decoder.input(f"cross_key.{i}", TensorProto.FLOAT, cache_shape),
              decoder.input(f"cross_value.{i}", TensorProto.FLOAT, cache_shape))
             for i in range(config.num_decoder_layers)]
    x = embedding(decoder, input_ids, w, "shared.weight", shared, "shared", config.tie_word_embeddings)
    cross_allowed = decoder.op("Cast", [decoder.op("Unsqueeze", [encoder_mask, decoder.const([1, 2])])],
                               to=TensorProto.BOOL)
    # The mask spans the past and this step's tokens: the cache's own length axis is a capacity in the
    # shared-buffer form (Graph.cached_attention)
    new_length = decoder.shape_dim(input_ids, 1)
    total_length = decoder.shape_dim(self_mask, 1)
    past_length = decoder.op("Sub", [total_length, new_length])
    # The decoder's bias depends on max(query - key, 0) only; beyond max_distance it is constant.
    distances = -np.arange(0, max_distance + 1, dtype=np.int64)
    table = _bucket_table(w["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], distances,
                          False, config)
    self_bias = _relative_bias(decoder, past_length, new_length, total_length, "decoder.relative_bias",
                               table, 0, 0, max_distance, -1)
    causal = decoder.op("GreaterOrEqual", [self_bias_positions(decoder, past_length, new_length, total_length),
                                           decoder.const(0)])  # [q, k]
    causal = decoder.op("And", [causal, decoder.op("Cast", [decoder.op("Unsqueeze", [self_mask, decoder.const([1, 2])])],
                                                   to=TensorProto.BOOL)])  # [batch, 1, q, k]
    self_bias = decoder.masked_bias(causal, self_bias)  # [batch, heads, q, k], shared by every layer
    # [batch, 1, q, source]: MultiHeadAttention wants the query axis spelled out
    cross_bias = decoder.op("Expand", [decoder.masked_bias(cross_allowed, None),
                                       decoder.op("Concat", [decoder.const([1, 1]), new_length, decoder.const([1])],
                                                  axis=0)])
    lengths = decoder.cache_lengths(self_mask)
    presents = []
    pending = None
    for i in range(config.num_decoder_layers):
        p = f"decoder.block.{i}.layer"
        normed, x = _norm(decoder, x, f"{p}.0.layer_norm", w, eps, skip=pending)
        q, k, v = _projections(decoder, normed, f"{p}.0.SelfAttention", w)
        context, k, v = decoder.cached_attention(q, k, v, past[i], beam_idx, self_bias, lengths, heads, head_dim,
                                                 1.0)  # T5 does not scale its scores
        presents.append((k, v))
        attention = decoder.matmul(context, f"{p}.0.SelfAttention.o", w[f"{p}.0.SelfAttention.o.weight"])
        normed, x = _norm(decoder, attention, f"{p}.1.layer_norm", w, eps, skip=x)
        (q,) = _projections(decoder, normed, f"{p}.1.EncDecAttention", w, names=("q",))
        context = decoder.attention(q, cross[i][0], cross[i][1], cross_bias, heads, 1.0)
        attention = decoder.matmul(context, f"{p}.1.EncDecAttention.o", w[f"{p}.1.EncDecAttention.o.weight"])
        normed, x = _norm(decoder, attention, f"{p}.2.layer_norm", w, eps, skip=x)
        pending = _feed_forward(decoder, normed, f"{p}.2.DenseReluDense", w, config)
    x = decoder.op("Add", [x, pending])
    # Only the last position's logits are needed to generate: [batch, model]
    last = decoder.op("Gather", [x, decoder.op("Sub", [decoder.op("Squeeze", [new_length]), decoder.const(1)])],
                      axis=1)
    hidden, _ = _norm(decoder, last, "decoder.final_layer_norm", w, eps)
    if config.tie_word_embeddings:
        hidden = decoder.op("Mul", [hidden, decoder.const(np.float32(config.d_model ** -0.5), np.float32)])
        outputs = output_graphs(config.d_model, w, "shared.weight", shared, "shared", plan, tied=True)
    else:
        outputs = output_graphs(config.d_model, w, "lm_head.weight", store.file("head.onnx.data"), "lm_head.weight",
                                plan)
    decoder.output(hidden, "hidden", TensorProto.FLOAT, ["batch", config.d_model])
    for i, (k, v) in enumerate(presents):
        decoder.output(k, f"present_key.{i}", TensorProto.FLOAT, ["batch", heads, "total", head_dim])
        decoder.output(v, f"present_value.{i}", TensorProto.FLOAT, ["batch", heads, "total", head_dim])

    fields = {
        "cache": cache_fields(config.num_decoder_layers, heads, head_dim),
        "cross_cache": {
            "num_layers": config.num_decoder_layers, "num_heads": heads, "head_dim": head_dim,
            "key": "cross_key.{layer}", "value": "cross_value.{layer}",
            "axes": ["batch", "heads", "source", "head_dim"],
        },
        "hidden_size": config.d_model,
    }
    return [(encoder, "encoder.onnx", "encoder"), (decoder, "decoder.onnx", "decoder"), *outputs], fields


def self_bias_positions(graph: Graph, past_length: str, new_length: str, total_length: str) -> str:
    """(query position - key position) as [q, k]; negative where the key is in the future."""
    zero, one = graph.const(0), graph.const(1)
    query = graph.op("Range", [graph.op("Squeeze", [past_length]), graph.op("Squeeze", [total_length]),
                               graph.op("Squeeze", [one])])
    key = graph.op("Range", [graph.op("Squeeze", [zero]), graph.op("Squeeze", [total_length]),
                             graph.op("Squeeze", [one])])
    return graph.op("Sub", [graph.op("Unsqueeze", [query, one]), graph.op("Unsqueeze", [key, zero])])


def validate(config, load_model, sessions: dict, fields: dict, rng: np.random.Generator) -> dict[str, dict]:
    """Encoder outputs and decoder logits/presents against PyTorch, first step and with past, padded batch.

    load_model() builds the transformers model; it is dropped before the graphs run (memory holds one copy)."""
    batch, source = 3, 7
    input_ids = rng.integers(0, config.vocab_size, size=(batch, source), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # a padded row
    attention_mask[2, 3:] = 0
    decoder_ids = rng.integers(0, config.vocab_size, size=(batch, 4), dtype=np.int64)
    decoder_ids[:, 0] = config.decoder_start_token_id
    decoder_mask = np.ones_like(decoder_ids)
    decoder_mask[2, 0] = 0  # a row whose cache is padded on the left (continuous batching)
    model = load_model()
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                          decoder_input_ids=torch.from_numpy(decoder_ids),
                          decoder_attention_mask=torch.from_numpy(decoder_mask), use_cache=True)
    del model
    gc.collect()  # transformers modules hold reference cycles: free the weights before the graphs run
    encoder_out = sessions["encoder"].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
    names = [o.name for o in sessions["encoder"].get_outputs()]
    onnx_cross = dict(zip(names, encoder_out))
    diffs: dict[str, float] = {}
    cache = reference.past_key_values
    layers = config.num_decoder_layers
    for i in range(layers):
        cross_key, cross_value = _cross_layer(cache, i)
        diffs[f"encoder.cross_key.{i}"] = compare(onnx_cross[f"cross_key.{i}"], cross_key)
        diffs[f"encoder.cross_value.{i}"] = compare(onnx_cross[f"cross_value.{i}"], cross_value)
    heads, head_dim = config.num_heads, config.d_kv
    empty = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    feeds = {"encoder_attention_mask": attention_mask, "beam_idx": np.arange(batch, dtype=np.int64)}
    for i in range(layers):
        feeds[f"cross_key.{i}"] = onnx_cross[f"cross_key.{i}"]
        feeds[f"cross_value.{i}"] = onnx_cross[f"cross_value.{i}"]
    presents = cache_names(fields)
    for form in decoder_forms(sessions):  # the portable graph and its shared-buffer form, each against PyTorch
        # Without past: three tokens at once; with past: the fourth token on top of them.
        first = dict(feeds, input_ids=decoder_ids[:, :3], attention_mask=decoder_mask[:, :3])
        out = run_decoder(sessions, form, first, {name: empty for name in presents}, presents)
        logits = head_logits(sessions, out["hidden"], diffs, "screen.no_past")
        diffs[f"{form}.logits.no_past"] = compare(logits, reference.logits[:, 2].numpy())
        second = dict(feeds, input_ids=decoder_ids[:, 3:], attention_mask=decoder_mask)
        out = run_decoder(sessions, form, second, {name: out[present] for name, present in presents.items()},
                          presents)
        logits = head_logits(sessions, out["hidden"], diffs, "screen.with_past")
        diffs[f"{form}.logits.with_past"] = compare(logits, reference.logits[:, 3].numpy())
        # A padded position's own cache entry is never attended to (and is arbitrary in both): compare the others.
        attended = np.broadcast_to(decoder_mask[:, None, :, None].astype(bool), out["present_key.0"].shape)
        for i in range(layers):
            self_key, self_value = _self_layer(cache, i)
            diffs[f"{form}.present_key.{i}"] = compare(out[f"present_key.{i}"], self_key, attended)
            diffs[f"{form}.present_value.{i}"] = compare(out[f"present_value.{i}"], self_value, attended)
    return diffs


def _self_layer(cache, i: int):
    layer = cache.self_attention_cache.layers[i] if hasattr(cache, "self_attention_cache") else None
    if layer is not None:
        return layer.keys.numpy(), layer.values.numpy()
    return cache[i][0].numpy(), cache[i][1].numpy()


def _cross_layer(cache, i: int):
    layer = cache.cross_attention_cache.layers[i] if hasattr(cache, "cross_attention_cache") else None
    if layer is not None:
        return layer.keys.numpy(), layer.values.numpy()
    return cache[i][2].numpy(), cache[i][3].numpy()


def parameters(config) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Every weight of MT5ForConditionalGeneration: shape and transformers' initial distribution (T5's
    _init_weights), for the random presets and for checking a checkpoint before anything is written."""
    d, inner, d_ff, factor = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.initializer_factor
    normal = lambda std: ("normal", factor * std)  # noqa: E731
    ones = ((d,), ("ones",))
    found = {"shared.weight": ((config.vocab_size, d), normal(1.0))}

    def attention(prefix: str) -> None:
        found[f"{prefix}.q.weight"] = ((inner, d), normal((d * config.d_kv) ** -0.5))
        found[f"{prefix}.k.weight"] = ((inner, d), normal(d ** -0.5))
        found[f"{prefix}.v.weight"] = ((inner, d), normal(d ** -0.5))
        found[f"{prefix}.o.weight"] = ((d, inner), normal(inner ** -0.5))

    def feed_forward(prefix: str) -> None:
        for name in ("wi_0", "wi_1") if config.is_gated_act else ("wi",):
            found[f"{prefix}.{name}.weight"] = ((d_ff, d), normal(d ** -0.5))
        found[f"{prefix}.wo.weight"] = ((d, d_ff), normal(d_ff ** -0.5))

    for stack, layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        for i in range(layers):
            p = f"{stack}.block.{i}.layer"
            attention(f"{p}.0.SelfAttention")
            if i == 0:
                found[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = (
                    (config.relative_attention_num_buckets, config.num_heads), normal(d ** -0.5))
            found[f"{p}.0.layer_norm.weight"] = ones
            if stack == "decoder":
                attention(f"{p}.1.EncDecAttention")
                found[f"{p}.1.layer_norm.weight"] = ones
            feed_forward(f"{p}.{2 if stack == 'decoder' else 1}.DenseReluDense")
            found[f"{p}.{2 if stack == 'decoder' else 1}.layer_norm.weight"] = ones
        found[f"{stack}.final_layer_norm.weight"] = ones
    if not config.tie_word_embeddings:
        found["lm_head.weight"] = ((config.vocab_size, d), normal(1.0))
    return found


def truncate(config, select, vocab_rows: int):
    """A config with the layers `select(count)` picks of each stack and the first vocab_rows rows of the vocabulary,
    and the name map from it to the full checkpoint."""
    encoder, decoder = select(config.num_layers), select(config.num_decoder_layers)
    small = copy.deepcopy(config)
    small.num_layers, small.num_decoder_layers = len(encoder), len(decoder)
    small.vocab_size = min(config.vocab_size, vocab_rows)
    rename = layer_renamer({r"^encoder\.block\.(\d+)\.": dict(enumerate(encoder)),
                            r"^decoder\.block\.(\d+)\.": dict(enumerate(decoder))},
                           pinned=("relative_attention_bias",))
    return small, rename, ("shared.weight", "lm_head.weight"), {"encoder": encoder, "decoder": decoder}


# 4-bit blocks of 128 move mT5's logits far more than blocks of 32 (mt0-small, random weights: top-1 agreement
# with fp32 20% against 29%; BLOOM keeps 100% at either), so mT5's int4 keeps the finer blocks.
register_family(Family(name="mt5", kind="seq2seq", model_types=("mt5", "t5"), build=build, validate=validate,
                       parameters=parameters, truncate=truncate, block_sizes={"int4-weight": 32}))
