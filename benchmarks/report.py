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
    """A backend's class: fp32, 8-bit or 4-bit weights; a variant is compared with the rivals of its own class."""
    words = name.replace("-", " ").split()  # "xmtf int4-weight-32k" (a restricted variant) is 4-bit too
    if {"fp32", "float32", "f32"} & set(words):
        return "fp32"
    return "4-bit" if {"int4", "q4_0"} & set(words) else "8-bit"


def _threads(report: dict, short: bool = False) -> str:
    """The threads each backend had: all the same, or the rivals one per core and xmtf its machine's policy."""
    policy = report.get("thread_policy")
    if report.get("xmtf_threads") or "xmtf_threads" not in report or not policy:
        return f"{report['threads']} threads"
    if short:
        return f"{report['threads']} threads, xmtf: {policy['name']}"
    measured = policy.get("ms_per_step")
    how = (f"measured {policy.get('measured_at', '')}: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items())
           + " ms per synthetic step") if measured else policy.get("source", "")
    return (f"rivals {report['threads']} threads, xmtf its machine's thread policy {policy['name']} "
            f"({policy['summary']}; {how})")


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"# xmtf-onnx benchmark ({report['created']})", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores; provider {report['provider']}, "
             f"{_threads(report)}; "
             + ("denormals slow here (beam search's log-softmax takes rows whose exps are denormals through numpy); "
                if report.get("slow_denormals") else "")
             + f"checkpoint {report.get('checkpoint_dtype', 'float32')}; "
             f"{report['new_tokens']} new tokens forced (min = max); prompts of "
             f"{report['prompt_tokens']} tokens; {report['repeats']} rounds, backends interleaved (A B C A B C), each run "
             f"after {report['warmup']} warm-up in its process: tok/s is the median round (best round in brackets); "
             "every ratio uses the medians.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "tok/s = generated tokens returned per second (batch × new tokens / wall time); "
             "×pt = against PyTorch fp32; ×rival = against the fastest rival (non-xmtf) of the same class (fp32, "
             "8-bit or 4-bit weights) in the same setting; BxK = batch B, K beams (1: greedy); Bxsample = batch B "
             "sampled, top-k 50 at temperature 1, seeded; llama.cpp runs batch 1 greedy only (– elsewhere); "
             "TTFT = time to first token; p50/p90 = per-token decode latency; RSS = peak resident memory of the "
             "backend's own process; anon / file = its anonymous (heap: packed weight copies, activations) and "
             "file-backed (memory-mapped weights) resident memory at the end. xmtf load times are with verify=False "
             "(sizes checked, no sha256).", ""]
    for model_name, model in report["models"].items():
        lines += [f"## {model_name} ({model['num_parameters'] / 1e6:.0f}M parameters, {model['kind']})", ""]
        settings = list(model["settings"])
        ok = [b for b in model["backends"] if b["status"] == "ok"]
        baseline = next((b for b in ok if b["name"] == "pytorch fp32"), None)
        header = ["backend", "load s", "size MB", "peak RSS MB", "anon / file MB"]
        for setting in settings:
            header += [f"{setting} tok/s", "×pt", "×rival", "TTFT ms", "p50/p90 ms"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for backend in model["backends"]:
            if backend["status"] != "ok":
                lines.append(f"| {backend['name']} | failed: {backend.get('error', '')[:160]} |"
                             + " |" * (len(header) - 2))
                continue
            row = [backend["name"], _fmt(backend.get("load_seconds"), "{:.2f}"),
                   _fmt(backend.get("size_bytes", 0) / 1e6, "{:.0f}"), _fmt(backend["peak_rss_bytes"] / 1e6, "{:.0f}"),
                   f"{_fmt(backend.get('rss_anon_bytes', 0) / 1e6, '{:.0f}')} / "
                   f"{_fmt(backend.get('rss_file_bytes', 0) / 1e6, '{:.0f}')}"]
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
                best = entry.get("tokens_per_second_best")
                row += [_fmt(speed) + (f" ({best:.1f})" if best else ""), _fmt(speed / base if base else None, "{:.2f}"),
                        _fmt(speed / max(rivals) if rivals else None, "{:.2f}"),
                        _fmt(entry["first_token_seconds"] * 1e3 if entry["first_token_seconds"] else None, "{:.0f}"),
                        f"{_fmt(entry['step_p50_ms'])}/{_fmt(entry['step_p90_ms'])}"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines += _roofline_lines(model, report.get("read_bandwidth_bytes_per_second"))
        lines += _restricted_lines(model.get("restricted"))
        lines += _screen_lines(model["backends"])
        lines += _fidelity_lines(model.get("fidelity"))
    lines += [f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def _roofline_lines(model: dict, bandwidth: float | None) -> list[str]:
    """B=1 greedy decode against the memory roofline: a decode step reads at least the decoder's and the head's
    weights once, so bandwidth / those bytes bounds the tokens per second; llama.cpp of the same width beside it."""
    entries = {b["name"]: b["settings"]["1x1"] for b in model["backends"]
               if b["status"] == "ok" and "1x1" in b["settings"] and b["settings"]["1x1"].get("step_p50_ms")}
    if not bandwidth or not model.get("decode_bytes") or not entries:
        return []
    llama = {_precision(name): entry for name, entry in entries.items() if name.startswith("llama-cpp")}
    lines = [f"B=1 greedy decode against the memory roofline (read bandwidth {bandwidth / 1e9:.1f} GB/s measured in "
             "this run; decode tok/s = 1 / median per-token step, prefill excluded):", "",
             "| variant | bytes per token MB | roofline tok/s | decode tok/s | % of roofline | llama.cpp same width "
             "decode tok/s | × llama.cpp (decode / end-to-end) |", "|---|---|---|---|---|---|---|"]
    for variant, size in model["decode_bytes"].items():
        entry = entries.get(f"xmtf {variant}")
        if entry is None:
            continue
        decode, roof = 1e3 / entry["step_p50_ms"], bandwidth / size
        rival = llama.get(_precision(f"xmtf {variant}"))
        rival_decode = 1e3 / rival["step_p50_ms"] if rival else None
        ratios = (f"{decode / rival_decode:.2f} / {entry['tokens_per_second'] / rival['tokens_per_second']:.2f}"
                  if rival else "–")
        lines.append(f"| xmtf {variant} | {size / 1e6:.0f} | {roof:.0f} | {decode:.1f} | {decode / roof * 100:.0f}% | "
                     f"{_fmt(rival_decode)} | {ratios} |")
    return lines + [""]


def _restricted_lines(restricted: dict | None) -> list[str]:
    if not restricted:
        return []
    lines = ["Restricted-vocabulary variants (`xmtf-onnx restrict`; random weights: the coverage is a property of the "
             "corpus and tokenizer only):", "", "| variant | base | output rows | kept share | corpus coverage |",
             "|---|---|---|---|---|"]
    for name, entry in restricted.items():
        share = (entry.get("coverage") or {}).get("corpus_share")
        lines.append(f"| xmtf {name} | {entry['base']} | {entry['rows']} | {entry['kept_share'] * 100:.1f}% | "
                     f"{'–' if share is None else f'{share * 100:.1f}%'} |")
    return lines + [""]


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
    """tokens_per_second.png: one panel per model and setting, each on its own scale (a batch of 8 is several times
    a batch of 1, and a shared axis would hide the B=1 differences); peak_rss.png: one panel per model. Each figure
    says the machine, the threads and the work."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (bench extra): no plots", file=sys.stderr)
        return []
    machine = report["machine"]
    where = (f"{machine.get('cpu', '?')}, {machine.get('cores')} cores, {_threads(report, short=True)}, "
             f"{report['provider']}; {report['new_tokens']} new tokens, median of {report['repeats']} rounds")
    models = list(report["models"])
    written = []

    def bars(axis, backends: list[dict], values: list[float], title: str, label: str) -> None:
        names = [b["name"] for b in backends]
        axis.barh(names, values, color=["tab:gray" if _is_rival(n) else "tab:green" for n in names])
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:.0f}", va="center", fontsize=7)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(label, fontsize=8)
        axis.tick_params(labelsize=7)
        axis.set_xlim(0, max(values + [1]) * 1.18)

    columns = max(len(report["models"][m]["settings"]) for m in models)
    figure, axes = plt.subplots(len(models), columns, figsize=(3.6 * columns, 0.35 * 10 + 1.2 * len(models)),
                                squeeze=False)
    for row, model_name in enumerate(models):
        model = report["models"][model_name]
        backends = [b for b in model["backends"] if b["status"] == "ok"]
        for column in range(columns):
            axis = axes[row][column]
            settings = list(model["settings"])
            if column >= len(settings):
                axis.axis("off")
                continue
            setting = settings[column]
            present = [b for b in backends if setting in b["settings"]]
            batch, beams = setting.split("x")
            how = "sampled (top-k 50)" if beams == "sample" else f"{beams} beam{'s' if beams != '1' else ''}"
            bars(axis, present, [b["settings"][setting]["tokens_per_second"] for b in present],
                 f"{model_name}: batch {batch}, {how}", "generated tokens / s")
    figure.suptitle(_fit(f"xmtf-onnx (green) and rivals (gray), tokens/s — {where}", figure), fontsize=9)
    figure.tight_layout()
    written.append(os.path.join(folder, "tokens_per_second.png"))
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for axis, model_name in zip(axes[0], models):
        backends = [b for b in report["models"][model_name]["backends"] if b["status"] == "ok"]
        bars(axis, backends, [b["peak_rss_bytes"] / 1e6 for b in backends], model_name, "peak RSS of its process (MB)")
    figure.suptitle(_fit(f"Peak resident memory — {where}", figure), fontsize=9)
    figure.tight_layout()
    written.append(os.path.join(folder, "peak_rss.png"))
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    return written


def _fit(title: str, figure) -> str:
    """The title wrapped to the figure's width (about 13 characters per inch at 9 points): never cut off."""
    import textwrap

    return textwrap.fill(title, width=max(40, int(figure.get_figwidth() * 13)))


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
