"""Rows as they are measured: every row is appended to a JSONL file and flushed at once, so a run that is killed (a
device call's time limit) keeps everything measured before the kill.

Each row is a dict with a "kind": env, ceiling, op, floor, verify, tile, trainer, probe, max_seq, generation, note or
phase (report.py reads them).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


class Recorder:
    """Collects rows in memory and, when given a path, appends each to it as one JSON line (flushed and fsynced)."""

    def __init__(self, path: Path | None = None, log=print, phase: str | None = None):
        self.path = path
        self.log = log
        self.phase = phase
        self.rows: list[dict] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _close_cut_line(path)

    def record(self, row: dict) -> dict:
        if self.phase is not None:
            row.setdefault("phase", self.phase)
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row

    def note(self, text: str) -> None:
        """A note that must reach report.md (a dropped provider, a skipped measurement, a deadline)."""
        self.record({"kind": "note", "text": text})
        self.log(f"# note: {text}")


def _close_cut_line(path: Path) -> None:
    # a writer killed mid-row leaves a line without its newline: start this writer's rows on a line of their own
    text = path.read_bytes() if path.is_file() else b""
    if text and not text.endswith(b"\n"):
        with open(path, "a") as f:
            f.write("\n")


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file; a last line cut off by a kill is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def past(deadline: float | None, margin_s: float = 0.0) -> bool:
    """Whether less than `margin_s` is left before `deadline` (seconds since the epoch; None: no deadline)."""
    return deadline is not None and time.time() > deadline - margin_s


def stop_on_sigterm() -> None:
    """Turn a time limit's SIGTERM into SystemExit, so `finally` blocks still write what was measured."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
