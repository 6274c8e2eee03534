"""The tied LM head: the token embedding and the output layer that shares its weight, as one module that
owns the lookup, the logits, the loss and the buffers they reuse.

With a 64,794-token vocabulary the head is most of a small model's work (82% of the training FLOPs at
d256 L4), and plain autograd spends it badly: (B*T, vocab) fp32 logits, their softmax and its gradient as
three more tensors of that size, a dense zeroed gradient for the embedding lookup plus a summed copy, all
freshly allocated each step. Two paths, chosen by `loss_path` (the trainer's `lm_loss` key):

  "chunked" (default): LinearCrossEntropy forms the logits `chunk` rows at a time in a reused buffer, takes
      the softmax in fp32 and turns the logits into their gradient in place, and accumulates the weight's
      gradient in fp32 across chunks; the logits are never kept for backward, nor recomputed. TiedEmbedding
      adds the lookup's rows into that same (vocab, dim) gradient, so the tied weight's two gradients meet
      without a dense lookup gradient. Matmuls run in the autocast dtype (bf16 where it is fast).
  "reference": F.cross_entropy over full fp32 logits, as nanoGPT computes it: the oracle the tests hold the
      chunked path to, and a fallback.

What is proven where: on CPU, in fp32 and under bf16 autocast, the chunked path's loss and gradients equal
the reference's (tests/test_model.py, within bf16's rounding for bf16) and it allocates no vocab-sized
tensor in backward; `python bench.py train` measures it against the full-logit baseline. On CUDA it has
not run yet: gpu_check.py's "loss kernel" item compares it with F.cross_entropy there, and whether the
chunked path or the reference is the faster default on a GPU is to be decided by that measurement.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value count neither in the loss sum nor in its denominator
LOSS_PATHS = ("chunked", "reference")


class TiedEmbedding(torch.autograd.Function):
    """(weight[tokens], an alias of weight for the LM head), so that the tied weight's two
    gradients meet here rather than in autograd's sum: backward adds the lookup's rows into the
    head's dense (vocab, dim) gradient in place. Autograd alone would allocate a zeroed dense
    lookup gradient and another (vocab, dim) buffer for the sum, every step; on CPU those fresh
    pages cost more than the rest of the embedding's backward. The in-place add relies on the
    head's gradient being a fresh tensor, which the model's two heads (the chunked loss, F.linear)
    and an unused head (autograd materialises zeros) hand back; an expanded one is added out of place."""

    @staticmethod
    def forward(ctx, weight, tokens):
        ctx.save_for_backward(tokens)
        return weight[tokens], weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_rows, grad_head):
        (tokens,) = ctx.saved_tensors
        add = grad_head.index_add_ if grad_head.is_contiguous() else grad_head.index_add
        return add(0, tokens.flatten(), grad_rows.flatten(0, -2).to(grad_head.dtype)), None


class Scratch:
    """Buffers kept between calls, owned by one head (freed with it; two models never share one). On CPU,
    allocating a fresh (chunk, vocab) tensor costs more than the softmax over it (the kernel maps and
    zero-fills new pages), so the head reuses its buffers. An empty Scratch() per call is plain allocation."""

    def __init__(self):
        self.buffers = {}

    def __call__(self, name, shape, dtype, device):
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < math.prod(shape):
            buf = self.buffers[key] = torch.empty(math.prod(shape), dtype=dtype, device=device)
        return buf[: math.prod(shape)].view(shape)


SOFTMAX_BLOCK_BYTES = 16 << 20  # CPU: fp32 rows per softmax block, sized to stay in cache across its passes


def xent_grad_(logits, targets, valid, scratch=None):
    """Summed cross-entropy of the rows of `logits` (rows with valid=False count nothing); the
    logits are overwritten with the loss's gradient with respect to them. The softmax runs in fp32;
    the loss is -log p(target), exact to fp32 rounding unless p underflows (a loss above 69).
    bf16 logits are converted into fp32 a block of rows at a time; on CPU the block stays in cache,
    so converting, softmax, gradient and converting back cost about one pass over memory, not five."""
    if logits.dtype == torch.float32:
        return _xent_grad_fp32_(logits, targets, valid)
    scratch = scratch or Scratch()
    n, vocab = logits.shape
    block = max(1, SOFTMAX_BLOCK_BYTES // (4 * vocab)) if logits.device.type == "cpu" else n
    loss = 0.0
    for start in range(0, n, block):
        rows = logits[start : start + block]
        probs = scratch("probs", rows.shape, torch.float32, logits.device).copy_(rows)
        loss = loss + _xent_grad_fp32_(probs, targets[start : start + block], valid[start : start + block])
        rows.copy_(probs)
    return loss


def _xent_grad_fp32_(probs, targets, valid):
    torch.softmax(probs, dim=-1, out=probs)
    rows = torch.arange(len(targets), device=targets.device)
    loss = -(torch.log(probs[rows, targets].clamp_min(1e-30)) * valid).sum()
    probs[rows, targets] -= 1.0  # d(-log softmax_t)/d logits = softmax - onehot(t)
    if not valid.all():
        probs[~valid] = 0.0
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), computed `chunk` rows at a time.

    Only a (chunk, vocab) block of logits exists at once, in a reused buffer. The gradients are
    formed in the same pass (softmax - onehot, times hidden / weight) and scaled by the upstream
    scalar in backward, so the logits are never recomputed either. Matmuls run in `dtype` (bf16
    under autocast); the softmax and the weight-gradient accumulator stay fp32. What is saved for
    backward is freshly allocated: several forwards may precede one backward. A frozen weight (LoRA) gets
    no gradient, and its (vocab, dim) product is not formed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype, scratch):
        device, n, vocab = hidden.device, hidden.shape[0], weight.shape[0]
        rows = min(chunk, n)
        w = weight if weight.dtype == dtype else scratch("weight", weight.shape, dtype, device).copy_(weight)
        logits = scratch("logits", (rows, vocab), dtype, device)
        want_weight = ctx.needs_input_grad[1]
        grad_weight = torch.empty(weight.shape if want_weight else 0, dtype=torch.float32, device=device)
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, rows):
            h = hidden[start : start + rows].to(dtype)
            t = targets[start : start + rows]
            g = torch.mm(h, w.t(), out=logits[: len(h)])
            total += xent_grad_(g, t.clamp_min(0), t != IGNORE_INDEX, scratch)
            grad_hidden[start : start + rows] = g @ w
            if not want_weight:
                continue
            if dtype == torch.float32:
                grad_weight.addmm_(g.t(), h, beta=0 if start == 0 else 1)  # beta=0: the empty buffer is ignored
            else:  # CPU has no bf16 x bf16 -> fp32 mm: the chunk's product is rounded, the sum over chunks is fp32
                product = torch.mm(g.t(), h, out=scratch("grad_weight_chunk", weight.shape, dtype, device))
                if start == 0:
                    grad_weight.copy_(product)
                else:  # fp32 += bf16 would allocate a converted (vocab, dim) copy: convert into a reused buffer
                    grad_weight += scratch("grad_weight_fp32", weight.shape, torch.float32, device).copy_(product)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.want_weight, ctx.used = weight.dtype, want_weight, False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # scaled in place: no second (vocab, dim) allocation. The price: one backward per forward
        if ctx.used:
            raise RuntimeError("backward through the chunked LM loss twice (retain_graph=True) is not supported")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype) if ctx.want_weight else None
        return grad_hidden.mul_(grad_total), grad_weight, None, None, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk=1024, reduction="sum", scratch=None):
    """Cross-entropy of the LM head over (N, dim) hidden states without (N, vocab) fp32 logits.
    reduction: "sum" (differentiable) or "none" (per-row losses, 0 at ignored rows; no grad).
    scratch: the caller's reused buffers (default: fresh ones)."""
    scratch = scratch or Scratch()
    dtype = (
        torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    )
    with torch.autocast(hidden.device.type, enabled=False):
        if reduction == "sum" and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return LinearCrossEntropy.apply(hidden, weight, targets, chunk, dtype, scratch)
        losses = []
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start : start + chunk].to(dtype) @ weight.to(dtype).t()).float()
            losses.append(
                F.cross_entropy(logits, targets[start : start + chunk], ignore_index=IGNORE_INDEX, reduction="none")
            )
        losses = torch.cat(losses)
        return losses.sum() if reduction == "sum" else losses


class TiedEmbeddingHead(nn.Module):
    """The (vocab, dim) weight shared by the token embedding and the LM head. `weight` keeps the state-dict
    name tok_embeddings.weight where Transformer holds this module, the name checkpoints and export_hf.py use."""

    def __init__(self, vocab_size, dim, chunk=1024, loss_path="chunked"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.chunk = chunk  # rows of the chunked loss: not architecture, so not in ModelArgs
        self.loss_path = loss_path
        self.scratch = Scratch()

    def embed(self, tokens):
        """(token rows, the head's weight): the weight comes back through TiedEmbedding so that the head's
        gradient and the lookup's meet there (see TiedEmbedding)."""
        return TiedEmbedding.apply(self.weight, tokens)

    def logits(self, hidden, head_weight):
        return F.linear(hidden, head_weight)

    def loss(self, hidden, head_weight, targets, reduction="mean"):
        """Cross-entropy of hidden states (B, T, dim) against targets (B, T), over targets != IGNORE_INDEX,
        reduced by "mean", "sum" (the trainer divides by the global target count) or "none" ((B, T), 0 at
        ignored targets; the head runs only on rows that have a target)."""
        if self.loss_path not in LOSS_PATHS:
            raise ValueError(f"loss_path must be one of {LOSS_PATHS}, not {self.loss_path!r}")
        flat_hidden, flat = hidden.flatten(0, 1), targets.flatten()
        if reduction == "none":
            keep = flat != IGNORE_INDEX
            losses = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
            losses[keep] = self._loss(flat_hidden[keep], head_weight, flat[keep], "none")
            return losses.view_as(targets)
        loss = self._loss(flat_hidden, head_weight, flat, "sum")
        return loss if reduction == "sum" else loss / (targets != IGNORE_INDEX).sum().clamp_min(1)

    def _loss(self, hidden, head_weight, targets, reduction):
        if self.loss_path == "chunked":
            return chunked_cross_entropy(hidden, head_weight, targets, self.chunk, reduction, self.scratch)
        logits = F.linear(hidden, head_weight).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
