"""What the sm_90 compile tests share (tests/kernels/*sm90*.py): running a compile script in a subprocess, and the
checks every persistent matmul kernel must pass. The scripts use tests/kernels/sm90_compile.py's machinery and print
one JSON report per kernel variant."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HOPPER_SHARED_MEMORY = 227 * 1024  # the per-block limit on sm_90


def compile_reports(script: Path) -> list[dict]:
    """The JSON lines `script` prints, run with TRITON_INTERPRET unset (compiling needs the real backend); skips the
    test when triton is not installed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a test module run as the script imports this module too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr and "triton" in result.stderr:
        pytest.skip("triton is not installed")
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def assert_persistent_pipelined_forward(report: dict) -> None:
    """A persistent forward whose tiles are iterations of one flat tiles x K-steps loop: the next tile's loads are
    issued before this tile's epilogue, with no full drain (tests/kernels/test_sm90_compile.py says how this is read
    from the TTGIR); wgmma for 16-bit inputs (fp32 runs IEEE dots, off the tensor cores); within shared memory."""
    assert report["pipelined"] and report["persistent"] and report["flat"], report
    assert report["prefetch_before_epilogue"] and not report["drains_in_loop"], report
    assert report["wgmma"] or report["dtype"] == "fp32", report
    assert report["shared"] <= HOPPER_SHARED_MEMORY, report


def assert_no_spills(reports: list[dict], known: dict | None = None) -> None:
    """No register spills in any report that has a count (skips when Triton's ptxas cannot read its PTX here).

    known: {(kernel, dtype, flags): bytes} spills measured and accepted for the installed Triton; such a variant may
    spill up to that many bytes, no more."""
    checked = [r for r in reports if "spill_bytes" in r]
    if not checked:
        pytest.skip("Triton ships no ptxas that reads its PTX here")
    for r in checked:
        assert r["spill_bytes"] <= (known or {}).get((r["kernel"], r["dtype"], r["flags"]), 0), r
