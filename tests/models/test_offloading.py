import contextlib
import weakref

import pytest
import torch

from posttrain._compat import enable_checkpointing
from posttrain.models import add_fused_logprob_head, tiny_causal_lm
from posttrain.models.offloading import ActivationOffloading, no_activation_offloading
from posttrain.models.tiled_mlp import apply_tiled_mlp


def _train_step(model, ids, offloading=None):
    """Loss and every parameter's gradient of one forward and backward, under `offloading` when given."""
    model.zero_grad()
    with offloading or contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]


def _assert_equal(got, expected):
    assert len(got) == len(expected)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_same_loss_and_gradients(checkpointing):
    """The copies are exact: the loss and every gradient are bitwise those of the step without offloading."""
    model, _ = tiny_causal_lm(seed=0)
    model.train()
    if checkpointing:
        enable_checkpointing(model, None)  # transformers 5.17 names it gradient_checkpointing_enable
    ids = torch.randint(0, 259, (2, 37))
    expected = _train_step(model, ids)
    offloading = ActivationOffloading(model)
    for _ in range(2):  # reusable, step after step
        _assert_equal(_train_step(model, ids, offloading), expected)
    hidden_bytes = ids.numel() * model.config.hidden_size * 4
    if checkpointing:  # what is saved is each checkpointed layer's input
        assert offloading.offloaded_bytes >= model.config.num_hidden_layers * hidden_bytes
    else:  # several tensors of the layers' sizes per layer, among them the MLP's [T, intermediate] ones
        assert offloading.offloaded_bytes >= 10 * model.config.num_hidden_layers * hidden_bytes


def test_with_fused_head_and_tiled_mlp():
    model, _ = tiny_causal_lm(seed=0)
    add_fused_logprob_head(model, entropy=True)
    ids = torch.randint(0, 259, (2, 23))

    def step(offloading=None):
        model.zero_grad()
        with offloading or contextlib.nullcontext():
            out = model(input_ids=ids, logprob_labels=ids)
            (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        return [out.logprobs.detach(), out.entropy.detach()] + [p.grad for p in model.parameters()]

    expected = step()
    _assert_equal(step(ActivationOffloading(model)), expected)
    apply_tiled_mlp(model, tile_tokens=8)
    tiled = step()
    offloading = ActivationOffloading(model)
    _assert_equal(step(offloading), tiled)
    assert offloading.offloaded_tensors > 0


def test_tiled_mlp_recomputation_stays():
    """Backward under offloading: the tiled MLP's input goes to the CPU, the tiles it recomputes do not."""
    model, _ = tiny_causal_lm(seed=0)
    apply_tiled_mlp(model, tile_tokens=4)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    with ActivationOffloading(model) as offloading:
        mlp(x).sum().backward()  # a tile's [4, intermediate] activations are 2 KiB: above min_bytes
    assert (offloading.offloaded_tensors, offloading.offloaded_bytes) == (1, x.numel() * 4)


def _saved_by_linear(x, linear, offloading):
    with offloading:
        y = linear(x)
    return offloading.offloaded_tensors, offloading.offloaded_bytes, y


def test_parameters_and_small_tensors_stay():
    """A linear layer saves its input and (a view of) its weight: only the input moves, and only from 1 KiB up."""
    linear = torch.nn.Linear(64, 64)
    offloading = ActivationOffloading(linear)
    x = torch.randn(4, 64, requires_grad=True)
    assert _saved_by_linear(x, linear, offloading)[:2] == (1, x.numel() * 4)
    small = torch.randn(3, 64, requires_grad=True)  # 768 bytes
    assert _saved_by_linear(small, linear, offloading)[:2] == (0, 0)
    assert _saved_by_linear(small, linear, ActivationOffloading(linear, min_bytes=0))[:2] == (1, small.numel() * 4)
    # a model's buffers are recognized by their storage (they are plain tensors)
    module = torch.nn.Module()
    module.register_buffer("table", torch.randn(64, 64))
    x = torch.randn(64, 64, requires_grad=True)
    with ActivationOffloading(module) as offloading:
        module.table.t() * x.sin()  # saves x (for sin) and the table's transpose (for the product)
    assert (offloading.offloaded_tensors, offloading.offloaded_bytes) == (1, x.numel() * 4)


def test_shared_input_copied_once():
    """One tensor saved by three projections (q, k, v) goes to the CPU once, and comes back right for all three."""
    projections = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(3))
    x = torch.randn(8, 64, requires_grad=True)
    expected = torch.autograd.grad(sum(p(x).square().sum() for p in projections), [x, *projections.parameters()])
    with ActivationOffloading(projections) as offloading:
        loss = sum(p(x).square().sum() for p in projections)
    assert offloading.offloaded_tensors == 4  # x once, and each square's input
    _assert_equal(torch.autograd.grad(loss, [x, *projections.parameters()]), expected)


_SEEN = []


class _Record(torch.autograd.Function):
    """Identity that saves `saved` and appends to _SEEN what backward gets back."""

    @staticmethod
    def forward(ctx, x, saved):
        ctx.save_for_backward(saved)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _SEEN.append(ctx.saved_tensors[0])
        return grad, None


@pytest.mark.parametrize(
    "make,copied_elements,same_layout",
    [
        (lambda base: base.t(), 48 * 40, True),  # dense, transposed: its storage, its strides
        (lambda base: base[:1].expand(48, 40), 40, True),  # broadcast: one row copied, never materialized
        (lambda base: base[:, 3:20], 48 * 17, False),  # a slice with gaps: its elements, contiguous
        (lambda base: base[5:30], 25 * 40, True),  # an offset view
    ],
    ids=["transposed", "broadcast", "gappy-slice", "offset"],
)
def test_layouts(make, copied_elements, same_layout):
    base = torch.randn(48, 40)
    saved = make(base)
    x = torch.randn(3, requires_grad=True)
    _SEEN.clear()
    with ActivationOffloading(torch.nn.Module(), min_bytes=0) as offloading:
        out = _Record.apply(x, saved)
    out.sum().backward()
    (back,) = _SEEN
    assert offloading.offloaded_bytes == copied_elements * 4
    assert back.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert torch.equal(back, saved)
    assert (back.stride() == saved.stride()) == same_layout


def test_restored_tensor_not_kept():
    """Between two backwards through a retained graph, the saved tensor lives in CPU memory only."""
    saved, x = torch.randn(64, 64), torch.randn(3, requires_grad=True)
    _SEEN.clear()
    with ActivationOffloading(torch.nn.Module()):
        out = _Record.apply(x, saved)
    out.sum().backward(retain_graph=True)
    restored = weakref.ref(_SEEN.pop())
    assert restored() is None
    out.sum().backward()
    assert torch.equal(_SEEN.pop(), saved)


def test_output_head_and_paused_regions_stay():
    model, _ = tiny_causal_lm(seed=0)
    hidden = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    other = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with ActivationOffloading(model) as offloading:
        model.lm_head(hidden)
        with no_activation_offloading():
            other(hidden)
    assert offloading.offloaded_tensors == 0
    with ActivationOffloading(model) as offloading:
        other(hidden)
    assert offloading.offloaded_tensors == 1


def test_peft_model():
    peft = pytest.importorskip("peft")
    model, _ = tiny_causal_lm(seed=0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 259, (2, 17))
    expected = _train_step(model, ids)
    offloading = ActivationOffloading(model)
    _assert_equal(_train_step(model, ids, offloading), expected)
    hidden = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    with offloading:
        model.get_base_model().lm_head(hidden)  # found through the PEFT wrapper
    assert offloading.offloaded_tensors == 0


def test_backward_after_exit_and_twice_through_a_retained_graph():
    model, _ = tiny_causal_lm(seed=0)
    ids = torch.randint(0, 259, (1, 19))
    expected = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, list(model.parameters()))
    with ActivationOffloading(model) as offloading:
        loss = model(input_ids=ids, labels=ids).loss
    count = offloading.offloaded_tensors
    assert count > 0
    assert not model.lm_head._forward_pre_hooks and not model.lm_head._forward_hooks  # removed on exit
    for _ in range(2):
        _assert_equal(torch.autograd.grad(loss, list(model.parameters()), retain_graph=True), expected)
    model(input_ids=ids, labels=ids).loss.backward()  # outside the block, nothing is offloaded any more
    assert offloading.offloaded_tensors == count


def test_double_backward():
    x = torch.randn(64, 64, requires_grad=True)

    def grad_of_grad():
        (grad,) = torch.autograd.grad((x.sin() * 3).tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), x)[0]

    expected = grad_of_grad()
    with ActivationOffloading(torch.nn.Module()) as offloading:
        got = grad_of_grad()
    assert offloading.offloaded_tensors > 0
    assert torch.equal(got, expected)


def test_invalid_settings():
    with pytest.raises(ValueError, match="min_bytes must be >= 0, got -1"):
        ActivationOffloading(torch.nn.Module(), min_bytes=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_streams=True needs CUDA"):
            ActivationOffloading(torch.nn.Module(), use_streams=True)


@pytest.mark.gpu
@pytest.mark.parametrize("use_streams", [False, True], ids=["one-stream", "side-stream"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_cuda_same_loss_and_gradients_and_less_memory(use_streams, checkpointing):
    model, _ = tiny_causal_lm(seed=0, hidden_size=256, intermediate_size=1024)
    model.cuda().train()
    if checkpointing:
        enable_checkpointing(model, None)  # transformers 5.17 names it gradient_checkpointing_enable
    ids = torch.randint(0, 259, (4, 1024), device="cuda")

    def step(offloading=None):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with offloading or contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            after_forward = torch.cuda.memory_allocated() - base
            loss.backward()
        torch.cuda.synchronize()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad], after_forward

    expected, held = step()
    offloading = ActivationOffloading(model, use_streams=use_streams)
    for _ in range(2):
        got, held_offloaded = step(offloading)
        _assert_equal(got, expected)
    assert offloading.offloaded_bytes > 0
    assert held_offloaded < held
