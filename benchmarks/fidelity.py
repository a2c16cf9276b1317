"""What quantization costs, measured against fp32 of the same export on the same prompts.

For each quantized variant: top-1 agreement per decode step (teacher-forced on fp32's greedy tokens, so
every step sees the same context), the share of prompts whose greedy output is identical, and the mean
KL(fp32 || variant) of the next-token distributions. With random-weight presets this measures numerical
fidelity, not task accuracy.
"""

from __future__ import annotations

import numpy as np

NOTE = ("Random weights: these numbers measure numerical fidelity of the quantized graphs against fp32, "
        "not task accuracy.")


def _options(new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_scores=False)


def greedy_targets(reference, rows: list[list[int]], new_tokens: int, chunk: int = 8) -> list[list[int]]:
    """fp32's greedy continuations: the tokens every variant is teacher-forced on."""
    return [sequence for start in range(0, len(rows), chunk)
            for sequence in reference.generate(input_ids=rows[start:start + chunk], **_options(new_tokens)).sequences]


def compare_variant(reference, candidate, rows: list[list[int]], new_tokens: int, chunk: int = 8,
                    targets: list[list[int]] | None = None) -> dict:
    """reference, candidate: loaded runtime Models (fp32 and a variant) -> agreement, identical share, mean KL.
    targets: greedy_targets(reference, rows, new_tokens), when several variants share them."""
    if targets is None:
        targets = greedy_targets(reference, rows, new_tokens, chunk)
    agree = steps = identical = 0
    kl_sum = 0.0
    margins = []  # fp32's gap between its two most likely tokens: small gaps flip under any rounding
    for start in range(0, len(rows), chunk):
        batch, forced = rows[start:start + chunk], targets[start:start + chunk]
        greedy = candidate.generate(input_ids=batch, **_options(new_tokens)).sequences
        identical += sum(a == b for a, b in zip(forced, greedy))
        lengths = np.array([len(t) for t in forced])
        pairs = zip(reference.teacher_forced(batch, forced), candidate.teacher_forced(batch, forced))
        for step, (p_log, q_log) in enumerate(pairs):  # [batch, vocab] each
            live = lengths > step
            p_log, q_log = p_log[live].astype(np.float64), q_log[live].astype(np.float64)
            agree += int((p_log.argmax(axis=1) == q_log.argmax(axis=1)).sum())
            top2 = np.partition(p_log, -2, axis=1)[:, -2:]
            margins += (top2[:, 1] - top2[:, 0]).tolist()
            p = np.exp(p_log)
            kl_sum += float(np.where(p > 0, p * (p_log - q_log), 0.0).sum())
            steps += int(live.sum())
    return {"prompts": len(rows), "steps": steps, "top1_agreement": agree / steps if steps else None,
            "identical_greedy_share": identical / len(rows), "mean_kl": kl_sum / steps if steps else None,
            "fp32_top1_margin_median": float(np.median(margins)) if margins else None}


def measure(export_dir: str, rows: list[list[int]], new_tokens: int, threads: int | None,
            provider: str = "cpu") -> dict:
    """Every quantized variant of export_dir against its fp32 -> {variant: metrics}."""
    from xmtf_onnx.runtime import load
    from xmtf_onnx.runtime.manifest import read_manifest

    # Restricted variants are left out: fp32's probability on the tokens they cannot produce makes the KL infinite.
    variants = [v for v, entry in read_manifest(export_dir).variants.items()
                if v != "fp32" and not entry.get("restricted")]
    if not variants:
        return {}
    reference = load(export_dir, provider=provider, threads=threads, verify=False)
    targets = greedy_targets(reference, rows, new_tokens)
    results = {}
    for variant in variants:
        candidate = load(export_dir, provider=provider, threads=threads, variant=variant, verify=False)
        results[variant] = compare_variant(reference, candidate, rows, new_tokens, targets=targets)
        del candidate
    return results
