"""Writes a run's results: long-format CSV, a markdown report with speedup columns, PNG plots and summary.json."""

import csv
import json
from collections import defaultdict
from pathlib import Path

CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "ms_p20", "ms_p50", "ms_p80", "peak_mb", "tflops", "gbps",
    "ceiling_frac", "error", "gpu", "torch", "triton", "transformers", "commit", "date",
]  # fmt: skip


def add_ceiling_fractions(rows, ceilings: dict) -> None:
    """ceiling_frac: TFLOP/s over the measured matmul ceiling (compute-bound ops) or GB/s over the copy ceiling."""
    for row in rows:
        if row.get("tflops") is not None and f"matmul_tflops_{row['dtype']}" in ceilings:
            row["ceiling_frac"] = row["tflops"] / ceilings[f"matmul_tflops_{row['dtype']}"]
        elif row.get("gbps") is not None and "copy_gbps" in ceilings:
            row["ceiling_frac"] = row["gbps"] / ceilings["copy_gbps"]


def write_csv(rows, env: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def _trainer_table(trainer_rows: list[dict]) -> list[str]:
    if not trainer_rows:
        return []
    lines = ["", "## Trainer steps (posttrain vs TRL 1.16)", "",
             "| trainer | model | seq | tokens/s | TRL tokens/s | speedup | peak MB | TRL peak MB | max seq | TRL max seq |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in trainer_rows:
        mine, theirs = r.get("tokens_per_s"), r.get("trl_tokens_per_s")
        speedup = f"{mine / theirs:.2f}x" if mine and theirs else ""
        cells = [r["trainer"], r["model"], str(r["seq_len"]), _fmt(mine, 0), _fmt(theirs, 0), speedup,
                 _fmt(r.get("peak_mb"), 0), _fmt(r.get("trl_peak_mb"), 0), str(r.get("max_seq_len", "")),
                 str(r.get("trl_max_seq_len", ""))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows, env: dict, ceilings: dict, notes: list[str], trainer_rows: list[dict] = ()) -> str:
    lines = [
        "# posttrain benchmarks",
        "",
        f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']} | "
        f"commit {env['commit']} | {env['date']}",
        "",
        "Ceilings measured in this run: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()),
        "",
        "Times are medians (ms) after warm-up, from CUDA events on a GPU (from the wall clock in smoke runs, where they"
        " mean nothing); speedup = provider ms / posttrain ms.",
        "",
    ]
    lines += [f"- {note}" for note in notes]
    groups = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["mode"], row["dtype"])].append(row)
    for (op, mode, dtype), group in groups.items():
        providers = list(dict.fromkeys(r["provider"] for r in group))
        others = [p for p in providers if p != "posttrain"]
        header = ["shape"] + [f"{p} ms" for p in providers] + [f"vs {p}" for p in others]
        header += ["posttrain rate", "of ceiling"] + [f"{p} MB" for p in providers]
        lines += ["", f"## {op} — {mode} — {dtype}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for shape in dict.fromkeys(r["shape"] for r in group):
            by = {r["provider"]: r for r in group if r["shape"] == shape}
            mine = by.get("posttrain", {})
            cells = [shape] + [_fmt(by.get(p, {}).get("ms_p50")) or by.get(p, {}).get("error", "")[:30] for p in providers]
            for p in others:
                theirs = by.get(p, {}).get("ms_p50")
                cells.append(f"{theirs / mine['ms_p50']:.2f}x" if theirs and mine.get("ms_p50") else "")
            rate = f"{_fmt(mine.get('tflops'), 1)} TFLOP/s" if mine.get("tflops") else f"{_fmt(mine.get('gbps'), 0)} GB/s"
            cells += [rate if mine.get("ms_p50") else "", _fmt(mine.get("ceiling_frac"), 2)]
            cells += [_fmt(by.get(p, {}).get("peak_mb"), 0) for p in providers]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _trainer_table(list(trainer_rows))
    return "\n".join(lines) + "\n"


def summary(rows, env: dict, gemm_floors: dict, trainer_rows: list[dict]) -> dict:
    """The summary.json of the benchmark issue: fused_linear_logprob forward+backward per shape, and trainer rows."""
    entries = defaultdict(dict)
    for row in rows:
        if row["op"] != "fused_linear_logprob" or row["mode"] != "full" or row.get("ms_p50") is None:
            continue
        key = (row["N"], row["H"], row["V"], row["dtype"])
        entry = entries[key]
        entry.update({"N": row["N"], "H": row["H"], "V": row["V"], "dtype": row["dtype"]})
        prefix = "" if row["provider"] == "posttrain" else f"{row['provider']}_"
        entry[f"{prefix}ms"] = row["ms_p50"]
        entry[f"{prefix}peak_mb"] = row["peak_mb"]
        if key in gemm_floors:
            entry["gemm_floor_ms"] = gemm_floors[key]
    return {
        "device": env["gpu"],
        "commit": env["commit"],
        "torch": env["torch"],
        "triton": env["triton"],
        "fused_linear_logprob": list(entries.values()),
        "trainers": trainer_rows,
    }


def plots(rows, out: Path) -> list[str]:
    """One PNG per op: forward+backward (or forward) median ms per shape and provider. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install 'posttrain[bench]')"]
    by_op = defaultdict(list)
    for row in rows:
        if row.get("ms_p50") is not None:
            by_op[row["op"]].append(row)
    for op, group in by_op.items():
        mode = "full" if any(r["mode"] == "full" for r in group) else group[0]["mode"]
        group = [r for r in group if r["mode"] == mode]
        labels = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in group))
        providers = list(dict.fromkeys(r["provider"] for r in group))
        fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(labels)), 4))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {f"{r['shape']}\n{r['dtype']}": r["ms_p50"] for r in group if r["provider"] == provider}
            xs = [j + i * width for j, label in enumerate(labels) if label in values]
            ax.bar(xs, [values[label] for label in labels if label in values], width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.set_title(f"{op} ({mode})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{op}.png", dpi=120)
        plt.close(fig)
    return []


def write_all(out: Path, rows, env, ceilings, notes, gemm_floors, trainer_rows) -> None:
    out.mkdir(parents=True, exist_ok=True)
    add_ceiling_fractions(rows, ceilings)
    notes = notes + plots(rows, out)
    write_csv(rows, env, out / "results.csv")
    (out / "report.md").write_text(markdown(rows, env, ceilings, notes, trainer_rows))
    (out / "summary.json").write_text(json.dumps(summary(rows, env, gemm_floors, trainer_rows), indent=2) + "\n")
