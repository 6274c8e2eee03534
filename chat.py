"""Talk to a checkpoint: an interactive multi-turn chat in the terminal, or one-shot answers.

    python chat.py --ckpt out/sft/ckpt.pt                                    # interactive
    python chat.py --ckpt out/sft/ckpt.pt --prompt "高血压患者饮食上要注意什么？" --prompt "感冒怎么办？"
    python chat.py --ckpt out/sft/ckpt.pt --prompt-file data/sample/chat_questions.txt --temperature 0
    python chat.py --ckpt out/pretrain/clinical/ckpt.pt --prompt "高血压是"  # continues the text
    python chat.py --ckpt out/pretrain/clinical/ckpt.pt --adapter out/sft_lora/adapter   # + a LoRA adapter
    python chat.py --ckpt out/vlm/instruct/ckpt.pt --image scan.png --prompt "这张胸片有什么异常？"

Modes. An SFT checkpoint (phase "sft") answers through the chat template, dataset_sft.render: every
earlier turn as `prompt <bos> answer <eos>`, then the new prompt and <bos>, after which the model
writes the answer and ends it with <eos>. Any other checkpoint is a pretrained model: it continues
the text (earlier turns, if any, are plain text in front of it). --mode chat|continue overrides.

Images (vision-language checkpoints from vlm_train.py): --image PATH (repeatable) goes with every
--prompt, or with the first message of an interactive chat; `/image PATH` attaches an image to the next
message. Images sit in front of their message's text.

Interactive commands: /reset forgets the conversation, /image PATH, /quit (or Ctrl-D) leaves, Ctrl-C stops an
answer midway. The conversation is kept across turns; when it no longer fits in max_seq_len minus
--max-new-tokens, its oldest turns are dropped, then the start of a prompt too long alone (the chat says
which, in one-shot answers too).

Generation: KV cache, temperature (0 = greedy), top-k, top-p, repetition penalty, stop at <eos> per
sequence; answers stream as they are generated (the growing id list is decoded and only the new
text printed, holding back a character whose bytes have not all arrived yet).

The loading, prompting and generation live in inference.py (eval.py uses them too).
"""

import argparse
import sys
from pathlib import Path

import torch

from inference import (
    MODES,
    add_sampling_args,
    answer,
    build_prompt,
    fit_max_new_tokens,
    fitted_images,
    image_pixels,
    load,
    number,
    sampling_from,
    sampling_kwargs,
    stream_answer,
    with_images,
)
from precision import CHOICES


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise SystemExit(f"chat.py: cannot read --prompt-file {args.prompt_file}: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise SystemExit(
                f"chat.py: --prompt-file {args.prompt_file} is not UTF-8 text (byte {err.start}): "
                "give a text file with one prompt per line"
            ) from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise SystemExit(f"chat.py: --prompt-file {args.prompt_file} holds no prompt (one per line)")
    return prompts


def cut_note(model, tok, prompt, mode, args):
    """A note when the prompt alone is longer than the context leaves beside --max-new-tokens (its start is cut
    to fit, as build_prompt does), else None."""
    budget = model.args.max_seq_len - args.max_new_tokens
    length = len(build_prompt(tok, prompt, (), mode, None, model)[0])
    if length <= budget:
        return None
    return (
        f"(the prompt is {length} tokens and the model's {model.args.max_seq_len}-token context leaves {budget} "
        f"beside --max-new-tokens {args.max_new_tokens}: its first {length - budget} tokens were cut)"
    )


def one_shot(model, tok, mode, prompts, args, sampling):
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        replies = answer(model, tok, batch, None, mode, args.max_new_tokens, args.seed, args.image, **sampling)
        for prompt, reply in zip(batch, replies):
            note = cut_note(model, tok, with_images(prompt, len(args.image or ())), mode, args)
            print(f"用户> {prompt}\n" + (f"{note}\n" if note else "") + f"助手> {reply}\n", flush=True)


def interactive(model, tok, mode, args, sampling):
    print(
        f"mode: {mode} | /reset clears the conversation, /image PATH attaches an image, /quit leaves, "
        "Ctrl-C stops an answer"
    )
    sampling = sampling_kwargs(model, args.seed, sampling)  # one generator for the whole session
    history, images, pending = [], [], list(args.image or [])  # images: the conversation's pixels, in order
    while True:
        try:
            line = input("用户> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history, images, pending = [], [], []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            if Path(path).is_file():
                pending.append(path)
                print(f"(image {path} goes with your next message)")
            else:
                print(f"(no image file at {path!r})")
            continue
        if line.startswith("/"):
            print("commands: /reset, /image PATH, /quit")
            continue
        try:
            new_pixels = image_pixels(model, pending)
            prompt = with_images(line, len(pending))
            ids, dropped = build_prompt(tok, prompt, history, mode, model.args.max_seq_len - args.max_new_tokens, model)
            everything = images + ([] if new_pixels is None else list(new_pixels))
            kept = fitted_images(model, ids, everything)
        except ValueError as err:  # a text checkpoint given images, an unreadable image, a prompt too long
            print(f"({err})")
            pending = []
            continue
        pending = []
        if dropped:
            history = history[dropped:]
            print(
                f"(the conversation is longer than the model's {model.args.max_seq_len}-token context: "
                f"dropped the oldest {dropped} turn(s))"
            )
        note = None if history else cut_note(model, tok, prompt, mode, args)
        if note:
            print(note)
        images = kept
        print("助手> ", end="", flush=True)
        pieces = []
        try:
            pixels = torch.stack(images) if images else None
            for piece in stream_answer(model, tok, ids, args.max_new_tokens, images=pixels, **sampling):
                print(piece, end="", flush=True)
                pieces.append(piece)
        except KeyboardInterrupt:
            print(" (stopped)", end="")
        print()
        history.append((prompt, "".join(pieces)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint file (pretrain or SFT)")
    parser.add_argument("--adapter", help="a LoRA adapter folder (PEFT format) trained on --ckpt, folded into it")
    parser.add_argument("--tokenizer", default="chatglm_tokenizer", help="the tokenizer the model was trained with")
    parser.add_argument("--mode", choices=MODES, help="default: chat for SFT checkpoints, continue otherwise")
    parser.add_argument("--prompt", action="append", help="answer this and exit (repeatable)")
    parser.add_argument("--prompt-file", help="answer every non-empty line of this file and exit")
    parser.add_argument(
        "--image",
        action="append",
        help="an image for a vision-language checkpoint (repeatable): "
        "with every --prompt, or with the first interactive message",
    )
    parser.add_argument("--batch-size", type=number(int, 1), default=8, help="one-shot prompts generated together")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=CHOICES,
        help="auto: bfloat16 where this machine decodes faster in it (precision.py), else float32",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow)")
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    prompts = read_prompts(args)  # a bad prompt file stops the run before the model is loaded
    try:
        model, tok, ckpt, mode = load(args.ckpt, args.tokenizer, args.device, args.dtype, adapter=args.adapter)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"chat.py: {err}") from None
    mode = args.mode or mode
    args.max_new_tokens = fit_max_new_tokens(args.max_new_tokens, model)
    sampling = dict(sampling_from(args), use_cache=not args.no_cache)
    adapter = f" + adapter {args.adapter}" if args.adapter else ""
    print(
        f"{args.ckpt}{adapter}: phase {ckpt.get('phase')}, step {ckpt.get('step')}, "
        f"{model.num_params() / 1e6:.1f}M parameters on {model.rope_cos.device}, mode {mode}",
        file=sys.stderr,
    )
    try:
        if prompts:
            one_shot(model, tok, mode, prompts, args, sampling)
        else:
            interactive(model, tok, mode, args, sampling)
    except ValueError as err:  # images for a text checkpoint, an image that cannot be decoded
        raise SystemExit(f"chat.py: {err}") from None


if __name__ == "__main__":
    main()
