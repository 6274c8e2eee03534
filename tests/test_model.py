"""model.py: shapes, GQA, the chunked loss, generation with and without the KV cache."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lm_head import IGNORE_INDEX, TiedEmbedding, chunked_cross_entropy, xent_grad_
from model import ModelArgs, Transformer, sample


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64)
    args.update(kw)
    return Transformer(ModelArgs(**args))


def test_gqa_shapes_and_tied_embeddings():
    m = tiny()
    att = m.layers[0].attention
    assert att.wq.weight.shape == (64, 64)
    assert att.wk.weight.shape == (2 * 16, 64) and att.wv.weight.shape == (2 * 16, 64)  # 2 kv heads of 16
    x = torch.randint(0, 300, (3, 10))
    h, _ = m.hidden_states(x)
    torch.testing.assert_close(m(x), h @ m.tok_embeddings.weight.t())  # the head is the embedding's weight
    assert [k for k, v in m.state_dict().items() if v.shape[0] == 300] == ["tok_embeddings.weight"]  # stored once
    full = tiny(n_kv_heads=None)
    assert full.layers[0].attention.wk.weight.shape == (64, 64)
    assert m.num_params() < full.num_params()
    assert m(torch.randint(0, 300, (3, 10))).shape == (3, 10, 300)
    assert m.args.ffn_dim % m.args.multiple_of == 0


def test_gqa_equals_attention_with_repeated_kv_heads():
    """Grouped-query attention is full attention whose kv heads are shared: copy each kv head to
    its group and a full-head model gives the same logits."""
    gqa, full = tiny(), tiny(n_kv_heads=None)
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, 16, 64)
            state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(64, 64)
    full.load_state_dict(state)
    x = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(gqa(x), full(x), rtol=1e-5, atol=1e-5)


def test_causality():
    m = tiny()
    x = torch.randint(0, 300, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 300
    torch.testing.assert_close(m(x)[:, :10], m(y)[:, :10])


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_loss_equals_the_reference_path(chunk):
    """The chunked head against loss_path="reference" (F.cross_entropy over full fp32 logits): the oracle."""
    m = tiny()
    m.tok_embeddings.chunk = chunk
    ref_model = copy.deepcopy(m)
    ref_model.tok_embeddings.loss_path = "reference"
    x, y = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    y[0, :5] = IGNORE_INDEX
    loss, ref = m(x, y), ref_model(x, y)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref, F.cross_entropy(ref_model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX))
    for (name, p), q in zip(m.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    per_token, ref_per_token = m(x, y, reduction="none"), ref_model(x, y, reduction="none")
    assert per_token.shape == (3, 20) and (per_token[0, :5] == 0).all()
    torch.testing.assert_close(per_token, ref_per_token, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x, y, reduction="sum"), ref_model(x, y, reduction="sum"), rtol=1e-6, atol=1e-5)


def test_the_head_owns_its_buffers_and_old_checkpoints_load():
    """Reused buffers live on the head (two models never share them; they go with the model), and a state
    dict that also holds the tied weight as output.weight (an nn.Linear head) loads strictly."""
    a, b = tiny(), tiny()
    x, y = torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(x, y).backward()
    assert a.tok_embeddings.scratch.buffers and not b.tok_embeddings.scratch.buffers
    state = a.state_dict()
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    b.load_state_dict(state, strict=True)
    torch.testing.assert_close(b(x), a(x))


def test_chunked_loss_under_bf16_autocast_matches_fp32_on_the_rounded_inputs():
    """bf16 rounds the matmuls' inputs to 8 bits of mantissa (relative error 2^-9 ~ 2e-3 each); against fp32
    arithmetic on the same rounded inputs the loss agrees within 1e-3 and each gradient within 1e-2 in
    relative L2 norm (what is left is the rounding of logits and of each chunk's products). 50 rows in chunks
    of 16: every chunk's share of the weight gradient must be summed, not only the last one's."""
    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 500, (50,))
    t[::9] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, t, chunk=16)
    loss.backward()
    h_ref = h.detach().bfloat16().float().requires_grad_()
    w_ref = w.detach().bfloat16().float().requires_grad_()
    ref = F.cross_entropy(h_ref @ w_ref.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    for grad, expected in ((h.grad, h_ref.grad), (w.grad, w_ref.grad)):
        assert ((grad - expected).norm() / expected.norm()).item() < 1e-2


def test_loss_sum_counts_only_targets():
    m = tiny()
    x, y = torch.randint(0, 300, (2, 8)), torch.full((2, 8), IGNORE_INDEX)
    assert m(x, y, reduction="sum").item() == 0.0
    assert m(x, y).item() == 0.0  # mean over zero targets is 0, not NaN


def test_kv_cache_greedy_equals_no_cache_and_batching():
    m = tiny().eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]]
    cached = m.generate(prompts, 12, temperature=0)
    uncached = m.generate(prompts, 12, temperature=0, use_cache=False)
    one_by_one = [m.generate([p], 12, temperature=0)[0] for p in prompts]
    assert cached == uncached == one_by_one
    # greedy continuation == argmax of the full forward pass, step by step
    seq = list(prompts[0])
    for token in cached[0][:5]:
        assert token == int(m(torch.tensor([seq]))[0, -1].argmax())
        seq.append(token)


def test_generation_stops_at_eos_per_sequence():
    m = tiny().eval()
    prompts = [[5, 6, 7], [9]]
    free = m.generate(prompts, 10, temperature=0)
    eos = free[0][3]  # pretend the 4th token of sequence 0 is eos
    out = m.generate(prompts, 10, temperature=0, eos_id=eos)
    assert out[0] == free[0][: free[0].index(eos)]
    assert out[1] == (free[1][: free[1].index(eos)] if eos in free[1] else free[1])


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    history, ok = torch.tensor([[0]]), torch.tensor([[True]])
    g = torch.Generator().manual_seed(0)
    top1 = {int(sample(logits, history, ok, 1.0, top_k=1, generator=g)) for _ in range(20)}
    assert top1 == {0}
    nucleus = {int(sample(logits, history, ok, 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert nucleus == {0}  # p(token 0) = 0.64 >= 0.5 on its own
    assert int(sample(logits, history, ok, 0)) == 0
    # repetition penalty: token 0 was seen, dividing its logit by 3 makes token 1 the greedy pick
    assert int(sample(logits, history, ok, 0, repetition_penalty=3.0)) == 1


def test_repetition_penalty_reduces_repeats():
    m = tiny().eval()
    prompt = [[5, 6, 7, 5, 6, 7]]
    plain = m.generate(prompt, 30, temperature=0)[0]
    penalised = m.generate(prompt, 30, temperature=0, repetition_penalty=50.0)[0]
    assert len(set(penalised)) > len(set(plain))


def test_prompt_too_long_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny().generate([[1] * 60], 10)


def test_loss_kernel_gradient_in_place():

    logits = torch.randn(6, 50, dtype=torch.float64).float()
    targets = torch.randint(0, 50, (6,))
    valid = torch.tensor([True, True, False, True, True, True])
    x = logits.clone().requires_grad_()
    ref = F.cross_entropy(x[valid], targets[valid], reduction="sum")
    ref.backward()
    grad = logits.clone()
    loss = xent_grad_(grad, targets, valid)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, x.grad)
    bf16 = logits.bfloat16()
    loss16 = xent_grad_(bf16, targets, valid)  # bf16 logits: fp32 softmax in a scratch buffer
    torch.testing.assert_close(
        loss16, F.cross_entropy(logits.bfloat16().float()[valid], targets[valid], reduction="sum")
    )
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), x.grad, atol=1e-2)


def test_tied_weight_gradient_equals_plain_autograd():
    """TiedEmbedding merges the lookup's and the head's gradients itself; the result must equal
    plain autograd over F.embedding + F.linear on one shared leaf, through both heads."""
    m = tiny()
    x, y = torch.randint(0, 300, (3, 12)), torch.randint(0, 300, (3, 12))
    x[0, :4] = 7  # repeated tokens: their rows of the lookup gradient add up
    m(x, y).backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    weight = m.tok_embeddings.weight
    h = F.embedding(x, weight)
    cos, sin = m.rope_cos[:12], m.rope_sin[:12]
    for layer in m.layers:
        h = layer(h, cos, sin)
    ref = F.cross_entropy(F.linear(m.norm(h), weight).flatten(0, 1), y.flatten())
    ref.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-7)


def test_tied_embedding_gradient_with_unused_or_expanded_head_gradient():
    """The in-place add needs a fresh head gradient; an unused head (zeros) or one autograd
    expands from a scalar (head.sum()) must still give the right sum."""

    w = torch.randn(10, 4, requires_grad=True)
    tokens = torch.tensor([[1, 1, 3]])
    rows, _ = TiedEmbedding.apply(w, tokens)
    rows.sum().backward()
    expected = torch.zeros(10, 4)
    expected[1], expected[3] = 2.0, 1.0
    torch.testing.assert_close(w.grad, expected)
    w.grad = None
    rows, head = TiedEmbedding.apply(w, tokens)
    (rows.sum() + head.sum()).backward()
    torch.testing.assert_close(w.grad, expected + 1.0)


@pytest.mark.parametrize("autocast", [False, True])
def test_backward_allocates_no_vocab_sized_tensor(autocast):
    """The loss's forward forms the head's (vocab, dim) gradient; backward only scales it and adds
    the lookup's rows into it. A dense lookup gradient (F.embedding's backward) or a summed copy
    would be a fresh (vocab, dim) tensor, which on CPU costs more than the rest of that backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FreshVocabTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {
                a.data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
            }
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.shape == (300, 64) and t.data_ptr() not in inputs:
                    self.ops.append(str(func))
            return out

    m = tiny()
    x = torch.randint(0, 300, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = m(x, x)
    with FreshVocabTensors() as seen:
        loss.backward()
    assert seen.ops == []
    assert m.tok_embeddings.weight.grad.shape == (300, 64)


def test_bf16_softmax_blocks_give_the_same_gradient(monkeypatch):
    """bf16 logits go through the fp32 softmax a few rows at a time: any block size, same result."""
    import lm_head

    torch.manual_seed(0)
    logits = (torch.randn(7, 50) * 3).bfloat16()
    targets = torch.randint(0, 50, (7,))
    valid = torch.tensor([True, False, True, True, True, False, True])
    whole = logits.clone()
    whole_loss = xent_grad_(whole, targets, valid)
    monkeypatch.setattr(lm_head, "SOFTMAX_BLOCK_BYTES", 2 * 4 * 50)  # 2 rows per block: 4 blocks, the last one short
    blocked = logits.clone()
    blocked_loss = xent_grad_(blocked, targets, valid)
    assert torch.equal(blocked, whole)  # each row's gradient is its own: bit for bit
    torch.testing.assert_close(blocked_loss, whole_loss, rtol=1e-6, atol=0)  # the sum only in another order
    ref = F.cross_entropy(logits.float()[valid], targets[valid], reduction="sum")
    torch.testing.assert_close(blocked_loss, ref)
    assert (blocked[~valid] == 0).all()


def test_two_forwards_then_one_backward():
    """The head reuses scratch buffers between calls; what backward needs must not be among them."""
    m = tiny()
    x1, y1, x2, y2 = (torch.randint(0, 300, (2, 8)) for _ in range(4))
    (m(x1, y1) + 2 * m(x2, y2)).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits1, logits2 = m(x1), m(x2)
    (
        F.cross_entropy(logits1.flatten(0, 1), y1.flatten()) + 2 * F.cross_entropy(logits2.flatten(0, 1), y2.flatten())
    ).backward()
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_model_trains_like_eager():
    m, c = tiny(), tiny()
    c.compile_for_training()
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    lm, lc = m(x, y), c(x, y)
    lm.backward()
    lc.backward()
    torch.testing.assert_close(lm, lc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.tok_embeddings.weight.grad, c.tok_embeddings.weight.grad, rtol=1e-4, atol=1e-6)
