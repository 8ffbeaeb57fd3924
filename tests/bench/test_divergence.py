"""The fused_linear_divergence benchmark entries: every CPU provider computes the same loss and student gradients (so
the rows time the same problem, with the arguments in each library's order), the mask and the work counted."""

import math

import pytest
import torch

pytest.importorskip("benchmarks", reason="needs a posttrain checkout (tests/bench/conftest.py imports benchmarks/)")

SMOKE = {"N": 37, "Hs": 32, "Ht": 48, "V": 1000}


def _loss_and_grads(provider, x):
    leaves = [x["student_hidden"], x["student_weight"]]
    loss = provider.fn(x)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["fkl", "jsd", "rkl"])
def test_cpu_providers_agree_with_an_fp64_reference(beta):
    from benchmarks.providers import available, linear_divergence_providers
    from benchmarks.registry import linear_divergence_inputs
    from posttrain.ops import fused_linear_divergence_ref

    temperature = 0.7  # not 1, so a provider that dropped the temperature would differ
    providers, notes = available(linear_divergence_providers(beta, temperature), "cpu")
    assert set(providers) == {"posttrain", "torch", "trl"} and notes == ["liger: dropped, does not run on cpu"]
    x = linear_divergence_inputs(SMOKE, torch.float32, "cpu", seed=3)
    wide = {k: v.detach().double().requires_grad_(k.startswith("student")) if v.is_floating_point() else v
            for k, v in x.items()}  # fmt: skip
    exact = fused_linear_divergence_ref(wide["student_hidden"], wide["student_weight"], wide["teacher_hidden"],
                                        wide["teacher_weight"], wide["mask"], beta=beta, temperature=temperature)  # fmt: skip
    expected = (exact.loss.detach(), *torch.autograd.grad(exact.loss, [wide["student_hidden"], wide["student_weight"]]))
    assert expected[0] > 0
    for name, provider in providers.items():
        for got, want in zip(_loss_and_grads(provider, x), expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_inputs_mask_flops_bytes_and_floor():
    from benchmarks.registry import REGISTRY, counted_rows

    bench = REGISTRY["fused_linear_divergence_rkl"]
    x = bench.make_inputs(SMOKE, torch.float32, "cpu")
    assert x["mask"].dtype == torch.bool and int(x["mask"].sum()) == counted_rows(SMOKE) == 33
    assert not x["mask"].all() and x["grad_output"].shape == ()
    assert x["student_weight"].requires_grad and not x["teacher_weight"].requires_grad
    assert x["student_weight"].std().item() == pytest.approx(1 / math.sqrt(32), rel=0.1)
    shape = {"N": 8192, "Hs": 896, "Ht": 1536, "V": 151936}
    n = counted_rows(shape)
    assert bench.flops(shape, "full") == 2.0 * n * 151936 * (3 * 896 + 1536)
    assert bench.flops(shape, "forward") == 2.0 * n * 151936 * (896 + 1536)
    student, teacher = (8192 * 896 + 151936 * 896) * 2, (8192 * 1536 + 151936 * 1536) * 2
    assert bench.moved_bytes(shape, torch.bfloat16, "full") == 2 * student + teacher
    # four GEMMs over the counted rows: the student's three (logits, dH, dW) and the teacher's logits
    assert bench.floor(shape) == [((n, 896, 151936), "floor3_ms"), ((n, 1536, 151936), "logits_ms")]
    assert set(bench.modes) == {"forward", "full"}


def test_report_sums_the_floor_terms_and_summary_has_a_divergence_section():
    from benchmarks.report import gemm_floor_ms, summary

    shape = {"N": 100, "Hs": 8, "Ht": 16, "V": 50}
    row = {"kind": "op", "op": "fused_linear_divergence_jsd", "provider": "posttrain", "mode": "full",
           "shape": "N=100,Hs=8,Ht=16,V=50", "dtype": "bfloat16", **shape, "ms_p20": 1.0, "ms_p50": 2.0,
           "ms_p80": 3.0, "peak_mb": 5.0}  # fmt: skip
    floors = [{"kind": "floor", "N": 90, "H": 8, "V": 50, "dtype": "bfloat16", "floor3_ms": 0.5, "logits_ms": 0.2},
              {"kind": "floor", "N": 90, "H": 16, "V": 50, "dtype": "bfloat16", "floor3_ms": 0.9, "logits_ms": 0.3}]  # fmt: skip
    by_key = {(f["N"], f["H"], f["V"], f["dtype"]): f for f in floors}
    assert gemm_floor_ms(row, by_key) == pytest.approx(0.5 + 0.3)
    assert gemm_floor_ms(row, {}) is None  # a term not measured: no floor rather than a wrong one
    trl = {**row, "provider": "trl", "ms_p50": 4.0}
    (entry,) = summary([*floors, row, trl])["fused_linear_divergence"]
    assert entry["divergence"] == "jsd" and (entry["N"], entry["Hs"], entry["Ht"], entry["V"]) == (100, 8, 16, 50)
    assert (entry["ms"], entry["trl_ms"], entry["gemm_floor_ms"]) == (2.0, 4.0, pytest.approx(0.8))
