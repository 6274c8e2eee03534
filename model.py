"""Llama-2 in one file: RoPE, RMSNorm, SwiGLU, grouped-query attention, SDPA, tied embeddings (the
head and its loss live in lm_head.py), and KV-cache generation.

Weight names and the RoPE layout (rotate-half, as in Hugging Face's Llama) are chosen so that
export_hf.py copies tensors one to one into LlamaForCausalLM.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm_head import TiedEmbeddingHead


@dataclass
class ModelArgs:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention; None: = n_heads
    vocab_size: int = 64794  # ChatGLM2: 64789 pieces + 5 specials
    hidden_dim: int | None = None  # SwiGLU width; None: 8/3 * dim rounded up to multiple_of
    multiple_of: int = 64
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self):
        if self.hidden_dim:
            return self.hidden_dim
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under autocast: bf16 sums of squares lose too much.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim, max_len, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos/sin: (T, hd) or (B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        assert args.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # (k_cache, v_cache): (B, n_kv_heads, max_len, hd), filled up to pos
            if isinstance(pos, int):  # every row at the same position; keys up to pos + T
                cache[0][:, :, pos : pos + T] = k
                cache[1][:, :, pos : pos + T] = v
                end = pos + T
            else:  # pos: (B,) a one-token step of rows at their own positions; the mask picks each row's keys
                # rows of the cache seen as (B * n_kv_heads * max_len, hd): index_copy_ is the write that stays
                # fast on CPU (bf16 scatter_ and index_put_ with two threads take milliseconds)
                heads = torch.arange(B * self.n_kv_heads, device=x.device)
                at = heads * cache[0].shape[2] + pos.repeat_interleave(self.n_kv_heads)
                cache[0].view(-1, self.head_dim).index_copy_(0, at, k.flatten(0, 2))
                cache[1].view(-1, self.head_dim).index_copy_(0, at, v.flatten(0, 2))
                end = mask.shape[-1]
            k, v = cache[0][:, :, :end], cache[1][:, :, :end]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask=None, cache=None, pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = TiedEmbeddingHead(args.vocab_size, args.dim)  # the embedding and the LM head
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

        # a head saved as nn.Linear keeps the tied weight a second time as output.weight: the same tensor
        self.register_load_state_dict_pre_hook(
            lambda module, state, prefix, *_: state.pop(prefix + "output.weight", None)
        )

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, TiedEmbeddingHead)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, tokens, mask=None, caches=None, pos=0, positions=None, embeds=None):
        """Final-norm hidden states (B, T, dim) and the LM head's weight to apply to them.
        With caches, `pos` is where the new keys go: an int for the whole batch, or a (B,) tensor for
        one token per row at its own position (continuous batching: `positions` = pos[:, None] and a
        (B, 1, 1, keys) attention bias, -inf at the keys that are not the row's).
        embeds: (where, rows), input embeddings of another modality (image features, vlm.py) that
        replace the token embeddings at the positions where `where` (B, T) is True, in row-major order."""
        T = tokens.shape[1]
        if positions is None:
            cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        else:  # per-row positions (left-padded generation batches)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        h, head_weight = self.tok_embeddings.embed(tokens)
        if embeds is not None:
            where, rows = embeds
            h = h.masked_scatter(where[..., None], rows.to(h.dtype))
        h = self.dropout(h)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if caches is None else caches[i], pos)
        return self.norm(h), head_weight

    def forward(self, tokens, targets=None, reduction="mean", embeds=None):
        """No targets: logits (B, T, vocab). With targets (B, T): the loss over targets != -100,
        reduced by "mean", "sum" (the trainer divides by the global token count) or "none" (B, T).
        embeds: see hidden_states."""
        h, head_weight = self.hidden_states(tokens, embeds=embeds)
        if targets is None:
            return self.tok_embeddings.logits(h, head_weight)
        return self.tok_embeddings.loss(h, head_weight, targets, reduction)

    def compile_for_training(self):
        """torch.compile the blocks: one graph, reused by every layer (the head stays eager: its cost is
        matmuls and one softmax, already single kernels)."""
        for layer in self.layers:
            layer.compile()

    # ---- size and speed ----
    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.tok_embeddings.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight (forward + backward) incl. the LM head matmul,
        plus attention scores (PaLM appendix B)."""
        a = self.args
        return 6 * self.num_params() + 12 * a.n_layers * a.dim * seq_len

    # ---- generation ----
    @torch.no_grad()
    def stream(
        self,
        prompts,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        repetition_penalty=1.0,
        eos_id=None,
        use_cache=True,
        generator=None,
        embeds_for=None,
    ):
        """Yields a (B,) tensor of new token ids per step for a batch of prompts (lists of ids) of
        any lengths. Prompts are left-padded; a sequence that produced eos_id yields eos_id after.
        temperature 0 is greedy. use_cache=False recomputes the whole sequence every step.
        embeds_for: (token_id, rows): the prompts' positions holding token_id take these input
        embeddings instead, in order (prompt by prompt); generated tokens never do."""
        device, B = self.rope_cos.device, len(prompts)
        width = max(len(p) for p in prompts)
        if width + max_new_tokens > self.args.max_seq_len:
            raise ValueError(
                f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {self.args.max_seq_len}"
            )
        S = width + max_new_tokens
        pad = torch.tensor([width - len(p) for p in prompts], device=device)
        tokens = torch.zeros(B, S, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, pad[i] : width] = torch.tensor(p, dtype=torch.long, device=device)
        positions = (torch.arange(S, device=device)[None] - pad[:, None]).clamp_min(0)
        key_ok = torch.arange(S, device=device)[None] >= pad[:, None]  # (B, S): not left padding
        # causal, minus the left padding; a padding row sees itself so that no softmax row is empty
        # (an all-masked row gives NaN, which would reach real rows through the cached values).
        allowed = torch.ones(S, S, dtype=torch.bool, device=device).tril()[None] & key_ok[:, None, :]
        allowed |= torch.eye(S, dtype=torch.bool, device=device)[None]
        # as an additive bias: SDPA on CPU is many times slower with a bool mask
        dtype = self.tok_embeddings.weight.dtype
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        caches = None
        if use_cache:
            shape = (B, self.args.kv_heads, S, self.args.head_dim)
            caches = [
                (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in self.layers
            ]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        start, end = 0, width
        for _ in range(max_new_tokens):
            if not use_cache:
                start = 0
            mask = bias[:, None, start:end, :end]  # (B, 1, T, S)
            embeds = None
            if embeds_for is not None and start < width:  # the step that (re)reads the prompts
                where = (tokens[:, start:end] == embeds_for[0]) & (torch.arange(start, end, device=device) < width)
                embeds = (where, embeds_for[1])
            h, head_weight = self.hidden_states(
                tokens[:, start:end], mask, caches, start, positions[:, start:end], embeds
            )
            logits = F.linear(h[:, -1], head_weight).float()
            next_token = sample(
                logits, tokens[:, :end], key_ok[:, :end], temperature, top_k, top_p, repetition_penalty, generator
            )
            if eos_id is not None:
                next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
                done |= next_token == eos_id
            tokens[:, end] = next_token
            yield next_token
            if eos_id is not None and bool(done.all()):
                return
            start, end = end, end + 1

    def generate(self, prompts, max_new_tokens, eos_id=None, **sampling):
        """Lists of new ids per prompt, cut before eos_id."""
        steps = [t.tolist() for t in self.stream(prompts, max_new_tokens, eos_id=eos_id, **sampling)]
        outputs = [list(seq) for seq in zip(*steps)] if steps else [[] for _ in prompts]
        return [seq[: seq.index(eos_id)] if eos_id in seq else seq for seq in outputs]


def sample(
    logits, history, history_ok, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, generator=None
):
    """Next token ids (B,) from last-position logits (B, V). Every setting is one number for the batch
    or a (B,) tensor with one per row (the serving engine's rows each have their own): temperature 0
    is greedy, top_k 0 / None and top_p 1 / None are off, repetition_penalty 1 is off. generator: one
    torch.Generator for the batch, or a list with one per row (None: torch's global generator)."""

    def per_row(value, dtype):
        return torch.as_tensor(value, dtype=dtype, device=logits.device).expand(len(logits))[:, None]

    if torch.is_tensor(repetition_penalty) or repetition_penalty != 1.0:  # CTRL: seen tokens pushed towards unlikely
        penalty = per_row(repetition_penalty, logits.dtype)
        seen = torch.zeros_like(logits).scatter_add_(1, history, history_ok.to(logits.dtype)) > 0
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if not torch.is_tensor(temperature) and temperature == 0:
        return logits.argmax(-1)
    temperature = per_row(temperature, logits.dtype)
    greedy = temperature == 0
    logits = logits / torch.where(greedy, 1.0, temperature)
    if torch.is_tensor(top_k) or top_k:
        k = per_row(top_k, torch.long)
        largest = int(k.max())
        if largest > 0:
            kth = torch.topk(logits, min(largest, logits.shape[-1])).values.gather(1, (k.clamp(1, largest) - 1))
            logits = logits.masked_fill((k > 0) & (logits < kth), float("-inf"))
    if torch.is_tensor(top_p) or (top_p is not None and top_p < 1.0):
        p = per_row(top_p, logits.dtype)
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs > p) & (p < 1.0)  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # inverse-CDF sampling, so that each row can draw from its own generator
    if isinstance(generator, (list, tuple)):
        uniform = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generator])
    else:
        uniform = torch.rand(len(logits), generator=generator, device=logits.device)
    cdf = logits.softmax(-1).cumsum(-1)
    drawn = torch.searchsorted(cdf, (1.0 - uniform[:, None]) * cdf[:, -1:]).clamp_max(logits.shape[-1] - 1)
    return torch.where(greedy, logits.argmax(-1, keepdim=True), drawn).squeeze(1)
