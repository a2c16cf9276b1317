"""results.json -> results.md (tables) and PNG plots (tokens/s and peak RSS per backend and setting)."""

from __future__ import annotations

import json
import os
import sys


def _fmt(value, pattern: str = "{:.1f}") -> str:
    return "–" if value is None else pattern.format(value)


def _is_rival(name: str) -> bool:
    return not name.startswith("xmtf")


def _precision(name: str) -> str:
    """'fp32' or 'quantized': a variant is compared with the rivals of its own class."""
    return "fp32" if name.endswith(("fp32", "float32")) else "quantized"


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"# xmtf-onnx benchmark ({report['created']})", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores; provider {report['provider']}, "
             f"{report['threads']} threads; {report['new_tokens']} new tokens forced (min = max); prompts of "
             f"{report['prompt_tokens']} tokens; median of {report['repeats']} runs after {report['warmup']} warm-up.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "tok/s = generated tokens returned per second (batch × new tokens / wall time); "
             "×pt = against PyTorch fp32; ×rival = against the fastest rival (non-xmtf) of the same class (fp32 "
             "against fp32, quantized against quantized) in the same setting; "
             "TTFT = time to first token; p50/p90 = per-token decode latency; RSS = peak resident memory of the "
             "backend's own process. xmtf load times are with verify=False (sizes checked, no sha256).", ""]
    for model_name, model in report["models"].items():
        lines += [f"## {model_name} ({model['num_parameters'] / 1e6:.0f}M parameters, {model['kind']})", ""]
        settings = list(model["settings"])
        ok = [b for b in model["backends"] if b["status"] == "ok"]
        baseline = next((b for b in ok if b["name"] == "pytorch fp32"), None)
        header = ["backend", "load s", "size MB", "peak RSS MB"]
        for setting in settings:
            header += [f"{setting} tok/s", "×pt", "×rival", "TTFT ms", "p50/p90 ms"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for backend in model["backends"]:
            if backend["status"] != "ok":
                lines.append(f"| {backend['name']} | failed: {backend.get('error', '')[:160]} |"
                             + " |" * (len(header) - 2))
                continue
            row = [backend["name"], _fmt(backend.get("load_seconds"), "{:.2f}"),
                   _fmt(backend.get("size_bytes", 0) / 1e6, "{:.0f}"), _fmt(backend["peak_rss_bytes"] / 1e6, "{:.0f}")]
            for setting in settings:
                entry = backend["settings"].get(setting)
                if not entry:
                    row += ["–"] * 5
                    continue
                speed = entry["tokens_per_second"]
                base = baseline["settings"][setting]["tokens_per_second"] if baseline else None
                rivals = [b["settings"][setting]["tokens_per_second"] for b in ok
                          if _is_rival(b["name"]) and setting in b["settings"] and b is not backend
                          and _precision(b["name"]) == _precision(backend["name"])]
                row += [_fmt(speed), _fmt(speed / base if base else None, "{:.2f}"),
                        _fmt(speed / max(rivals) if rivals else None, "{:.2f}"),
                        _fmt(entry["first_token_seconds"] * 1e3 if entry["first_token_seconds"] else None, "{:.0f}"),
                        f"{_fmt(entry['step_p50_ms'])}/{_fmt(entry['step_p90_ms'])}"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines += _screen_lines(model["backends"])
        lines += _fidelity_lines(model.get("fidelity"))
    lines += [f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def _screen_lines(backends: list[dict]) -> list[str]:
    """Where greedy decoding went through the greedy screen, how often it certified the token."""
    shares = [f"{b['name']} {setting} {entry['screened_share'] * 100:.1f}%" for b in backends if b["status"] == "ok"
              for setting, entry in b["settings"].items() if "screened_share" in entry]
    if not shares:
        return []
    return ["Greedy screen (exact argmax from an 8-bit copy of the output projection; uncertified rows take the full "
            "logits): rows certified — " + ", ".join(shares) + ".", ""]


def _fidelity_lines(fidelity: dict | None) -> list[str]:
    if not fidelity or not fidelity.get("variants"):
        return []
    lines = [f"Fidelity against fp32 ({fidelity['prompts']}; {fidelity['new_tokens']} greedy tokens, teacher-forced "
             f"on fp32's tokens). {fidelity['note']}", "",
             "| variant | prompts | steps | top-1 agreement | identical greedy outputs | mean KL(fp32‖variant) "
             "| fp32 top-1 margin (median nats) |", "|---|---|---|---|---|---|---|"]
    for name, entry in fidelity["variants"].items():
        lines.append(f"| xmtf {name} | {entry['prompts']} | {entry['steps']} | {_fmt(entry['top1_agreement'] * 100)}% "
                     f"| {_fmt(entry['identical_greedy_share'] * 100)}% | {_fmt(entry['mean_kl'], '{:.2e}')} "
                     f"| {_fmt(entry.get('fp32_top1_margin_median'), '{:.3f}')} |")
    return lines + [""]


def plots(report: dict, folder: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (bench extra): no plots", file=sys.stderr)
        return []
    written = []
    for metric, label, filename in (("tokens_per_second", "generated tokens / s", "tokens_per_second.png"),
                                    ("peak_rss", "peak RSS (MB)", "peak_rss.png")):
        models = list(report["models"])
        figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
        for axis, model_name in zip(axes[0], models):
            model = report["models"][model_name]
            backends = [b for b in model["backends"] if b["status"] == "ok"]
            settings = list(model["settings"])
            if metric == "peak_rss":
                axis.barh([b["name"] for b in backends], [b["peak_rss_bytes"] / 1e6 for b in backends],
                          color=["tab:green" if not _is_rival(b["name"]) else "tab:gray" for b in backends])
            else:
                width = 0.8 / max(1, len(backends))
                for index, backend in enumerate(backends):
                    values = [backend["settings"].get(s, {}).get("tokens_per_second", 0) for s in settings]
                    axis.bar([i + index * width for i in range(len(settings))], values, width, label=backend["name"])
                axis.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))])
                axis.set_xticklabels([f"B×beams {s}" for s in settings])
                axis.legend(fontsize=7)
            axis.set_title(model_name)
            axis.set_xlabel(label if metric == "peak_rss" else "")
            axis.set_ylabel(label if metric != "peak_rss" else "")
        figure.tight_layout()
        path = os.path.join(folder, filename)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write_reports(report: dict, folder: str) -> list[str]:
    json_path = os.path.join(folder, "results.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    md_path = os.path.join(folder, "results.md")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(markdown(report))
    return [json_path, md_path, *plots(report, folder)]


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as source:
        data = json.load(source)
    for written in write_reports(data, os.path.dirname(sys.argv[1]) or "."):
        print(written)
