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
# summary.json's LM-head sections: op -> (section, the field naming the variant within it, the variant)
SUMMARY_OPS = {
    "fused_linear_logprob": ("fused_linear_logprob", None, None),
    **{f"fused_linear_loss_{loss}": ("fused_linear_loss", "loss", loss) for loss in ("sft", "grpo")},
    **{f"fused_linear_divergence_{name}": ("fused_linear_divergence", "divergence", name)
       for name in ("fkl", "jsd", "rkl")},
}  # fmt: skip


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
    """The cuBLAS floor of an op row's forward+backward (the sum of its op's floor terms), when its op has one and
    every term was measured."""
    bench = REGISTRY.get(row["op"])
    if bench is None or bench.floor is None or row["mode"] != "full":
        return None
    try:
        terms = bench.floor(row)
    except KeyError:  # a row without its shape's dimensions
        return None
    times = [floors.get((*gemm, row["dtype"]), {}).get(name) for gemm, name in terms]
    return None if None in times else sum(times)


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
    """One row per trainer: later records (TRL measured after posttrain) complete earlier ones, and each longest-
    sequence result adds <prefix>max_seq_len (max_seq_len for posttrain, trl_max_seq_len for TRL, ...) with the
    tokens/s and peak MB of that step."""
    from benchmarks.memory import summary_prefix

    merged = {}
    for row in by_kind(rows)["trainer"]:
        merged.setdefault(row["trainer"], {}).update({k: v for k, v in row.items() if k not in ("kind", "phase")})
    for row in by_kind(rows)["max_seq"]:
        prefix = summary_prefix(row["variant"])
        merged.setdefault(row["trainer"], {"trainer": row["trainer"]}).update({
            f"{prefix}max_seq_len": row.get("max_seq_len"),
            f"{prefix}max_seq_tokens_per_s": row.get("tokens_per_s"),
            f"{prefix}max_seq_peak_mb": row.get("peak_mb"),
        })  # fmt: skip
    return list(merged.values())


MAX_SEQ_NOTE = (
    "The longest sequence with which one optimizer step ran (SFT and GRPO: one sequence; DPO: one pair of sequences"
    " that long; GRPO without generation), found by doubling then bisecting to within 1/8; peak MB and tokens/s of"
    " that step (one step: first-call costs included). 'at the limit': the search's cap, a lower bound; 'cut by the"
    " deadline': a lower bound. It depends on the GPU's memory: compare rows of one run only."
)


def _ratio_cell(mine: dict, trl: dict | None) -> str:
    # a search that did not end at an OOM gave a lower bound, so the ratio is a bound too (or unknown)
    if trl is None or not mine.get("max_seq_len") or not trl.get("max_seq_len"):
        return ""
    ratio = f"{mine['max_seq_len'] / trl['max_seq_len']:.2f}x"
    exact = {"found", "nothing fits"}
    if trl["status"] in exact:
        return ratio if mine["status"] in exact else f">= {ratio}"
    return f"<= {ratio}" if mine["status"] in exact else ""


def _max_seq_table(rows: list[dict]) -> list[str]:
    from benchmarks.memory import TRAINERS, VARIANTS

    if not rows:
        return []
    trl = {r["trainer"]: r for r in rows if r["variant"] == "trl"}
    order = {name: i for i, name in enumerate((*TRAINERS, *VARIANTS))}
    rows = sorted(rows, key=lambda r: (order.get(r["trainer"], 99), order.get(r["variant"], 99)))
    header = ["trainer", "variant", "longest seq", "vs TRL", "status", "tokens/s there", "peak MB there",
              "first OOM at", "probes"]  # fmt: skip
    cells = []
    for r in rows:
        status = r["status"] + (f": {r['error'][:80]}" if r.get("error") else "")
        cells.append([r["trainer"], r["variant"], str(r.get("max_seq_len") or ""), _ratio_cell(r, trl.get(r["trainer"])),
                      status, _fmt(r.get("tokens_per_s"), 0), _fmt(r.get("peak_mb"), 0),
                      str(r.get("first_oom_len") or ""), str(r.get("probes", ""))])  # fmt: skip
    return ["", "## Longest sequence that trains one step", "", MAX_SEQ_NOTE, ""] + _table(header, cells)


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


GENERATION_NOTE = (
    "Generated tokens (each completion up to its EOS) per second of one generate call of the whole workload, the"
    " device synchronized at both ends: median of the timed runs after a warm-up. Peak MB: allocated through PyTorch"
    " during the timed runs, the model's weights and the engine's KV cache included."
)


def generation_entries(rows: list[dict]) -> list[dict]:
    """summary.json's `generation` section: one entry per provider, as its row was recorded."""
    return [{k: v for k, v in r.items() if k not in ("kind", "phase")} for r in by_kind(rows)["generation"]]


def _generation_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    first = rows[0]
    workload = (f"{first['prompts']} prompts x {first['generations']} generations, {first['prompt_len']}-token"
                f" prompts, at most {first['max_completion_length']} new tokens; {first.get('model', '')}")  # fmt: skip
    base = next((r.get("tokens_per_s") for r in rows if r["provider"] == "transformers"), None)
    header = ["provider", "tokens/s", "vs transformers", "s per timed run", "tokens per run", "peak MB", "error"]
    cells = []
    for r in rows:
        rate = r.get("tokens_per_s")
        cells.append([r["provider"], _fmt(rate, 0), f"{rate / base:.2f}x" if rate and base else "",
                      ", ".join(f"{s:.2f}" for s in r.get("seconds", [])),
                      ", ".join(str(n) for n in r.get("generated_tokens", [])), _fmt(r.get("peak_mb"), 0),
                      r.get("error", "")[:100]])  # fmt: skip
    return ["", "## Generation", "", workload, "", GENERATION_NOTE, ""] + _table(header, cells)


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
    lines += _max_seq_table(kinds["max_seq"])
    lines += _generation_table(kinds["generation"])
    return "\n".join(lines) + "\n"


def _shape_fields(row: dict) -> dict:
    # the shape's dimensions in their label's order (N, H, V; N, Hs, Ht, V for the divergence)
    return {key: row[key] for key in (part.split("=")[0] for part in row["shape"].split(","))}


def summary(rows: list[dict]) -> dict:
    """summary.json: forward+backward of the LM-head ops per shape (fused_linear_logprob; fused_linear_loss, one entry
    per loss; fused_linear_divergence, one per divergence), each provider's median ms, p20/p80 and peak MB (prefixed
    by the provider, bare for posttrain), the GEMM floor; the verify rows, the trainer rows, the longest-sequence
    results, the generation rows and the notes."""
    floors = floors_of(rows)
    sections = {section: {} for section, _, _ in SUMMARY_OPS.values()}
    for row in by_kind(rows)["op"]:
        if row["op"] not in SUMMARY_OPS or row["mode"] != "full" or row.get("ms_p50") is None:
            continue
        section, field, variant = SUMMARY_OPS[row["op"]]
        entry = sections[section].setdefault((variant, row["shape"], row["dtype"]), {})
        entry.update({**({field: variant} if field else {}), **_shape_fields(row), "dtype": row["dtype"]})
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
        "max_seq": [{k: v for k, v in r.items() if k not in ("kind", "phase")} for r in by_kind(rows)["max_seq"]],
        "generation": generation_entries(rows),
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


def run_and_report(out: Path, jsonl: str, phase: str, body) -> None:
    """A standalone run (python -m benchmarks.memory, benchmarks.generation): out/jsonl started afresh, the environment
    row, then body(recorder) streaming its rows there; whatever happens (a deadline's SIGTERM included), the report
    files are written from what was recorded and report.md is printed."""
    import torch

    from benchmarks.environment import record_environment
    from benchmarks.sink import Recorder, stop_on_sigterm

    out.mkdir(parents=True, exist_ok=True)
    (out / jsonl).unlink(missing_ok=True)
    recorder = Recorder(out / jsonl, phase=phase)
    stop_on_sigterm()
    try:
        record_environment(recorder, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        body(recorder)
    finally:
        write_all(out, recorder.rows)
        print((out / "report.md").read_text())


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
