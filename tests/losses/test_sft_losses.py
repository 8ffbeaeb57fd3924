import pytest
import torch

from posttrain.losses.sft import sft_loss


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_chunks_sum_to_the_batch_loss_and_its_gradient(loss_type):
    logps = (-torch.rand(11, dtype=torch.float64) * 4).requires_grad_()
    whole = sft_loss(logps, 11, loss_type)
    p = logps.detach().exp()
    expected = (-(logps.detach() * (p if loss_type == "dft" else 1.0))).sum() / 11
    torch.testing.assert_close(whole.detach(), expected)
    (grad,) = torch.autograd.grad(whole, logps)
    parts = sum(sft_loss(logps[i : i + 4], 11, loss_type) for i in range(0, 11, 4))
    (parts_grad,) = torch.autograd.grad(parts, logps)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(parts_grad, grad)
    # dft weights each token's -log p by its detached probability: the gradient is -p / N, not -(p + p log p) / N
    if loss_type == "dft":
        torch.testing.assert_close(grad, -p / 11)


def test_no_tokens_gives_zero_and_bad_type_is_named():
    assert sft_loss(torch.zeros(0), 0).item() == 0.0
    with pytest.raises(ValueError, match="loss_type 'kl' is not one of: nll, dft"):
        sft_loss(torch.zeros(2), 2, "kl")
