"""The fused log-prob kernels compile for Hopper (sm_90) without a GPU, into the code they were written to become.

tests/kernels/sm90_compile.py compiles them with Triton's own toolchain (TTGIR, PTX, and ptxas for registers and
spills) in a subprocess; these tests check, for the pinned tiles (what runs by default) under every flag set that
changes their registers, and for the autotune candidates under the flags they are tried with:

- pipelined loads (async copies into shared memory), within the per-block shared memory; wgmma for 16-bit inputs
  (fp32 runs IEEE dots on FMAs); no spills where Triton's ptxas reads its PTX.
- persistent launch: the kernels stride over their tiles by tl.num_programs (tt.get_num_programs in the TTGIR); the
  launchers size the grid to the SM count (test_fused_linear_logprob_launchers.py checks that part).
- no pipeline drain between consecutive tiles. The criterion, read from the TTGIR: the loop that holds the MMAs also
  holds each tile's epilogue (its exps), i.e. tiles are iterations of one flat tiles x K-steps loop; that loop body
  contains no `ttg.async_wait {num = 0}` (a wait for every load in flight); and its async copies (the loads of later
  steps) come before the epilogue. Inside the epilogue's branch there remains one `warp_group_dot_wait
  {pendings = 0}`: the wait for the current tile's own MMAs, whose accumulator the epilogue reads, and which no
  schedule without warp specialization avoids. The previous kernels failed this: a K loop per tile, then
  `warp_group_dot_wait {pendings = 0}` and `async_wait {num = 0}`, the epilogue, and only then the next tile's first
  loads.
"""

from pathlib import Path

import pytest
from sm90_checks import HOPPER_SHARED_MEMORY, assert_no_spills, compile_reports

# one worker compiles them all (under xdist each worker would repeat the module fixture's compile)
pytestmark = pytest.mark.xdist_group("sm90_compile")


@pytest.fixture(scope="module")
def reports():
    return compile_reports(Path(__file__).with_name("sm90_compile.py"))


def _matmuls(reports, role):
    return [r for r in reports if r["kernel"] in ("fwd", "bwd") and r["role"] == role]


def test_every_variant_was_compiled(reports):
    from posttrain.kernels.fused_linear_logprob import CANDIDATE_TILES

    assert len(_matmuls(reports, "pinned")) == 2 * (3 + 1)  # {bf16, fp32} x (3 forward flag sets + the backward)
    candidates = sum(len(tiles) - 1 for tiles in CANDIDATE_TILES.values())
    assert len(_matmuls(reports, "candidate")) == 2 * candidates + 1  # + the wide forward tile


@pytest.mark.parametrize("role", ["pinned", "candidate"])
def test_pipelined_on_wgmma_within_shared_memory(reports, role):
    for r in _matmuls(reports, role):
        assert r["pipelined"] and r["shared"] <= HOPPER_SHARED_MEMORY, r
        assert r["wgmma"] == (r["dtype"] != "fp32"), r


@pytest.mark.parametrize("role", ["pinned", "candidate"])
def test_persistent_with_no_drain_between_tiles(reports, role):
    for r in _matmuls(reports, role):
        assert r["persistent"], r
        assert r["flat"] and not r["drains_in_loop"] and r["prefetch_before_epilogue"], r


@pytest.mark.parametrize("role", ["pinned", "candidate"])
def test_no_spills(reports, role):
    assert_no_spills(_matmuls(reports, role))


def test_selective_log_softmax_reads_16_bytes_at_a_time(reports):
    rows = [r for r in reports if r["kernel"].startswith("selective")]
    assert len(rows) == 2
    for r in rows:
        assert r["vector_loads"], r
        assert r.get("spill_bytes", 0) == 0, r
