"""The contract between export and runtime: `xmtf_manifest.json` in every exported folder."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ManifestError

MANIFEST_NAME = "xmtf_manifest.json"
FORMAT_VERSION = 4  # 2: the output projection left the decoder (head.onnx, screen.onnx); 3: default_variant, a
#                     folder may lack fp32, quantized embeddings (GatherBlockQuantized), DynamicQuantizeMatMul;
#                     4: mT5's decoder takes attention_mask (rows at different lengths: continuous batching)
KINDS = ("seq2seq", "decoder")
ROLES = {"seq2seq": ("encoder", "decoder", "head"), "decoder": ("decoder", "head")}
# the greedy screen (only where the head is the fp32 projection it bounds); the decoder's shared-buffer form (the
# CPU's: see cache["shared_buffer"]), read instead of the decoder where present
SHARED_DECODER = "decoder_shared"
OPTIONAL_ROLES = ("screen", SHARED_DECODER)


def sha256_of(path: str, block: int = 8 << 20) -> str:
    """Read in blocks, not memory-mapped: a map of a multi-GB weight file would count every page hashed in this
    process's RSS (4.4 GB of peak RSS at the end of a bloomz-7b1 int4 export)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    folder: str
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def cache(self) -> dict[str, Any]:
        return self.data["cache"]

    @property
    def tokens(self) -> dict[str, Any]:
        return self.data["tokens"]

    @property
    def variants(self) -> dict[str, Any]:
        return self.data["variants"]

    @property
    def default_variant(self) -> str:
        """The variant load() takes when none is named: recorded at export (a quantized-only folder has no fp32)."""
        return self.data.get("default_variant", "fp32")

    def variant_name(self, name: str) -> str:
        """The variant a name loads: its own, or the one a mode alias resolved to at export (int8 -> int8-dynamic)."""
        if name in self.variants:
            return name
        alias = self.data.get("aliases", {}).get(name)
        if alias in self.variants:
            return alias
        known = ", ".join([*self.variants, *(f"{a} (= {v})" for a, v in self.data.get("aliases", {}).items())])
        raise ManifestError(f"{self.folder} has no variant {name!r}; it has {known}. "
                            f"Add one with `xmtf-onnx quantize {self.folder} --mode MODE`.")

    def variant(self, name: str) -> dict[str, Any]:
        return self.variants[self.variant_name(name)]

    def path(self, relative: str) -> str:
        return os.path.join(self.folder, relative)

    def verify_files(self, variant: str, check_hashes: bool = True) -> None:
        """Every file the variant needs exists with the recorded size (and sha256); lists all problems."""
        problems = []
        for role, entry in self.variant(variant)["files"].items():
            for item in [entry, *entry.get("data", [])]:
                path = self.path(item["path"])
                if not os.path.isfile(path):
                    problems.append(f"{item['path']} ({role}) is missing")
                elif os.path.getsize(path) != item["bytes"]:
                    problems.append(f"{item['path']} ({role}) has {os.path.getsize(path)} bytes, "
                                    f"the manifest says {item['bytes']}")
                elif check_hashes and sha256_of(path) != item["sha256"]:
                    problems.append(f"{item['path']} ({role}) does not match its sha256")
        if problems:
            raise ManifestError(
                f"{self.folder} is incomplete or corrupted: " + "; ".join(problems)
                + ". Export it again (xmtf-onnx export MODEL OUTPUT --force)."
            )


def read_manifest(folder: str | os.PathLike) -> Manifest:
    folder = os.fspath(folder)
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isdir(folder):
        raise ManifestError(f"{folder} is not a folder; pass the folder written by `xmtf-onnx export`.")
    if not os.path.isfile(path):
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}; it was not written by `xmtf-onnx export`. "
                            "Export the model first: xmtf-onnx export MODEL OUTPUT.")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} cannot be read as JSON ({e}); export the model again.") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object; export the model again.")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {version!r}; this runtime reads version {FORMAT_VERSION}. "
            "Re-export with the same xmtf-onnx version as the runtime, or upgrade both together."
        )
    missing = [key for key in ("kind", "family", "variants", "cache", "tokens", "io") if key not in data]
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}; export the model again.")
    if data["kind"] not in KINDS:
        raise ManifestError(f"{path} has kind {data['kind']!r}; this runtime runs {', '.join(KINDS)}.")
    _check_paths(folder, path, data)
    return Manifest(folder, data)


def _listed_paths(data: dict[str, Any]) -> list[Any]:
    """Every file path the manifest names: graphs and their data files per variant, and the tokenizer."""
    paths = []
    variants = data["variants"] if isinstance(data["variants"], dict) else {}
    for entry in variants.values():
        for item in (entry.get("files") or {}).values() if isinstance(entry, dict) else ():
            if isinstance(item, dict):
                paths += [item.get("path"), *(d.get("path") for d in item.get("data", []) if isinstance(d, dict))]
    if isinstance(data.get("tokenizer"), dict):
        paths.append(data["tokenizer"].get("file"))
    return paths


def _check_paths(folder: str, manifest_path: str, data: dict[str, Any]) -> None:
    """An exported folder may come from someone else: refuse, before anything is read, a path that leaves it
    (absolute, `..`, or a symlink resolving outside). onnxruntime checks the graphs' own external-data paths."""
    root = os.path.realpath(folder)
    escaping = []
    for relative in _listed_paths(data):
        if not isinstance(relative, str) or not relative:
            escaping.append(repr(relative))
            continue
        resolved = os.path.realpath(os.path.join(root, relative))
        if os.path.isabs(relative) or os.path.commonpath([root, resolved]) != root:
            escaping.append(relative)
    if escaping:
        raise ManifestError(f"{manifest_path} names files outside {folder} ({', '.join(escaping)}); an exported "
                            "folder only refers to files inside it. Do not load it; export the model again.")


def write_manifest(folder: str, data: dict[str, Any]) -> None:
    """Written beside and renamed over the old one: a reader sees the old manifest or the new, never half of one."""
    temporary = os.path.join(folder, f".{MANIFEST_NAME}.partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, os.path.join(folder, MANIFEST_NAME))
