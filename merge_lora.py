"""Fold a LoRA adapter into the checkpoint it was trained on: an ordinary checkpoint that chat.py, eval.py,
export_hf.py and a further sft.py / dpo.py run read like any other.

    python merge_lora.py --ckpt out/pretrain/clinical/ckpt.pt --adapter out/sft_lora/adapter --out merged.pt
    python export_hf.py --ckpt merged.pt --out out/hf/sft-lora-merged

Each adapted weight becomes W + alpha / rank * B A (lora.merge). Afterwards the merged model's logits are
compared with the base model running the adapter unmerged, on random ids; the run fails above
CHECK_TOLERANCE. The checkpoint is written atomically and carries the adapter's phase and step, the base's
tokenizer fingerprint and where it came from ("merged_from").
"""

import argparse
from pathlib import Path

import torch

import lora
from checkpoint import CheckpointError, atomic_save, load_model, model_checkpoint

CHECK_TOLERANCE = 1e-4  # max |logit difference| merged vs unmerged, fp32


@torch.no_grad()
def merge_checkpoint(ckpt_path, adapter, out):
    """Write the merged checkpoint `out`; returns the largest |logit difference| against the unmerged adapter."""
    model, ckpt = load_model(ckpt_path)
    info = lora.load_adapter(model, adapter, ckpt)
    ids = torch.randint(
        0, model.args.vocab_size, (2, min(32, model.args.max_seq_len)), generator=torch.Generator().manual_seed(0)
    )
    unmerged = model(ids)
    lora.merge(model)
    diff = (model(ids) - unmerged).abs().max().item()
    if not diff <= CHECK_TOLERANCE:  # NaN too
        raise CheckpointError(f"the merged model's logits differ from the adapter's by {diff:.2e}: {out} not written")
    fingerprint = info.get("tokenizer_fingerprint", ckpt.get("tokenizer_fingerprint"))
    merged_from = {"base": str(ckpt_path), "adapter": str(adapter)}
    state = model_checkpoint(model, model.args, tokenizer_fingerprint=fingerprint, merged_from=merged_from)
    atomic_save(state | lora.trained_as(info, ckpt), out)
    return diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="the checkpoint the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="the adapter folder (out_dir/adapter of a LoRA run)")
    parser.add_argument("--out", required=True, help="the merged checkpoint to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not args.force:
        raise SystemExit(f"merge_lora.py: {args.out} exists: pass --force to replace it")
    try:
        diff = merge_checkpoint(args.ckpt, args.adapter, args.out)
    except (OSError, ValueError) as err:
        raise SystemExit(f"merge_lora.py: {err}") from None
    print(f"wrote {args.out}: merged logits vs base + adapter, max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
