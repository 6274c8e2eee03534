"""From a checkpoint and text prompts to answers: loading, the prompt (chat template or plain
continuation), batched and streamed generation. chat.py and eval.py are its command lines.

Modes. An SFT checkpoint (phase "sft") answers through the chat template, dataset_sft.render: every
earlier turn as `prompt <bos> answer <eos>`, then the new prompt and <bos>, after which the model
writes the answer and ends it with <eos>. Any other checkpoint is a pretrained model: it continues
the text (earlier turns, if any, are plain text in front of it).

    from inference import load, answer
    model, tok, ckpt, mode = load("out/sft/ckpt.pt")
    answer(model, tok, ["感冒了怎么办？"], mode=mode, temperature=0)      # -> ["..."]
"""

import sys
from pathlib import Path

import torch

from chatglm_tokenizer import DEFAULT_DIR, load_tokenizer
from checkpoint import load_model
from dataset_sft import fit_turns, render

MODES = ("chat", "continue")
DEFAULTS = dict(max_new_tokens=256, temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.1)


def resolve_device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name



def resolve_dtype(name, device):
    """auto: bf16 on a GPU that has it (fast, and plenty for sampling), fp32 elsewhere."""
    if name == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]



def default_mode(ckpt):
    return "chat" if ckpt.get("phase") == "sft" else "continue"



def load(ckpt_path, tokenizer=DEFAULT_DIR, device="cpu", dtype="float32"):
    """(model, tokenizer, checkpoint dict, default mode). `tokenizer` is a path or a loaded tokenizer;
    checkpoint.load_model refuses missing files, mismatched weights and a different tokenizer."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    device = resolve_device(device)
    model, ckpt = load_model(ckpt_path, device, tok)
    return model.to(resolve_dtype(dtype, device)), tok, ckpt, default_mode(ckpt)



def build_prompt(tokenizer, prompt, history=(), mode="chat", budget=None):
    """(ids fed to the model, number of oldest history turns dropped to fit `budget` ids).

    chat: dataset_sft.render over the history turns plus (prompt, None), so the ids end with <bos>;
    too long, dataset_sft.fit_turns drops the oldest turns, then the start of the prompt.
    continue: each earlier turn as the text "prompt+answer", then the prompt; too long, the oldest
    turns go, then the start of the text."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    history = list(history or ())
    if budget is not None and budget < 2:
        raise ValueError(f"no room for a prompt: {budget} ids left (lower max_new_tokens)")
    if mode == "chat":
        encoded = tokenizer.encode_batch([text for turn in history for text in turn] + [prompt])
        turns = [(encoded[2 * i], encoded[2 * i + 1]) for i in range(len(history))] + [(encoded[-1], None)]
        fitted = turns if budget is None else fit_turns(turns, budget)
        return render(fitted, tokenizer.bos_id, tokenizer.eos_id)[0], len(turns) - len(fitted)
    pieces = tokenizer.encode_batch([q + a for q, a in history] + [prompt])
    dropped = 0
    while budget is not None and len(pieces) > 1 and sum(map(len, pieces)) > budget:
        pieces.pop(0)
        dropped += 1
    ids = [i for piece in pieces for i in piece]
    return (ids if budget is None else ids[-budget:]), dropped



def sampling_kwargs(model, seed, sampling):
    """The keyword arguments of Transformer.stream: a seeded generator on the model's device."""
    sampling = {k: v for k, v in sampling.items() if v is not None}
    if seed is not None:
        sampling["generator"] = torch.Generator(model.rope_cos.device).manual_seed(seed)
    return sampling



def answer_ids(model, tokenizer, prompts, history=None, mode="chat", max_new_tokens=DEFAULTS["max_new_tokens"],
               seed=None, **sampling):
    """New ids per prompt (cut before <eos>), the prompts generated together as one left-padded batch.
    `history` [(prompt, answer), ...] is put before every prompt. sampling: temperature, top_k, top_p,
    repetition_penalty, use_cache: model.stream's arguments, with its defaults (temperature 1, no
    top-k/top-p, no penalty); the command line's defaults are DEFAULTS."""
    budget = model.args.max_seq_len - max_new_tokens
    ids = [build_prompt(tokenizer, p, history, mode, budget)[0] for p in prompts]
    return model.generate(ids, max_new_tokens, eos_id=tokenizer.eos_id, **sampling_kwargs(model, seed, sampling))



def answer(model, tokenizer, prompts, history=None, mode="chat", max_new_tokens=DEFAULTS["max_new_tokens"],
           seed=None, **sampling):
    """The answers (text) to a list of prompts; see answer_ids."""
    outputs = answer_ids(model, tokenizer, prompts, history, mode, max_new_tokens, seed, **sampling)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]



class TextDecoder:
    """Text pieces for a stream of token ids, given one id at a time: the decoded growing list minus
    what was already given. A trailing U+FFFD means a multi-byte character whose bytes (byte-fallback
    pieces) are still coming, so it waits for them instead of giving a replacement character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def _new_text(self, text):
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def push(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._new_text(text)

    def finish(self):
        """What is still held back at the end (a generation cut inside a character)."""
        return self._new_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))



def incremental_text(tokenizer, ids):
    """TextDecoder over an iterable of ids: yields the non-empty pieces."""
    decoder = TextDecoder(tokenizer)
    for token in ids:
        piece = decoder.push(token)
        if piece:
            yield piece
    piece = decoder.finish()
    if piece:
        yield piece



def stream_answer(model, tokenizer, prompt_ids, max_new_tokens=DEFAULTS["max_new_tokens"], seed=None, **sampling):
    """Text pieces of the answer to one prompt (ids from build_prompt), as they are generated."""
    def tokens():
        for step in model.stream([prompt_ids], max_new_tokens, eos_id=tokenizer.eos_id, **sampling_kwargs(model, seed, sampling)):
            token = int(step[0])
            if token == tokenizer.eos_id:
                return
            yield token
    yield from incremental_text(tokenizer, tokens())



def add_sampling_args(parser):
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"],
                        help="at most max_seq_len // 2 (reduced with a note)")
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0: greedy")
    parser.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="0: off")
    parser.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="1: off")
    parser.add_argument("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"], help="1: off")
    parser.add_argument("--seed", type=int, default=None)



def sampling_from(args):
    return dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty)



def fit_max_new_tokens(max_new_tokens, model):
    """At most half the context, so that the other half is left for the prompt."""
    limit = model.args.max_seq_len // 2
    if max_new_tokens > limit:
        print(f"note: --max-new-tokens {max_new_tokens} reduced to {limit} (max_seq_len {model.args.max_seq_len})",
              file=sys.stderr)
    return min(max_new_tokens, limit)
