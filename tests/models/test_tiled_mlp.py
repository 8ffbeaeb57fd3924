import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from posttrain._compat import enable_checkpointing
from posttrain.models import tiny_qwen2_config
from posttrain.models.tiled_mlp import TiledMLPFunction, apply_tiled_mlp, remove_tiled_mlp

SMALL = {
    "vocab_size": 259, "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "attn_implementation": "sdpa", "tie_word_embeddings": False,
}  # fmt: skip
ARCHS = {
    "qwen2": lambda: Qwen2ForCausalLM(tiny_qwen2_config(**SMALL)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=8, **SMALL)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(mlp_bias=True, **SMALL)),  # biases get gradients too
}


def _model(arch, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ARCHS[arch]().to(dtype)


def _step(model, embeds, **kwargs):
    """Logits, the input's gradient and every parameter's gradient (the embedding has none: the input is embeds) for
    a loss that weighs each logit differently."""
    model.zero_grad()
    embeds = embeds.detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, **kwargs).logits
    weights = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64, device=logits.device)
    weights = weights.to(logits.dtype).view_as(logits)
    (logits * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), "input": embeds.grad, **grads}


def _assert_same(got, expected, **tolerance):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("batch,seq,tile", [(2, 37, 8), (1, 5, 16), (3, 16, 16)], ids=["tail", "one-tile", "even"])
def test_same_outputs_and_gradients(arch, checkpointing, batch, seq, tile):
    model = _model(arch)
    if checkpointing:
        enable_checkpointing(model, None)  # transformers 5.17 names it gradient_checkpointing_enable
    model.train()
    embeds = torch.randn(batch, seq, model.config.hidden_size)
    expected = _step(model, embeds)
    assert apply_tiled_mlp(model, tile_tokens=tile) == model.config.num_hidden_layers
    _assert_same(_step(model, embeds), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float64_is_exact(arch):
    """In float64 the tiles' different summation order is far below any tolerance: the math is the same."""
    model = _model(arch, dtype=torch.float64)
    embeds = torch.randn(2, 29, model.config.hidden_size, dtype=torch.float64)
    expected = _step(model, embeds)
    apply_tiled_mlp(model, tile_tokens=4)
    assert _max_diff(expected, _step(model, embeds)) < 1e-12


@pytest.mark.gpu
def test_bfloat16_on_cuda():
    """Against a float64 reference, the tiled bf16 model's error stays within twice the untiled bf16 model's (its
    per-tile parameter gradients are rounded to bf16 before their float32 sum), plus 2^-8 of the value's scale."""
    reference = _model("qwen2", dtype=torch.float64).cuda()
    model = _model("qwen2", dtype=torch.bfloat16).cuda()
    embeds = torch.randn(2, 300, 32, device="cuda")
    exact = _step(reference, embeds.double())
    untiled = _step(model, embeds.bfloat16())
    apply_tiled_mlp(model, tile_tokens=64)
    tiled = _step(model, embeds.bfloat16())
    for name, value in exact.items():
        untiled_error = (untiled[name].double() - value).abs().max()
        tiled_error = (tiled[name].double() - value).abs().max()
        assert tiled_error <= 2 * untiled_error + 2**-8 * value.abs().max(), name


def test_padding_free_rows():
    """Packed sequences (one row, position_ids restarting at 0): tiles cross sequence boundaries, as they may."""
    model = _model("qwen2")
    lengths = [7, 12, 3]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    embeds = torch.randn(1, sum(lengths), model.config.hidden_size)
    expected = _step(model, embeds, position_ids=position_ids)
    apply_tiled_mlp(model, tile_tokens=5)
    _assert_same(_step(model, embeds, position_ids=position_ids), expected, rtol=1e-5, atol=1e-6)


def test_function_gradcheck():
    mlp = LlamaMLP(LlamaConfig(hidden_size=4, intermediate_size=6, num_attention_heads=1, mlp_bias=True)).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    params = list(mlp.parameters())

    def tiled(x, *params):
        return TiledMLPFunction.apply(x, mlp, mlp.forward, 3, *params)

    # gradcheck perturbs the parameters in place, which the recomputation reads through the module
    assert torch.autograd.gradcheck(tiled, (x, *params))


def test_intermediates_never_whole_and_only_the_input_saved():
    model = _model("qwen2")
    apply_tiled_mlp(model, tile_tokens=6)
    mlp = model.model.layers[0].mlp
    rows = []
    mlp.gate_proj.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(2, 17, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    out.sum().backward()
    assert len(saved) == 1 and saved[0] is x  # untiled, it saves its intermediates: gate, up, act(gate), ...
    assert rows == [6] * 5 + [4] + [6] * 5 + [4]  # forward, then backward's recomputation: 34 tokens, 6 at a time


def test_recomputation_under_the_forwards_autocast():
    model = _model("qwen2")
    apply_tiled_mlp(model, tile_tokens=4)
    mlp = model.model.layers[0].mlp
    dtypes = []
    mlp.gate_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
    out.float().sum().backward()  # outside autocast, as a trainer's backward runs
    assert dtypes == [torch.bfloat16] * 6
    assert x.grad.dtype == torch.float32 and mlp.gate_proj.weight.grad.dtype == torch.float32


def test_only_the_input_needs_grad():
    model = _model("qwen2")
    mlp = model.model.layers[0].mlp
    mlp.requires_grad_(False)
    x = torch.randn(3, 11, 32, requires_grad=True)
    (expected,) = torch.autograd.grad(mlp(x).pow(2).sum(), x)
    apply_tiled_mlp(model, tile_tokens=4)
    (got,) = torch.autograd.grad(mlp(x).pow(2).sum(), x)
    torch.testing.assert_close(got, expected)


def test_empty_input():
    model = _model("qwen2")
    apply_tiled_mlp(model, tile_tokens=4)
    assert model.model.layers[0].mlp(torch.randn(1, 0, 32)).shape == (1, 0, 32)


def test_remove_and_reapply():
    model = _model("qwen2")
    apply_tiled_mlp(model)
    mlp = model.model.layers[1].mlp
    assert mlp._posttrain_tile_tokens == model.config.hidden_size
    apply_tiled_mlp(model, tile_tokens=3)
    assert mlp._posttrain_tile_tokens == 3
    assert remove_tiled_mlp(model) == 2
    assert "forward" not in mlp.__dict__ and not hasattr(mlp, "_posttrain_tile_tokens")
    assert remove_tiled_mlp(model) == 0


def test_keeps_an_instance_forward_in_place():
    """A forward set on the instance before tiling (accelerate's device hooks) runs for each tile, and comes back."""
    model = _model("qwen2")
    mlp = model.model.layers[0].mlp
    calls = []

    def hooked(x):
        calls.append(x.shape[0])
        return type(mlp).forward(mlp, x)

    mlp.forward = hooked
    apply_tiled_mlp(model, tile_tokens=4)
    x = torch.randn(1, 10, 32, requires_grad=True)
    mlp(x).sum().backward()
    assert calls == [4, 4, 2] * 2
    remove_tiled_mlp(model)
    assert mlp.forward is hooked


def test_inference_and_generate():
    model = _model("qwen2").eval()
    ids = torch.randint(0, 259, (2, 6))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    apply_tiled_mlp(model, tile_tokens=4)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected)


def test_deepcopy_runs_its_own_weights():
    """A reference model deep-copied from a tiled policy must not run the policy's MLPs."""
    model = _model("qwen2")
    apply_tiled_mlp(model, tile_tokens=4)
    ref = copy.deepcopy(model)
    embeds = torch.randn(1, 9, 32)
    before = ref(inputs_embeds=embeds).logits
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(ref(inputs_embeds=embeds).logits, before)


def test_refuses_other_mlps_and_bad_tiles():
    model = _model("qwen2")
    model.model.layers[1].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp is a Sequential"):
        apply_tiled_mlp(model)
    assert "forward" not in model.model.layers[0].mlp.__dict__  # nothing half-applied
    with pytest.raises(ValueError, match="found no decoder layer"):
        apply_tiled_mlp(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="tile_tokens must be a positive integer, got 0"):
        apply_tiled_mlp(_model("qwen2"), tile_tokens=0)


peft = pytest.importorskip("peft")


def _lora(model, dropout=0.0):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("tile_first", [False, True], ids=["peft-then-tile", "tile-then-peft"])
def test_lora_trains(tile_first):
    embeds = torch.randn(2, 13, 32)
    reference = _lora(_model("qwen2"))
    for module in reference.modules():  # LoRA's B starts at zero: give it values so every gradient is non-trivial
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            torch.nn.init.normal_(module.weight, std=0.1)
    expected = _step(reference, embeds)

    if tile_first:
        model = _model("qwen2")
        apply_tiled_mlp(model, tile_tokens=4)
        model = _lora(model)
        model.load_state_dict(reference.state_dict())
    else:
        model = copy.deepcopy(reference)
        apply_tiled_mlp(model, tile_tokens=4)
    assert "forward" in model.base_model.model.model.layers[0].mlp.__dict__
    _assert_same(_step(model, embeds), expected, rtol=1e-5, atol=1e-6)

    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        _step(model, embeds)
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_lora_dropout_masks_replayed():
    """With dropout, backward's recomputation must draw the forward's masks: the tiled MLP equals the untiled MLP run
    on the same tiles one after another from the same seed (same random draws, plain autograd)."""
    model = _lora(_model("qwen2"), dropout=0.5)
    model.train()
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 9, 32)
    params = [p for p in mlp.parameters() if p.requires_grad]

    def grads(run):
        torch.manual_seed(1)
        xx = x.clone().requires_grad_(True)
        out = run(xx)
        return [out.detach(), *torch.autograd.grad(out.pow(2).sum(), [xx, *params])]

    expected = grads(lambda xx: torch.cat([mlp(t) for t in xx.reshape(-1, 32).split(4)]).view(2, 9, 32))
    apply_tiled_mlp(model, tile_tokens=4)
    got = grads(mlp)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
