"""Writes a run's results from its rows (sink.py): a long-format CSV, a markdown report with speedup columns, one PNG
and summary.json. Works on a partial run too: whatever was recorded before a kill is reported."""

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

from benchmarks.registry import REGISTRY

CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "ms_p20", "ms_p50", "ms_p80", "samples", "peak_mb", "tflops", "gbps",
    "ceiling_frac", "error", "gpu", "torch", "triton", "transformers", "commit", "date",
]  # fmt: skip
ENV_KEYS = ("gpu", "torch", "triton", "transformers", "trl", "liger_kernel", "commit", "date")
# Liger's fused linear cross entropy returns a summed loss, its gradients computed in the forward: no per-token
# log-probs, no upstream gradient to wait for. Where the others return log-probs that is an easier problem.
EASIER = {("fused_linear_logprob", "liger"): "liger (sum loss: easier problem)"}
TIMES_NOTE = (
    "Times: median ms (p20-p80) of >= 5 timed runs after a warm-up run, from CUDA events with L2 flushed on a GPU"
    " (from the wall clock in smoke runs, where they mean nothing); speedup = provider ms / posttrain ms."
)
LIGER_NOTE = (
    "Liger's fused linear cross entropy returns only a summed loss and computes its gradients in the forward; the other"
    " providers return per-token log-probs whose upstream gradient arrives in the backward. Its row is the easier"
    " sum-loss problem, not the same work."
)
SUMMARY_OPS = {"fused_linear_logprob": "fused_linear_logprob", "fused_linear_loss_sft": "fused_linear_loss",
               "fused_linear_loss_grpo": "fused_linear_loss"}  # fmt: skip


def by_kind(rows: list[dict]) -> dict[str, list[dict]]:
    kinds = defaultdict(list)
    for row in rows:
        kinds[row.get("kind", "op")].append(row)
    return kinds


def environment_of(rows: list[dict]) -> dict:
    env = {key: "?" for key in ENV_KEYS}
    for row in by_kind(rows)["env"]:
        env.update({k: v for k, v in row.items() if k in ENV_KEYS})
    return env


def ceilings_of(rows: list[dict]) -> dict[str, float]:
    return {row["name"]: row["value"] for row in by_kind(rows)["ceiling"]}


def _floor_key(row) -> tuple:
    return row["N"], row["H"], row["V"], row["dtype"]


def floors_of(rows: list[dict]) -> dict[tuple, dict]:
    return {_floor_key(row): row for row in by_kind(rows)["floor"]}


def gemm_floor_ms(row: dict, floors: dict) -> float | None:
    """The cuBLAS floor of an op row's forward+backward, when its op has one and it was measured."""
    bench = REGISTRY.get(row["op"])
    if bench is None or bench.floor is None or row["mode"] != "full" or "N" not in row:
        return None
    floor = floors.get(_floor_key(row))
    return floor.get(bench.floor) if floor else None


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


def _time_cell(row: dict) -> str:
    if row.get("ms_p50") is None:
        return row.get("error", "")[:40]
    return f"{row['ms_p50']:.3f} ({row['ms_p20']:.3f}-{row['ms_p80']:.3f})"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def _op_tables(op_rows: list[dict], floors: dict) -> list[str]:
    groups = defaultdict(list)
    for row in op_rows:
        groups[(row["op"], row["mode"], row["dtype"])].append(row)
    lines = []
    for (op, mode, dtype), group in groups.items():
        providers = list(dict.fromkeys(r["provider"] for r in group))
        others = [p for p in providers if p != "posttrain"]
        label = {p: EASIER.get((op, p), p) for p in providers}
        header = ["shape"] + [f"{label[p]} ms (p20-p80)" for p in providers] + [f"vs {label[p]}" for p in others]
        header += ["posttrain rate", "of ceiling", "GEMM floor ms", "floor / posttrain"]
        header += [f"{label[p]} MB" for p in providers]
        cells = []
        for shape in dict.fromkeys(r["shape"] for r in group):
            by = {r["provider"]: r for r in group if r["shape"] == shape}
            mine = by.get("posttrain", {})
            row = [shape] + [_time_cell(by.get(p, {})) for p in providers]
            for p in others:
                theirs = by.get(p, {}).get("ms_p50")
                row.append(f"{theirs / mine['ms_p50']:.2f}x" if theirs and mine.get("ms_p50") else "")
            rate = (
                f"{_fmt(mine.get('tflops'), 1)} TFLOP/s" if mine.get("tflops") else f"{_fmt(mine.get('gbps'), 0)} GB/s"
            )
            floor = gemm_floor_ms(next(iter(by.values())), floors)
            row += [rate if mine.get("ms_p50") else "", _fmt(mine.get("ceiling_frac"), 2), _fmt(floor)]
            row.append(f"{floor / mine['ms_p50']:.2f}" if floor and mine.get("ms_p50") else "")
            row += [_fmt(by.get(p, {}).get("peak_mb"), 0) for p in providers]
            cells.append(row)
        lines += ["", f"## {op} — {mode} — {dtype}", ""] + _table(header, cells)
        if any(p in EASIER.get((op, p), "") for p in providers):
            lines += ["", LIGER_NOTE]
    return lines


VERIFY_COLUMNS = {"logprobs max": "logprobs_max", "logprobs mean": "logprobs_mean", "dH max": "d_hidden_max",
                  "dH mean": "d_hidden_mean", "dH rel": "d_hidden_rel", "dW max": "d_weight_max",
                  "dW mean": "d_weight_mean", "dW rel": "d_weight_rel", "loss abs": "loss_abs"}  # fmt: skip


def _verify_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    header = ["op", "shape", "dtype", "impl", "reference", *VERIFY_COLUMNS]
    cells = []
    for r in rows:
        values = ["" if r.get(key) is None else f"{r[key]:.2e}" for key in VERIFY_COLUMNS.values()]
        if "error" in r:
            values = [r["error"][:60]] + [""] * (len(values) - 1)
        cells.append([r["op"], r["shape"], r["dtype"], r["impl"], r["reference"], *values])
    intro = (
        "Absolute errors against a higher-precision reference (rel: ||a - ref|| / ||ref||). posttrain's error should"
        " stay within ~2x plain torch's at the same precision (STYLE.md)."
    )
    return ["", "## Verify: low precision against a higher-precision reference", "", intro, ""] + _table(header, cells)


def _tile_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    header = ["kernel", "config", "default", "mode", "shape", "ms (p20-p80)"]
    cells = [
        [r["kernel"], r["config"], "yes" if r.get("default") else "", r.get("mode", ""), r["shape"], _time_cell(r)]
        for r in rows
    ]
    return ["", "## Tile sweep: each candidate tile pinned in turn", ""] + _table(header, cells)


def merged_trainer_rows(rows: list[dict]) -> list[dict]:
    """One row per trainer: later records (TRL measured after posttrain, max_seq_len found last) complete earlier."""
    merged = {}
    for row in by_kind(rows)["trainer"]:
        merged.setdefault(row["trainer"], {}).update({k: v for k, v in row.items() if k not in ("kind", "phase")})
    return list(merged.values())


def _trainer_table(trainer_rows: list[dict]) -> list[str]:
    if not trainer_rows:
        return []
    header = ["trainer", "model", "seq", "tokens/s", "TRL tokens/s", "speedup", "peak MB", "TRL peak MB", "max seq",
              "TRL max seq"]  # fmt: skip
    cells = []
    for r in trainer_rows:
        mine, theirs = r.get("tokens_per_s"), r.get("trl_tokens_per_s")
        speedup = f"{mine / theirs:.2f}x" if mine and theirs else ""
        mine_cell = _fmt(mine, 0) or r.get("error", "")[:60]
        theirs_cell = _fmt(theirs, 0) or r.get("trl_error", "")[:60]
        cells.append([r["trainer"], r.get("model", ""), str(r.get("seq_len", "")), mine_cell, theirs_cell, speedup,
                      _fmt(r.get("peak_mb"), 0), _fmt(r.get("trl_peak_mb"), 0), str(r.get("max_seq_len", "")),
                      str(r.get("trl_max_seq_len", ""))])  # fmt: skip
    return ["", "## Trainer steps (posttrain vs TRL 1.16)", ""] + _table(header, cells)


def _phase_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cells = [[r["phase"], r["status"], str(r.get("rc", "")), str(r.get("seconds", ""))] for r in rows]
    return ["", "## Phases", ""] + _table(["phase", "status", "rc", "seconds"], cells)


def tests_summary(log: str) -> list[str]:
    """pytest's closing line and its FAILED / ERROR lines, from a tests.log."""
    lines = log.splitlines()
    verdict = [
        line for line in lines if re.search(r"\b(passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s", line)
    ]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return (verdict[-1:] or ["no pytest summary line: killed at its cap?"]) + failures


def markdown(rows: list[dict], tests_log: str | None = None) -> str:
    kinds = by_kind(rows)
    env, ceilings = environment_of(rows), ceilings_of(rows)
    lines = [
        "# posttrain benchmarks",
        "",
        " | ".join(f"{key} {env[key]}" for key in ENV_KEYS),
        "",
        "Ceilings measured in this run: " + (", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()) or "none"),
        "",
        TIMES_NOTE,
    ]
    notes = list(dict.fromkeys(row["text"] for row in kinds["note"]))
    lines += ["", "## Notes", ""] + [f"- {note}" for note in notes] if notes else []
    lines += _phase_table(kinds["phase"])
    if tests_log is not None:
        lines += ["", "## GPU tests", "", "```", *tests_summary(tests_log), "```"]
    lines += _verify_table(kinds["verify"])
    lines += _op_tables(kinds["op"], floors_of(rows))
    lines += _tile_table(kinds["tile"])
    lines += _trainer_table(merged_trainer_rows(rows))
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> dict:
    """summary.json: forward+backward of the LM-head ops per shape (fused_linear_logprob; fused_linear_loss, one entry
    per loss), each provider's median ms, p20/p80 and peak MB (prefixed by the provider, bare for posttrain), the GEMM
    floor; the verify rows, the trainer rows and the notes."""
    floors = floors_of(rows)
    sections = {"fused_linear_logprob": {}, "fused_linear_loss": {}}
    for row in by_kind(rows)["op"]:
        section = SUMMARY_OPS.get(row["op"])
        if section is None or row["mode"] != "full" or row.get("ms_p50") is None:
            continue
        loss = row["op"].removeprefix("fused_linear_loss_") if section == "fused_linear_loss" else None
        entry = sections[section].setdefault((loss, *_floor_key(row)), {})
        entry.update({**({"loss": loss} if loss else {}), "N": row["N"], "H": row["H"], "V": row["V"],
                      "dtype": row["dtype"]})  # fmt: skip
        prefix = "" if row["provider"] == "posttrain" else f"{row['provider']}_"
        for key, column in (("ms", "ms_p50"), ("ms_p20", "ms_p20"), ("ms_p80", "ms_p80")):
            entry[f"{prefix}{key}"] = row[column]
        entry[f"{prefix}peak_mb"] = row.get("peak_mb")
        floor = gemm_floor_ms(row, floors)
        if floor is not None:
            entry["gemm_floor_ms"] = floor
    env = environment_of(rows)
    return {
        "device": env["gpu"],
        "commit": env["commit"],
        "torch": env["torch"],
        "triton": env["triton"],
        **{name: list(entries.values()) for name, entries in sections.items()},
        "verify": [{k: v for k, v in r.items() if k not in ("kind", "phase")} for r in by_kind(rows)["verify"]],
        "trainers": merged_trainer_rows(rows),
        "notes": list(dict.fromkeys(row["text"] for row in by_kind(rows)["note"])),
    }


def plot(op_rows: list[dict], path: Path) -> str | None:
    """One PNG, one panel per op: forward+backward (or forward) median ms per shape and provider. Returns a note when
    it cannot (no matplotlib, nothing measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'posttrain[bench]')"
    by_op = defaultdict(list)
    for row in op_rows:
        if row.get("ms_p50") is not None:
            by_op[row["op"]].append(row)
    if not by_op:
        return "plot skipped: no op was measured"
    fig, axes = plt.subplots(len(by_op), 1, figsize=(9, 3.2 * len(by_op)), squeeze=False)
    for ax, (op, group) in zip(axes[:, 0], by_op.items()):
        mode = "full" if any(r["mode"] == "full" for r in group) else group[0]["mode"]
        group = [r for r in group if r["mode"] == mode]
        labels = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in group))
        providers = list(dict.fromkeys(r["provider"] for r in group))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {f"{r['shape']}\n{r['dtype']}": r["ms_p50"] for r in group if r["provider"] == provider}
            xs = [j + i * width for j, label in enumerate(labels) if label in values]
            ax.bar(xs, [values[label] for label in labels if label in values], width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.set_title(f"{op} ({mode})", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(out: Path, rows: list[dict], tests_log: Path | None = None) -> None:
    """results.csv, report.md, summary.json and report.png under `out`, from `rows` (a run's records, in order)."""
    out.mkdir(parents=True, exist_ok=True)
    op_rows = by_kind(rows)["op"]
    add_ceiling_fractions(op_rows, ceilings_of(rows))
    problem = plot(op_rows, out / "report.png")
    if problem:
        rows = rows + [{"kind": "note", "text": problem}]
    write_csv(op_rows, environment_of(rows), out / "results.csv")
    log = tests_log.read_text(errors="replace") if tests_log is not None and tests_log.is_file() else None
    (out / "report.md").write_text(markdown(rows, log))
    (out / "summary.json").write_text(json.dumps(summary(rows), indent=2) + "\n")
