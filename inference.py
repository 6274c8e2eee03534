"""From a checkpoint and text prompts to answers: loading, the prompt (chat template or plain
continuation), batched and streamed generation. chat.py and eval.py are its command lines.

Modes. An SFT checkpoint (phase "sft") answers through the chat template, dataset_sft.render: every
earlier turn as `prompt <bos> answer <eos>`, then the new prompt and <bos>, after which the model
writes the answer and ends it with <eos>. Any other checkpoint is a pretrained model: it continues
the text (earlier turns, if any, are plain text in front of it).

    from inference import load, answer
    model, tok, ckpt, mode = load("out/sft/ckpt.pt")
    answer(model, tok, ["感冒了怎么办？"], mode=mode, temperature=0)      # -> ["..."]
    model, tok, ckpt, mode = load("out/vlm/instruct/ckpt.pt")            # a vision-language checkpoint
    answer(model, tok, ["这张胸片有什么异常？"], images=["scan.png"], temperature=0)
    model, tok, ckpt, mode = load("out/pretrain/clinical/ckpt.pt", adapter="out/sft_lora/adapter")  # + LoRA

A LoRA adapter folder (lora.py; PEFT's format) is applied to the checkpoint it was trained on and folded into
its weights (lora.merge): the model runs as fast as one without adapters. Its phase (sft, dpo) sets the mode.

Images (vision-language checkpoints, vlm.py) go in front of the prompt, one "<image>" line each, as
LLaVA lays them out; each becomes the image's tokens.
"""

import argparse
import sys
from pathlib import Path

import torch

from chatglm_tokenizer import DEFAULT_DIR, load_tokenizer
from checkpoint import CheckpointError, load_model
from corpora import IMAGE_PLACEHOLDER
from dataset_sft import encode_turns, fit_turns, render
from precision import resolve
from vision import pixel_batch
from vlm import VLM, encode_texts, images_kept, is_vlm_file, load_vlm

MODES = ("chat", "continue")
DEFAULTS = dict(max_new_tokens=256, temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.1)


def resolve_device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def default_mode(ckpt):
    return "chat" if ckpt.get("phase") in ("sft", "dpo") else "continue"


def load(ckpt_path, tokenizer=DEFAULT_DIR, device="cpu", dtype="float32", purpose="generate", adapter=None):
    """(model, tokenizer, checkpoint dict, default mode). `tokenizer` is a path or a loaded tokenizer;
    checkpoint.load_model refuses missing files, mismatched weights and a different tokenizer. dtype "auto"
    is precision.resolve's choice for `purpose` ("generate" or "score"), announced on stderr. A
    vision-language checkpoint gives a vlm.VLM, which always chats. adapter: a LoRA folder trained on this
    checkpoint, merged in; the returned dict then carries the adapter's phase and step, and "adapter"."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    device = resolve_device(device)
    vision = is_vlm_file(ckpt_path)
    model, ckpt = load_vlm(ckpt_path, device, tok) if vision else load_model(ckpt_path, device, tok)
    if adapter:
        ckpt = with_adapter(model, ckpt, adapter, tok)
    choice = resolve(dtype, device, purpose, dim=model.args.dim, vocab=model.args.vocab_size)
    if dtype == "auto" or choice.reason != "as asked":
        print(f"dtype {choice}", file=sys.stderr)
    return model.to(choice.torch_dtype), tok, ckpt, "chat" if vision else default_mode(ckpt)


def with_adapter(model, ckpt, adapter, tok):
    """Fold the LoRA folder `adapter` into `model` (checked against its base `ckpt` and the tokenizer); returns
    the checkpoint dict as the adapter's run left it (phase, step, "adapter")."""
    import lora  # here: lora names its tensors after export_hf's, and export_hf imports this module

    info = lora.load_adapter(lora.language_model(model), adapter, ckpt)
    if info.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise CheckpointError(f"{adapter} was trained with another tokenizer than the one given")
    lora.merge(lora.language_model(model))
    return ckpt | lora.trained_as(info, ckpt) | {"adapter": str(adapter)}


def with_images(prompt, n_images):
    """The prompt with n images in front of it, one "<image>" line each (LLaVA's layout)."""
    return f"{IMAGE_PLACEHOLDER}\n" * n_images + prompt


def image_pixels(model, images):
    """(n, 3, H, W) pixels of images (paths, bytes or PIL images) for a VLM; None without images."""
    if not images:
        return None
    if not isinstance(model, VLM):
        raise ValueError("images need a vision-language checkpoint (vlm_train.py); this one is a text model")
    return pixel_batch(images, model.args.preprocess)


def fitted_images(model, ids, images):
    """The images `ids` still holds after fitting to the context: the latest ones (the oldest turns go first)."""
    if not isinstance(model, VLM):
        return []
    kept = images_kept(ids, model.args.image_token_id, model.args.image_tokens)
    if kept is None:
        raise ValueError(
            f"the prompt is too long for the {model.args.max_seq_len}-token context: its start would cut "
            "an image (lower max_new_tokens, or use fewer images)"
        )
    if kept > len(images):
        raise ValueError(f"the conversation has {kept} <image> placeholders but {len(images)} images")
    return list(images)[len(images) - kept :] if kept else []


def build_prompt(tokenizer, prompt, history=(), mode="chat", budget=None, model=None):
    """(ids fed to the model, number of oldest history turns dropped to fit `budget` ids).

    chat: dataset_sft.render over the history turns plus (prompt, None), so the ids end with <bos>;
    too long, dataset_sft.fit_turns drops the oldest turns, then the start of the prompt. For a VLM
    `model`, each "<image>" in the prompts becomes the image's tokens (vlm.encode_texts).
    continue: each earlier turn as the text "prompt+answer", then the prompt; too long, the oldest
    turns go, then the start of the text."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    history = [tuple(turn) for turn in history or ()]
    if not all(len(turn) == 2 and all(isinstance(text, str) for text in turn) for turn in history):
        raise ValueError("every history turn must be a (prompt, answer) pair of strings")
    if budget is not None and budget < 2:
        raise ValueError(f"no room for a prompt: {budget} ids left (lower max_new_tokens)")
    if mode == "chat":
        encode_prompts = None
        if isinstance(model, VLM):  # only prompts hold images: each "<image>" becomes the image's tokens

            def encode_prompts(texts):
                return encode_texts(tokenizer, texts, model.args.image_tokens, model.args.image_token_id)

        turns = encode_turns(tokenizer, [history + [(prompt, None)]], encode_prompts)[0]
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


def answer_ids(
    model,
    tokenizer,
    prompts,
    history=None,
    mode="chat",
    max_new_tokens=DEFAULTS["max_new_tokens"],
    seed=None,
    images=None,
    **sampling,
):
    """New ids per prompt (cut before <eos>), the prompts generated together as one left-padded batch.
    `history` [(prompt, answer), ...] is put before every prompt; `images` (paths, bytes or PIL images;
    VLM only) in front of every prompt. sampling: temperature, top_k, top_p, repetition_penalty,
    use_cache: model.stream's arguments, with its defaults (temperature 1, no top-k/top-p, no
    penalty); the command line's defaults are DEFAULTS."""
    budget = model.args.max_seq_len - max_new_tokens
    pixels = image_pixels(model, images)
    ids = [build_prompt(tokenizer, with_images(p, len(images or ())), history, mode, budget, model)[0] for p in prompts]
    kwargs = sampling_kwargs(model, seed, sampling)
    if pixels is not None:
        kept = [fitted_images(model, row, range(len(pixels))) for row in ids]
        kwargs["images"] = torch.cat([pixels[list(k)] for k in kept])
    return model.generate(ids, max_new_tokens, eos_id=tokenizer.eos_id, **kwargs)


def answer(
    model,
    tokenizer,
    prompts,
    history=None,
    mode="chat",
    max_new_tokens=DEFAULTS["max_new_tokens"],
    seed=None,
    images=None,
    **sampling,
):
    """The answers (text) to a list of prompts; see answer_ids."""
    outputs = answer_ids(model, tokenizer, prompts, history, mode, max_new_tokens, seed, images, **sampling)
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
        piece, self.shown = text[len(self.shown) :], text
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


def stream_answer(
    model, tokenizer, prompt_ids, max_new_tokens=DEFAULTS["max_new_tokens"], seed=None, images=None, **sampling
):
    """Text pieces of the answer to one prompt (ids from build_prompt), as they are generated; `images`: the
    pixels of the images the ids hold (VLM)."""
    kwargs = sampling_kwargs(model, seed, sampling)
    if images is not None:
        kwargs["images"] = images

    def tokens():
        for step in model.stream([prompt_ids], max_new_tokens, eos_id=tokenizer.eos_id, **kwargs):
            token = int(step[0])
            if token == tokenizer.eos_id:
                return
            yield token

    yield from incremental_text(tokenizer, tokens())


def number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` (int or float) within [low, high] ((low, high] with low_open), so that a
    value such as --max-new-tokens -5 is one line of usage error, not a traceback later."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            span = f"{'(' if low_open else '['}{'' if low is None else low}, {'' if high is None else high}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value

    return parse


def add_sampling_args(parser):
    parser.add_argument(
        "--max-new-tokens",
        type=number(int, 1),
        default=DEFAULTS["max_new_tokens"],
        help="at most max_seq_len // 2 (reduced with a note)",
    )
    parser.add_argument("--temperature", type=number(float, 0), default=DEFAULTS["temperature"], help="0: greedy")
    parser.add_argument("--top-k", type=number(int, 0), default=DEFAULTS["top_k"], help="0: off")
    parser.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=DEFAULTS["top_p"], help="1: off")
    parser.add_argument(
        "--repetition-penalty",
        type=number(float, 0, low_open=True),
        default=DEFAULTS["repetition_penalty"],
        help="1: off",
    )
    parser.add_argument("--seed", type=int, default=None)


def sampling_from(args):
    return dict(
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )


def fit_max_new_tokens(max_new_tokens, model):
    """At most half the context, so that the other half is left for the prompt."""
    limit = model.args.max_seq_len // 2
    if max_new_tokens > limit:
        print(
            f"note: --max-new-tokens {max_new_tokens} reduced to {limit} (max_seq_len {model.args.max_seq_len})",
            file=sys.stderr,
        )
    return min(max_new_tokens, limit)
