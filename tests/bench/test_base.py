"""`python -m benchmarks --base REF`: the same rows for another commit, through a git worktree whose posttrain (and
kernels) the base run imports, side by side with this checkout. Checked in smoke mode against HEAD."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout of posttrain")


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def _env(path: Path) -> dict:
    return next(json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["kind"] == "env")


def test_base_head_side_by_side(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--op", "selective_log_softmax", "--mode", "forward",
               "--provider", "posttrain", "--base", "HEAD", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    head, base = _env(tmp_path / "head" / "results.jsonl"), _env(tmp_path / "base" / "results.jsonl")
    sha = _git("rev-parse", "--short", "HEAD")
    assert base["commit"] == sha and head["commit"].startswith(sha)
    # the base run imported the worktree's posttrain and kernels, not this checkout's
    assert Path(head["posttrain_path"]) == ROOT / "posttrain" and Path(head["kernels_path"]) == ROOT / "kernels"
    base_tree = Path(base["posttrain_path"]).parent
    assert base_tree != ROOT and Path(base["kernels_path"]) == base_tree / "kernels"
    assert not base_tree.exists()  # the worktree is removed afterwards
    assert str(base_tree) not in _git("worktree", "list")
    compare = (tmp_path / "compare.md").read_text()
    assert f"against HEAD ({sha})" in compare
    assert "| selective_log_softmax | posttrain | forward | N=16,V=1000 | float32 |" in compare
