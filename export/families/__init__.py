"""Model families plug in here: one module per family, registered by the model types it exports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """What the exporter needs to know about one family of models.

    build(model) -> (graphs, manifest fields): graphs are (Graph, filename, role) triples.
    validate(model, folder, manifest_fields) -> {check name: max abs difference}.
    """

    name: str
    kind: str  # "seq2seq" or "decoder": the runtime dispatches on this alone
    model_types: tuple[str, ...]
    build: Callable[[Any], tuple[list, dict]]
    validate: Callable[..., dict[str, float]]


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


# Importing the modules registers them.
from . import bloom, mt5  # noqa: E402,F401
