"""`python -m benchmarks --base REF ...`: the same rows for another commit, side by side with this checkout.

Both runs are subprocesses of this checkout's benchmark code with the same arguments. The other commit is checked out
into a temporary `git worktree`; its run gets a PYTHONPATH that imports that commit's posttrain (and its kernels/ as
posttrain.kernels, through a link inside the worktree, since an editable install maps posttrain.kernels to this
checkout's kernels/), while `benchmarks` still comes from here. Each run's env row records the paths it imported.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.sink import read_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "results.jsonl"
ROW_KEY = ("op", "provider", "mode", "shape", "dtype")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def _run(argv: list[str], out: Path, cwd: Path, pythonpath: str | None = None) -> int:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    command = [sys.executable, "-m", "benchmarks", *argv, "--out", str(out)]
    return subprocess.run(command, check=False, cwd=cwd, env=env).returncode


def run_base(ref: str, argv: list[str], out: Path) -> int:
    """Run `python -m benchmarks ARGV` for this checkout into OUT/head and for `ref` into OUT/base, then write
    OUT/compare.md. Returns the first non-zero exit status, else 0."""
    sha = _git("rev-parse", "--short", f"{ref}^{{commit}}")
    head_status = _run(argv, out / "head", ROOT)
    with tempfile.TemporaryDirectory(prefix="posttrain-base-") as tmp:
        tree, shim = Path(tmp) / "tree", Path(tmp) / "shim"
        _git("worktree", "add", "--detach", str(tree), sha)
        try:
            if not (tree / "posttrain" / "kernels").exists():
                (tree / "posttrain" / "kernels").symlink_to(tree / "kernels", target_is_directory=True)
            shim.mkdir()
            (shim / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)
            # cwd = shim: `python -m` puts the cwd first on sys.path, so neither checkout's root shadows the other
            base_status = _run(argv, out / "base", shim, pythonpath=f"{shim}{os.pathsep}{tree}")
        finally:
            _git("worktree", "remove", "--force", str(tree))
    (out / "compare.md").write_text(compare(read_rows(out / "head" / RESULTS), _rows(out / "base" / RESULTS), ref))
    print((out / "compare.md").read_text())
    return head_status or base_status


def _rows(path: Path) -> list[dict]:
    return read_rows(path) if path.is_file() else []


def _env(rows: list[dict]) -> dict:
    return next((r for r in rows if r.get("kind") == "env"), {})


def compare(head: list[dict], base: list[dict], ref: str) -> str:
    """A markdown table of the rows both runs measured: median ms of each and base / head (> 1: this checkout is
    faster)."""
    head_env, base_env = _env(head), _env(base)
    timed = {tuple(r[k] for k in ROW_KEY): r for r in base if r.get("kind") == "op" and r.get("ms_p50")}
    lines = [
        f"# This checkout ({head_env.get('commit', '?')}) against {ref} ({base_env.get('commit', '?')})",
        "",
        f"{head_env.get('gpu', '?')} | torch {head_env.get('torch', '?')} | triton {head_env.get('triton', '?')}",
        f"base imported posttrain from {base_env.get('posttrain_path', '?')}, kernels from "
        + base_env.get("kernels_path", "?"),
        "",
        "| op | provider | mode | shape | dtype | base ms | head ms | base / head |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in head:
        key = tuple(row.get(k) for k in ROW_KEY)
        if row.get("kind") != "op" or not row.get("ms_p50") or key not in timed:
            continue
        theirs = timed[key]["ms_p50"]
        lines.append("| " + " | ".join(map(str, key)) + f" | {theirs:.3f} | {row['ms_p50']:.3f} | "
                     f"{theirs / row['ms_p50']:.2f}x |")  # fmt: skip
    if not base:
        lines += ["", f"The run of {ref} recorded nothing (see its output above)."]
    return "\n".join(lines) + "\n"
