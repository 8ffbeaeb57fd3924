"""The reward model's Bradley-Terry loss and pair statistics against float64 references written from the formulas."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.losses.reward import bradley_terry_loss, pair_statistics


def _reference(chosen, rejected, margin=None, coef=None):
    """float64: mean(log(1 + exp(-(c - r - m)))) + coef * mean((c + r)^2)."""
    c, r = chosen.double(), rejected.double()
    d = c - r - (0 if margin is None else margin.double())
    loss = torch.log1p(torch.exp(-d)).mean()
    return loss if coef is None else loss + coef * ((c + r) ** 2).mean()


@pytest.mark.parametrize("margin", [False, True], ids=["no-margin", "margin"])
@pytest.mark.parametrize("coef", [None, 0.0, 0.01, 1.5], ids=lambda c: f"coef={c}")
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_loss_and_gradients_match_float64(batch, coef, margin):
    chosen = torch.randn(batch, requires_grad=True)
    rejected = torch.randn(batch, requires_grad=True)
    margins = torch.rand(batch) * 2 if margin else None
    loss = bradley_terry_loss(chosen, rejected, margins, coef)
    chosen64, rejected64 = (t.detach().double().requires_grad_() for t in (chosen, rejected))
    ref = _reference(chosen64, rejected64, margins, coef)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    grads = torch.autograd.grad(loss, (chosen, rejected))
    ref_grads = torch.autograd.grad(ref, (chosen64, rejected64))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)


def test_margin_shifts_the_difference():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])
    shifted = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, -0.5]))
    torch.testing.assert_close(shifted, bradley_terry_loss(torch.tensor([1.0, 1.0]), rejected))


def test_centering_term_is_the_square_of_the_pair_sum():
    chosen, rejected = torch.tensor([3.0, -1.0]), torch.tensor([1.0, -1.0])
    extra = bradley_terry_loss(chosen, rejected, None, 0.5) - bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(extra, torch.tensor(0.5 * (16.0 + 4.0) / 2))


def test_zero_coefficient_is_not_none_but_adds_nothing():
    chosen, rejected = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, None, 0.0), bradley_terry_loss(chosen, rejected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rewards_are_computed_in_float32(dtype):
    """The rewards' own rounding stays, but nothing after it is rounded to the low precision."""
    chosen, rejected = torch.randn(33).to(dtype), torch.randn(33).to(dtype)
    margin = torch.rand(33, dtype=torch.float64)
    loss = bradley_terry_loss(chosen, rejected, margin, 0.01)
    assert loss.dtype == torch.float32
    ref = _reference(chosen, rejected, margin.float(), 0.01)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("difference", [-200.0, -30.0, 30.0, 200.0])
def test_extreme_differences_stay_finite(difference):
    chosen = torch.tensor([difference], requires_grad=True)
    rejected = torch.zeros(1)
    loss = bradley_terry_loss(chosen, rejected)
    (grad,) = torch.autograd.grad(loss, chosen)
    assert torch.isfinite(loss) and torch.isfinite(grad)
    torch.testing.assert_close(loss.double(), _reference(chosen.detach(), rejected), rtol=1e-6, atol=1e-12)
    # d/dc -log sigmoid(c) = sigmoid(c) - 1: -1 far below zero, ~0 far above
    torch.testing.assert_close(grad.double(), torch.sigmoid(chosen.detach().double()) - 1, rtol=1e-6, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 40),
    scale=st.floats(1e-3, 50.0),
    coef=st.one_of(st.none(), st.floats(0.0, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_random_batches_match_float64(batch, scale, coef, seed):
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected, margin = (torch.randn(batch, generator=generator) * scale for _ in range(3))
    ref = _reference(chosen, rejected, margin, coef)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin, coef).double(), ref, rtol=1e-5, atol=1e-6)


def test_pair_statistics():
    chosen = torch.tensor([2.0, 0.0, -1.0, 5.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 3.0, 4.5])
    accuracy, margin = pair_statistics(chosen, rejected)
    assert accuracy.item() == 0.5  # a tie is not a correct ranking
    torch.testing.assert_close(margin, torch.tensor((1.0 + 0.0 - 4.0 + 0.5) / 4))
    assert not accuracy.requires_grad and not margin.requires_grad


@pytest.mark.parametrize(
    "chosen, rejected",
    [(torch.zeros(3), torch.zeros(4)), (torch.zeros(2, 1), torch.zeros(2, 1)), (torch.zeros(()), torch.zeros(()))],
    ids=["lengths", "2-d", "0-d"],
)
def test_shapes_are_checked(chosen, rejected):
    with pytest.raises(ValueError, match="must be 1-D tensors of the same length"):
        bradley_terry_loss(chosen, rejected)
    with pytest.raises(ValueError, match="must be 1-D tensors of the same length"):
        pair_statistics(chosen, rejected)


def test_margin_shape_is_checked():
    with pytest.raises(ValueError, match=r"margin must have the shape of the rewards \(3,\), got \(3, 1\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3, 1))
