"""posttrain.losses.kto: against explicit float64 loops of TRL 1.16's formulas, gradients, the KL estimate."""

import math

import pytest
import torch

from posttrain.losses.kto import ESTIMATES_KL, LOSS_TYPES, check_loss_type, kl_estimate, kto_losses


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _loop(logps, ref_logps, desirable, kl, beta, loss_type, desirable_weight, undesirable_weight) -> list[float]:
    """TRL 1.16's KTOTrainer losses, written out one example at a time (its 1 - sigmoid form)."""
    out = []
    for logp, ref, good in zip(logps.tolist(), ref_logps.tolist(), desirable.tolist()):
        ratio = logp - ref
        if loss_type == "kto":
            loss = 1 - _sigmoid(beta * (ratio - kl)) if good else 1 - _sigmoid(beta * (kl - ratio))
        else:
            loss = 1 - _sigmoid(beta * ratio) if good else _sigmoid(beta * ratio)
        out.append(loss * (desirable_weight if good else undesirable_weight))
    return out


def _inputs(B, dtype=torch.float64):
    logps = -30.0 * torch.rand(B, dtype=dtype)
    ref_logps = logps + torch.randn(B, dtype=dtype) * 3.0
    return logps, ref_logps


LABELS = {
    "mixed": [True, False, False, True, True, False, True],
    "all_desirable": [True, True, True],
    "all_undesirable": [False, False],
    "one": [True],
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("labels", list(LABELS), ids=str)
@pytest.mark.parametrize("kl", [0.0, 0.7], ids=["kl0", "kl0.7"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)], ids=["balanced", "unbalanced"])
def test_losses_match_trl_formulas_in_float64(loss_type, labels, kl, weights):
    desirable = torch.tensor(LABELS[labels])
    logps, ref_logps = _inputs(len(desirable))
    out = kto_losses(
        logps, ref_logps, desirable, torch.tensor(kl, dtype=torch.float64), beta=0.3, loss_type=loss_type,
        desirable_weight=weights[0], undesirable_weight=weights[1],
    )  # fmt: skip
    expected = _loop(logps, ref_logps, desirable, kl, 0.3, loss_type, *weights)
    assert out.dtype == torch.float64 and out.shape == (len(desirable),)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_apo_zero_unpaired_ignores_the_kl_estimate():
    desirable = torch.tensor([True, False, True])
    logps, ref_logps = _inputs(3)
    without = kto_losses(logps, ref_logps, desirable, 0.0, loss_type="apo_zero_unpaired")
    with_kl = kto_losses(
        logps, ref_logps, desirable, torch.tensor(5.0, dtype=torch.float64), loss_type="apo_zero_unpaired"
    )
    torch.testing.assert_close(with_kl, without, rtol=0, atol=0)
    assert not ESTIMATES_KL["apo_zero_unpaired"] and ESTIMATES_KL["kto"]


def test_kto_moves_with_the_kl_estimate():
    desirable = torch.tensor([True, False])
    logps, ref_logps = _inputs(2)
    low, high = (kto_losses(logps, ref_logps, desirable, kl) for kl in (0.0, 2.0))
    # a higher reference point makes a desirable reward look worse and an undesirable one look better
    assert high[0] > low[0] and high[1] < low[1]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32_matches_float64(loss_type):
    desirable = torch.rand(37) < 0.4
    logps, ref_logps = _inputs(37)
    kl = torch.tensor(0.25, dtype=torch.float64)
    options = {"beta": 0.1, "loss_type": loss_type, "desirable_weight": 2.0, "undesirable_weight": 0.7}
    exact = kto_losses(logps, ref_logps, desirable, kl, **options)
    single = kto_losses(logps.float(), ref_logps.float(), desirable, kl.float(), **options)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_finite_differences(loss_type):
    desirable = torch.tensor([True, False, True, False, False])
    logps, ref_logps = _inputs(5)
    logps.requires_grad_(True)
    weights = {"desirable_weight": 1.5, "undesirable_weight": 0.25}

    def loss(x):
        return kto_losses(x, ref_logps, desirable, 0.4, beta=0.5, loss_type=loss_type, **weights).nanmean()

    assert torch.autograd.gradcheck(loss, (logps,))


def test_extreme_log_ratios_stay_finite_and_saturate():
    desirable = torch.tensor([True, True, False, False])
    logps = torch.tensor([1e4, -1e4, 1e4, -1e4])
    out = kto_losses(logps, torch.zeros(4), desirable, 0.0, beta=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_kl_estimate_is_the_clamped_mean_without_gradient():
    kl_logps = torch.tensor([-3.0, -5.0, -1.0], requires_grad=True)
    ref = torch.tensor([-4.0, -5.5, -1.0])
    estimate = kl_estimate(kl_logps, ref)
    assert estimate.item() == pytest.approx((1.0 + 0.5 + 0.0) / 3) and not estimate.requires_grad
    assert kl_estimate(ref, kl_logps.detach()).item() == 0.0  # a negative mean is clamped to 0


def test_kl_estimate_averages_the_processes_means():
    # each process contributes its own mean (processes with different batch sizes weigh the same), then the clamp
    gathered = []

    def gather(local):
        gathered.append(local.clone())
        return torch.cat([local, torch.tensor([-2.0]), torch.tensor([4.0])])

    estimate = kl_estimate(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0]), gather=gather)
    assert gathered[0].shape == (1,) and gathered[0].item() == 0.5
    assert estimate.item() == pytest.approx((0.5 - 2.0 + 4.0) / 3)
    assert kl_estimate(torch.tensor([0.0]), torch.tensor([0.0]), gather=lambda t: torch.tensor([-1.0, 0.5])) == 0.0


def test_bad_arguments_are_named():
    logps, ref_logps = _inputs(2)
    with pytest.raises(ValueError, match="loss_type 'bco' is not one of: kto, apo_zero_unpaired"):
        kto_losses(logps, ref_logps, torch.tensor([True, False]), loss_type="bco")
    with pytest.raises(TypeError, match="desirable must be a bool tensor, got torch.int64"):
        kto_losses(logps, ref_logps, torch.tensor([1, 0]))
    check_loss_type("kto")
