import pytest
import torch

from posttrain.models import add_fused_logprob_head, padding_free_attn_implementation, tiny_causal_lm
from posttrain.models.attention import use_padding_free_attention


def _sequences(lengths, vocab=259):
    return [torch.randint(0, vocab, (n,)) for n in lengths]


def _pack(seqs):
    ids = torch.cat(seqs).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0] + [len(s) for s in seqs[:-1]]), 0)
    labels[0, starts] = -100  # a sequence's first token is not predicted from the previous sequence's last
    return ids, position_ids, labels


def _per_sequence(packed_logprobs, seqs):
    """The packed row's log-probs of each sequence's own next tokens, concatenated (the boundary positions dropped)."""
    pieces, start = [], 0
    for s in seqs:
        pieces.append(packed_logprobs[start : start + len(s) - 1])
        start += len(s)
    return torch.cat(pieces)


def test_cpu_uses_sdpa():
    assert padding_free_attn_implementation("cpu") == "sdpa"


@pytest.mark.parametrize("lengths", [[5, 9, 1, 7], [12], [3, 3]], ids=["mixed", "single", "equal"])
def test_packed_row_equals_separate_sequences(lengths):
    """Per-sequence log-probs and parameter gradients of one packed row equal those of the sequences run one by one:
    any cross-sequence attention would change them."""
    seqs = _sequences(lengths)
    results = []
    for packed in (True, False):
        model, _ = tiny_causal_lm(seed=7)
        assert use_padding_free_attention(model) == "sdpa"
        add_fused_logprob_head(model)
        if packed:
            ids, position_ids, labels = _pack(seqs)
            logprobs = model(input_ids=ids, position_ids=position_ids, logprob_labels=labels).logprobs[0]
            flat = _per_sequence(logprobs, seqs)
        else:
            flat = torch.cat([model(input_ids=s[None], logprob_labels=s[None]).logprobs[0] for s in seqs])
        flat.sum().backward()
        results.append((flat.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (packed_lp, packed_grads), (single_lp, single_grads) = results
    torch.testing.assert_close(packed_lp, single_lp, rtol=1e-5, atol=1e-5)
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], single_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_row_actually_differs_without_isolation():
    """Guard for the test above: with one continuous position range the model cross-attends, and results change."""
    seqs = _sequences([6, 8])
    model, _ = tiny_causal_lm(seed=7)
    add_fused_logprob_head(model)
    ids, position_ids, labels = _pack(seqs)
    isolated = model(input_ids=ids, position_ids=position_ids, logprob_labels=labels).logprobs
    mixed = model(input_ids=ids, position_ids=torch.arange(14)[None], logprob_labels=labels).logprobs
    assert not torch.allclose(isolated[0, 6:], mixed[0, 6:], atol=1e-4)


def test_unknown_attention_is_refused():
    model, _ = tiny_causal_lm(seed=7)
    model.config._attn_implementation = "paged|something"
    with pytest.raises(ValueError, match="not known to isolate packed sequences"):
        use_padding_free_attention(model)


@pytest.mark.gpu
def test_gpu_varlen_attention_matches_separate_sequences():
    from posttrain.models.attention import VARLEN_ATTENTION, register_varlen_attention

    register_varlen_attention()
    seqs = [s.cuda() for s in _sequences([37, 5, 64, 1, 20])]
    model, _ = tiny_causal_lm(seed=8)
    model = model.cuda().to(torch.bfloat16)
    add_fused_logprob_head(model)
    with torch.no_grad():
        single = torch.cat([model(input_ids=s[None], logprob_labels=s[None]).logprobs[0] for s in seqs])
        model.set_attn_implementation(VARLEN_ATTENTION)
        ids, position_ids, labels = _pack(seqs)
        packed = model(input_ids=ids, position_ids=position_ids, logprob_labels=labels).logprobs[0]
    torch.testing.assert_close(_per_sequence(packed, seqs), single, rtol=2e-2, atol=2e-2)
