"""Continuous batching: concurrent generations decoded together, one forward per step for all of them.

    engine = Engine(model, eos_id=tok.eos_id, max_batch=16, max_queue=64).start()
    request = engine.submit(prompt_ids, max_new_tokens=64, on_event=print, temperature=0.7, top_p=0.9, seed=1)
    request.cancel()   # the client went away: its slot is free at the next step
    engine.stop()

A scheduler thread owns the model. Each of `max_batch` slots has its rows in a KV cache allocated
once (per layer: (max_batch, kv_heads, max_seq_len, head_dim)), its own position and its own
sampling settings. Between two decode steps the scheduler
  1. drops the rows whose request finished or was cancelled; the last active row moves into the
     hole, so the active rows are always slots 0..n-1 and a step slices the cache, never gathers it;
  2. admits waiting requests into free slots: the prompt alone is run through the model into its
     slot's cache (the prefill), which gives the request's first token;
  3. runs one forward of one token per active row, each row at its own position
     (model.hidden_states with a (n,) position tensor and a (n, 1, 1, keys) attention bias that is
     0 at each row's own keys and -inf elsewhere), then samples all rows at once, each with its own
     temperature / top-k / top-p / repetition penalty / seeded generator (model.sample's per-row
     settings).
A row attends only to its own keys, so greedy output does not depend on its neighbours.

Events go to the request's `on_event` from the scheduler thread: ("token", id) per new token, then
("done", "stop") at </s> (not sent as a token) or ("done", "length") after max_new_tokens, or
("error", message) if the model failed on this request.
"""

import collections
import sys
import threading
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import sample


def lm_head(weight):
    """F.linear(hidden, weight) for the LM head, the largest product of a small model's step. On CPU
    with oneDNN, several rows go through a copy of the weight packed once for oneDNN (on a 2-core AMD
    EPYC with AVX512, MKL's fp32 product of 4-64 rows with a 64,794-row head runs at a third to a fifth of
    that speed); one fp32 row stays with MKL's matrix-vector product, faster still. The copy costs
    the head's size in memory."""
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or not torch.backends.mkldnn.is_available()
    ):
        return lambda hidden: F.linear(hidden, weight)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)

    def product(hidden):
        if len(hidden) == 1 and weight.dtype == torch.float32:
            return F.linear(hidden, weight)
        return torch.ops.mkldnn._linear_pointwise(hidden, packed, None, "none", [], "")

    return product


class QueueFull(Exception):
    """max_queue requests are already waiting for a slot."""


@dataclass(eq=False)
class Request:
    prompt: list
    max_new_tokens: int
    on_event: object  # callable(kind, value), called from the scheduler thread
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    generated: int = 0  # new tokens so far (</s> not counted)
    length: int = 0  # ids in this row's cache
    last: int = 0  # the newest token: the input of the next step
    finished: bool = False
    cancelled: bool = False
    generator: object = field(default=None, repr=False)

    def cancel(self):
        """Stop generating; the scheduler frees the slot before its next step (no event follows)."""
        self.cancelled = True


class Engine:
    """Continuous batching over `max_batch` KV-cache slots, with at most `max_queue` requests waiting.
    The engine owns `model` from then on: on CPU it lays its weight matrices out column-major (the
    values are unchanged) and keeps a packed copy of the LM head."""

    def __init__(self, model, eos_id, max_batch=16, max_queue=64):
        self.model, self.eos_id = model.eval(), eos_id
        if model.rope_cos.device.type == "cpu":
            # matrices stored column-major, same values: a one-row step's matrix-vector products then
            # read W^T row by row, which MKL does ~1.7x faster; batched products cost the same
            for p in model.parameters():
                if p.dim() == 2:
                    p.data = p.data.t().contiguous().t()
        self.head = lm_head(model.tok_embeddings.weight)
        self.max_batch, self.max_queue = max_batch, max_queue
        args = model.args
        self.max_seq_len = args.max_seq_len
        self.device, dtype = model.rope_cos.device, model.tok_embeddings.weight.dtype
        shape = (max_batch, args.kv_heads, args.max_seq_len, args.head_dim)
        self.caches = [
            (torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in model.layers
        ]
        self.ids = torch.zeros(max_batch, args.max_seq_len, dtype=torch.long, device=self.device)  # penalty history
        # attention bias: 0 at the row's own keys, -inf elsewhere (SDPA on CPU is far slower with a bool mask)
        self.bias = torch.full((max_batch, args.max_seq_len), float("-inf"), dtype=dtype, device=self.device)
        self.rows = []  # active requests; rows[i] owns slot i
        self.waiting = collections.deque()
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.settings = None  # per-row sampling arguments, rebuilt when the rows change
        self.served = self.tokens_out = 0

    # ---- the caller's side (any thread) ----
    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()

    def submit(self, prompt, max_new_tokens, on_event, **sampling):
        """Queue a generation; returns its Request. Raises QueueFull, or ValueError for a prompt that
        does not fit (at least one id, and prompt + max_new_tokens <= max_seq_len)."""
        if not prompt or max_new_tokens < 1 or len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} ids) + max_new_tokens ({max_new_tokens}) must fit in "
                f"max_seq_len {self.max_seq_len}, with at least one id each"
            )
        request = Request(list(prompt), max_new_tokens, on_event, **sampling)
        if request.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(request.seed)
        with self.wakeup:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for one of {self.max_batch} slots")
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def stats(self):
        return {
            "active": len(self.rows),
            "waiting": len(self.waiting),
            "slots": self.max_batch,
            "max_queue": self.max_queue,
            "served": self.served,
            "tokens": self.tokens_out,
        }

    # ---- the scheduler thread ----
    def _run(self):
        with torch.inference_mode():
            while True:
                with self.wakeup:
                    while not self.stopping and not self.rows and not self.waiting:
                        self.wakeup.wait()
                    if self.stopping:
                        break
                    admitted = []
                    while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                        request = self.waiting.popleft()
                        if not request.cancelled:
                            admitted.append(request)
                self._drop_finished()
                for request in admitted:
                    self._guarded(self._prefill, [request], request)
                self._drop_finished()
                if self.rows:
                    self._guarded(self._step, list(self.rows))
                    self._drop_finished()
        for request in list(self.rows) + list(self.waiting):
            self._finish(request, "error", "the server is shutting down")

    def _guarded(self, work, requests, *args):
        """Run a forward; if it raises, the requests in it get an error event and the engine goes on."""
        try:
            work(*args)
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            traceback.print_exc(file=sys.stderr)
            for request in requests:
                self._finish(request, "error", f"generation failed: {type(err).__name__}: {err}")

    def _prefill(self, request):
        slot, n = len(self.rows), len(request.prompt)
        self.rows.append(request)
        self.settings = None
        prompt = torch.tensor(request.prompt, dtype=torch.long, device=self.device)
        self.ids[slot, :n] = prompt
        self.bias[slot] = float("-inf")
        self.bias[slot, :n] = 0.0
        caches = [(k[slot : slot + 1], v[slot : slot + 1]) for k, v in self.caches]
        hidden, _ = self.model.hidden_states(prompt[None], None, caches, 0)
        logits = self.head(hidden[:, -1]).float()
        token = sample(
            logits,
            self.ids[slot : slot + 1, :n],
            self.bias[slot : slot + 1, :n] == 0,
            request.temperature,
            request.top_k,
            request.top_p,
            request.repetition_penalty,
            request.generator,
        )
        request.length = n
        self._emit(request, int(token))

    def _step(self):
        rows, n = self.rows, len(self.rows)
        pos = torch.tensor([[r.length] for r in rows], device=self.device)  # (n, 1): where each row's token goes
        tokens = torch.tensor([[r.last] for r in rows], device=self.device)
        self.ids[:n].scatter_(1, pos, tokens)
        self.bias[:n].scatter_(1, pos, 0.0)
        keys = max(r.length for r in rows) + 1
        caches = [(k[:n], v[:n]) for k, v in self.caches]
        bias = self.bias[:n, :keys]
        hidden, _ = self.model.hidden_states(tokens, bias[:, None, None], caches, pos[:, 0], pos)
        logits = self.head(hidden[:, -1]).float()
        chosen = sample(logits, self.ids[:n, :keys], bias == 0, **self._settings())
        for request, token in zip(rows, chosen.tolist()):
            request.length += 1
            self._emit(request, token)

    def _settings(self):
        """model.sample's per-row arguments; a setting that is the same plain value on every row
        (all greedy, no penalty...) is passed as that value, which takes sample's cheaper path."""
        if self.settings is None:

            def column(name, dtype):
                values = [getattr(r, name) for r in self.rows]
                if len(set(values)) == 1:
                    return values[0]
                return torch.tensor(values, dtype=dtype, device=self.device)

            generators = [r.generator for r in self.rows]
            self.settings = dict(
                temperature=column("temperature", torch.float32),
                top_k=column("top_k", torch.long),
                top_p=column("top_p", torch.float32),
                repetition_penalty=column("repetition_penalty", torch.float32),
                generator=generators if any(g is not None for g in generators) else None,
            )
        return self.settings

    def _emit(self, request, token):
        if request.finished or request.cancelled:
            return
        if token == self.eos_id:
            self._finish(request, "done", "stop")
            return
        request.generated += 1
        request.last = token
        self.tokens_out += 1
        request.on_event("token", token)
        if request.generated >= request.max_new_tokens:
            self._finish(request, "done", "length")

    def _finish(self, request, kind, value):
        if not request.finished:
            request.finished = True
            self.served += kind == "done"
            if not request.cancelled:
                request.on_event(kind, value)

    def _drop_finished(self):
        i = 0
        while i < len(self.rows):
            request = self.rows[i]
            if not (request.finished or request.cancelled):
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:  # move the last row into the hole: active rows stay slots 0..n-1
                moved, end = self.rows[last], self.rows[last].length
                for k, v in self.caches:
                    k[i, :, :end] = k[last, :, :end]
                    v[i, :, :end] = v[last, :, :end]
                self.ids[i, :end] = self.ids[last, :end]
                self.bias[i] = self.bias[last]
                self.rows[i] = moved
            self.rows.pop()
            self.settings = None
