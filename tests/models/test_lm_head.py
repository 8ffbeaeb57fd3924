import pytest
import torch
from moe_utils import tiny_moe_lm

from posttrain.models import add_fused_logprob_head, tiny_causal_lm


def _batch(vocab=259, batch=3, length=14):
    ids = torch.randint(0, vocab, (batch, length))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, -3:] = 0  # right padding
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[0, :5] = -100  # a prompt
    return ids, attention_mask, labels


def _reference(model, ids, attention_mask, labels, temperature):
    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1].double() / temperature
    target = labels[:, 1:]
    mask = target != -100
    log_p = logits.log_softmax(-1)
    logprobs = log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    log_sum_sq = torch.logsumexp(2 * log_p, -1) * mask
    return logprobs, entropy, logits.mean(-1) * mask, (logits.argmax(-1) == target) & mask, log_sum_sq


@pytest.mark.parametrize("use_fused_kernels", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_patched_forward_matches_full_logits(use_fused_kernels, temperature):
    model, _ = tiny_causal_lm(seed=1)
    ids, attention_mask, labels = _batch()
    expected = _reference(model, ids, attention_mask, labels, temperature)
    add_fused_logprob_head(model, temperature=temperature, entropy=True, stats=True, use_fused_kernels=use_fused_kernels)
    out = model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels)
    assert out.logprobs.shape == (3, 13) and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean_logit.double(), expected[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_argmax, expected[3])
    torch.testing.assert_close(out.log_sum_sq_probs.double(), expected[4], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)


def test_fused_and_plain_gradients_agree():
    grads = []
    ids, attention_mask, labels = _batch()
    for fused in (True, False):
        model, _ = tiny_causal_lm(seed=2)
        add_fused_logprob_head(model, entropy=True, use_fused_kernels=fused)
        out = model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels)
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_unpatched_calls_and_generate_are_unchanged():
    model, _ = tiny_causal_lm(seed=3)
    ids, attention_mask, _ = _batch()
    before = model(input_ids=ids, attention_mask=attention_mask).logits
    greedy = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    add_fused_logprob_head(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=attention_mask).logits, before)
    assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False), greedy)


def test_all_labels_ignored_stays_differentiable():
    model, _ = tiny_causal_lm(seed=4)
    add_fused_logprob_head(model)
    ids = torch.randint(0, 259, (2, 6))
    out = model(input_ids=ids, logprob_labels=torch.full_like(ids, -100))
    assert (out.logprobs == 0).all()
    out.logprobs.sum().backward()  # no "does not require grad" error
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_softcapped_model_falls_back_with_a_warning():
    model, _ = tiny_causal_lm(seed=5)
    model.config.final_logit_softcapping = 30.0
    with pytest.warns(UserWarning, match="final_logit_softcapping=30.0"):
        add_fused_logprob_head(model)
    ids, attention_mask, labels = _batch()
    out = model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels)
    assert torch.isfinite(out.logprobs).all()


# ---- Mixture-of-Experts: the load-balancing loss ----


@pytest.mark.parametrize("use_fused_kernels", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("architecture", ["qwen2_moe", "mixtral"])
def test_moe_aux_loss_matches_the_models_own_forward(architecture, use_fused_kernels):
    """aux_loss (Qwen2-MoE: num_experts; Mixtral: num_local_experts) equals the model's own, padding excluded by the
    attention mask, and its gradient reaches every router exactly as the model's own aux_loss's does."""
    model, _ = tiny_moe_lm(seed=6, architecture=architecture)
    ids, attention_mask, labels = _batch()
    expected = model(input_ids=ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    expected.backward()
    routers = {name: p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight")}
    expected_grads = {name: p.grad.clone() for name, p in routers.items()}
    model.zero_grad()

    add_fused_logprob_head(model, use_fused_kernels=use_fused_kernels)
    out = model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels, output_router_logits=True)
    assert out.aux_loss.shape == () and out.aux_loss.requires_grad
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-6, atol=1e-7)
    # the mask matters: counting the padded positions gives another value
    unmasked = model(input_ids=ids, logprob_labels=labels, output_router_logits=True).aux_loss
    assert not torch.isclose(unmasked, expected, rtol=1e-4)
    out.aux_loss.backward()
    assert len(routers) == 2
    for name, param in routers.items():
        assert param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_moe_aux_loss_follows_the_call_then_the_config():
    model, _ = tiny_moe_lm(seed=7)
    add_fused_logprob_head(model)
    ids, attention_mask, labels = _batch()
    inputs = {"input_ids": ids, "attention_mask": attention_mask, "logprob_labels": labels}
    assert model(**inputs).aux_loss is None  # the config's output_router_logits defaults to False
    model.config.output_router_logits = True
    assert model(**inputs).aux_loss is not None
    assert model(**inputs, output_router_logits=False).aux_loss is None


def test_dense_model_has_no_aux_loss():
    model, _ = tiny_causal_lm(seed=8)
    add_fused_logprob_head(model)
    ids, attention_mask, labels = _batch()
    assert model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels).aux_loss is None


def test_moe_with_an_unknown_load_balancing_loss_falls_back_with_a_warning(monkeypatch):
    """A module whose load_balancing_loss_func takes other arguments (as Doge's num_keys) cannot be reproduced from the
    backbone: the model's own forward (full logits) computes it."""
    import transformers.models.qwen2_moe.modeling_qwen2_moe as qwen2_moe

    own = qwen2_moe.load_balancing_loss_func

    def keyed(gate_logits, num_experts=None, top_k=2, attention_mask=None, num_keys=None):
        return own(gate_logits, num_experts, top_k, attention_mask)

    monkeypatch.setattr(qwen2_moe, "load_balancing_loss_func", keyed)
    model, _ = tiny_moe_lm(seed=9)
    with pytest.warns(UserWarning, match="Qwen2MoeForCausalLM's MoE load-balancing loss takes other arguments"):
        add_fused_logprob_head(model)
    ids, attention_mask, labels = _batch()
    out = model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels, output_router_logits=True)
    expected = model(input_ids=ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(out.aux_loss, expected)


# ---- architectures that rescale their logits, and heads that are not a plain linear layer ----

SMALL = dict(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
# Each family's own convention: Cohere multiplies by logit_scale, Falcon-H1 by lm_head_multiplier, HyperCLOVA X by
# logits_scaling, Granite divides by logits_scaling. Dory's head learns a per-token scale: only its own forward knows.
SCALED_FAMILIES = {
    "cohere": {"logit_scale": 0.5},
    "granite": {"logits_scaling": 4.0},
    "hyperclovax": {"logits_scaling": 0.25},
    "falcon_h1": {"lm_head_multiplier": 0.3},
    "dory": {},
}


@pytest.mark.parametrize("model_type", list(SCALED_FAMILIES))
def test_fused_logprobs_follow_each_familys_logit_scaling(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type} models")
    torch.manual_seed(10)
    config = AutoConfig.for_model(model_type, **SMALL, **SCALED_FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 300, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits[:, :-1].double().log_softmax(-1)
    target = labels[:, 1:]
    expected = expected.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
    if model_type == "dory":
        with pytest.warns(UserWarning, match=r"LM head \(DoryLMHead\) is not a plain linear layer"):
            head = add_fused_logprob_head(model)
        assert not head.fused
    else:
        assert add_fused_logprob_head(model).fused
    with torch.no_grad():
        out = model(input_ids=ids, logprob_labels=labels)
    torch.testing.assert_close(out.logprobs.double(), expected, rtol=1e-5, atol=1e-5)


def test_unknown_logit_scaling_falls_back_to_the_models_logits():
    model, _ = tiny_causal_lm(seed=11)
    model.config.logits_scaling = 2.0  # a Qwen2 with a scaling attribute its forward does not read
    with pytest.warns(UserWarning, match="rescales its logits .* by a convention posttrain does not know"):
        head = add_fused_logprob_head(model)
    assert not head.fused


# ---- the patch itself: explicit, reversible, never applied twice ----


def test_the_patch_is_reversible_and_refuses_a_second_one():
    model, _ = tiny_causal_lm(seed=12)
    ids, attention_mask, labels = _batch()
    head = add_fused_logprob_head(model, entropy=True)
    with pytest.raises(ValueError, match="already has a fused log-prob head"):
        add_fused_logprob_head(model)
    replacement = add_fused_logprob_head(model, replace=True, temperature=0.5)
    with pytest.raises(RuntimeError, match="not installed"):
        head.remove()
    assert model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels).entropy is None
    replacement.remove()
    assert "forward" not in model.__dict__
    assert model(input_ids=ids, attention_mask=attention_mask).logits.shape == (*ids.shape, 259)


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights():
    import copy

    model, _ = tiny_causal_lm(seed=13)
    add_fused_logprob_head(model)
    ids, attention_mask, labels = _batch()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        before = clone(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels).logprobs
        for param in model.parameters():
            param.mul_(-1.0)
        after = clone(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels).logprobs
    torch.testing.assert_close(after, before)


# ---- head losses: the loss and its gradients computed in the forward ----


def _sequence_mean_loss(layout, weights):
    """A loss that needs whole sequences: each sequence's mean of weight * logp + 0.1 entropy, summed."""

    def loss_fn(chunk):
        sequences = torch.unique(layout.sequence_of(chunk.rows))
        logps, entropy, mask = layout.dense(chunk.rows, chunk.logprobs, chunk.entropy, sequences=sequences)
        per_token = weights[sequences, None] * logps + 0.1 * entropy
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum()

    return loss_fn


@pytest.mark.parametrize("use_fused_kernels", [True, False], ids=["fused", "plain"])
def test_head_loss_matches_autograd_through_the_logprobs(use_fused_kernels):
    from posttrain.models.lm_head import HeadLoss, LabelLayout
    from posttrain.ops import LossChunk

    ids, attention_mask, labels = _batch()
    weights = torch.tensor([0.5, -1.0, 2.0])
    mask = labels[:, 1:] != -100
    grads, losses = [], []
    for with_head_loss in (False, True):
        model, _ = tiny_causal_lm(seed=14)
        add_fused_logprob_head(model, entropy=True, use_fused_kernels=use_fused_kernels)
        loss_fn = _sequence_mean_loss(LabelLayout(mask), weights)
        if with_head_loss:
            groups = torch.arange(3)[:, None].expand_as(mask)
            out = model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels,
                        head_loss=HeadLoss(loss_fn, groups=groups))  # fmt: skip
            assert not out.logprobs.requires_grad and out.loss.requires_grad
            loss = out.loss
        else:
            out = model(input_ids=ids, attention_mask=attention_mask, logprob_labels=labels)
            rows = torch.arange(int(mask.sum()))
            loss = loss_fn(LossChunk(rows, out.logprobs[mask], out.entropy[mask], None, None, None))
        (0.37 * loss).backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_layout_places_each_position_in_its_sequence():
    from posttrain.models.lm_head import packed_layout

    # sequences of 3, 4 and 2 tokens back to back; a sequence's first token is predicted from nothing (-100)
    labels = torch.arange(9)[None]
    labels[0, [0, 3, 7]] = -100
    layout = packed_layout(labels[:, 1:] != -100, torch.tensor([3, 4, 2]))
    rows = torch.arange(6)
    values = labels[0, 1:][labels[0, 1:] != -100].double()
    (dense, mask) = layout.dense(rows, values, sequences=torch.tensor([2, 0, 1]))
    assert torch.equal(dense, torch.tensor([[8.0, 0, 0], [1, 2, 0], [4, 5, 6]], dtype=torch.float64))
    assert torch.equal(layout.sequence_of(rows), torch.tensor([0, 0, 1, 1, 1, 2]))
    assert torch.equal(mask, dense != 0)
