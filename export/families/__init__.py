"""Model families plug in here: one module per family, registered by the model types it exports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """What the exporter needs to know about one family of models.

    build(config, weight source, store, plan) -> (graphs, manifest fields): graphs are (Graph, filename, role)
        triples, their weights already written to the store's files.
    validate(config, load_model, sessions, manifest fields, rng) -> {check name: max abs difference}; the
        transformers model is built by load_model() and dropped before the graphs run.
    parameters(config) -> {weight name: (shape, initial distribution)}: every weight the graphs read.
    truncate(config, select, vocab_rows) -> (smaller config, name map to the full checkpoint, vocabulary tables,
        layers kept): the same architecture with fewer layers and vocabulary rows, for validation in bounded memory.
    """

    name: str
    kind: str  # "seq2seq" or "decoder": the runtime dispatches on this alone
    model_types: tuple[str, ...]
    build: Callable[[Any], tuple[list, dict]]
    validate: Callable[..., dict[str, float]]
    parameters: Callable[[Any], dict]
    truncate: Callable[..., tuple]
    # Default MatMulNBits block size per weight-only mode where the family departs from quantize.DEFAULT_BLOCK_SIZE.
    block_sizes: dict[str, int] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; xmtf-onnx exports {', '.join(supported)} "
        "(mT0 is mt5, BLOOMZ is bloom)."
    )


def parameter_count(family: Family, config) -> int:
    """How many weights the family's graphs read for this config (a tied head counted once)."""
    return sum(math.prod(shape) for shape, _ in family.parameters(config).values())


# Importing the modules registers them.
from . import bloom, mt5  # noqa: E402,F401
