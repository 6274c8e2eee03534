"""Export a checkpoint as a Hugging Face LlamaForCausalLM folder: config, safetensors, tokenizer, card.

    python export_hf.py --ckpt out/sft/ckpt.pt --out out/hf/mini-chinese-gpt-sft
    python export_hf.py --ckpt out/pretrain/clinical/ckpt.pt --out out/hf/base --dtype bfloat16 \
        --tokenizer out/tokenizer

and then, with nothing of this repository:

    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)   # tokenization_chatglm.py is in DIR
    model = LlamaForCausalLM.from_pretrained(DIR)

Our model is Llama-2 written in transformers' own conventions, so the weights copy one to one:
    tok_embeddings                      -> model.embed_tokens
    layers.i.attention.wq / wk / wv / wo  -> model.layers.i.self_attn.q_proj / k_proj / v_proj / o_proj
    layers.i.feed_forward.w1 / w3 / w2    -> model.layers.i.mlp.gate_proj / up_proj / down_proj
    layers.i.attention_norm / ffn_norm  -> model.layers.i.input_layernorm / post_attention_layernorm
    norm                                -> model.norm
RoPE is the rotate-half layout with inv_freq = theta^(-2i/head_dim) (transformers' "default" rope), so
q/k need no permutation (that is only for Meta's interleaved checkpoints); RMSNorm is x * rsqrt(mean(x^2)
+ eps) in fp32, cast back, times the weight, as LlamaRMSNorm; SwiGLU, GQA and no biases likewise.
The output layer is tied to the embeddings: lm_head.weight is not written, and tie_word_embeddings=True
makes transformers tie it at load (LlamaForCausalLM._tied_weights_keys).

The folder is written under a temporary name and renamed; an existing --out needs --force. Afterwards the
export is loaded with transformers and its logits compared with ours (weights rounded to --dtype the
same way) on a short input; --no-check skips that.

A vision-language checkpoint (vlm_train.py) is written as a LlavaForConditionalGeneration folder instead:
    language model  -> language_model.model.* (the Llama mapping above; lm_head tied, not written)
    vision tower    -> vision_tower.* (the same transformers class, its keys as they are)
    projector       -> multi_modal_projector.linear_1 / linear_2
with LlavaConfig (image_token_id, vision_feature_layer, vision_feature_select_strategy, image_seq_length)
and a LlavaProcessor: the tower's image processor and our tokenizer, in which the text "<image>" is the
image id (LlavaProcessor expands it to one per image token, so it must be one token; in this export "<s>",
"</s>" and "<unk>" typed in text are their special ids too). The check runs the processor and the model on
an image and a prompt and compares ids, pixels and logits with ours. projector_pool > 1 has no LLaVA
equivalent and is refused.

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    model = LlavaForConditionalGeneration.from_pretrained(DIR)
    inputs = processor(images=image, text="<image>\n这张胸片有什么异常？", return_tensors="pt")
    ids = torch.cat([inputs.input_ids, torch.tensor([[processor.tokenizer.bos_token_id]])], 1)  # our template
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from chatglm_tokenizer import load_tokenizer
from checkpoint import load_model
from corpora import IMAGE_PLACEHOLDER
from inference import DEFAULTS
from precision import DTYPES
from vision import has_cls_token, pixel_batch
from vlm import encode_texts, is_vlm_file, llm_args, load_vlm

LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
CHECK_TOLERANCE = 1e-3  # max |logit difference| the export check accepts (fp32 matches to ~1e-5)


def hf_name(name):
    """Our state-dict key -> transformers' (the LM head is tied to embed_tokens: tie_word_embeddings)."""
    if name.startswith("tok_embeddings."):
        return "model.embed_tokens." + name.split(".", 1)[1]
    if name.startswith("norm."):
        return "model." + name
    _, i, rest = name.split(".", 2)  # layers.{i}.{module}.weight
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{i}.{LAYER_NAMES[module]}.{param}"


def hf_state_dict(model, dtype=torch.float32):
    out = {}
    for name, tensor in model.state_dict().items():
        key = hf_name(name)
        if key is not None:
            out[key] = tensor.detach().to("cpu", dtype).contiguous().clone()
    return out


def hf_config(args, tok, dtype):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rope_theta)},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


def generation_config(tok, max_seq_len):
    """Greedy, no repetition penalty: generate() with no arguments is our greedy decoding
    (chat.py --temperature 0 --repetition-penalty 1); the model card gives chat.py's sampling."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        do_sample=False,
        max_new_tokens=min(DEFAULTS["max_new_tokens"], max_seq_len // 2),
    )


def tokenizer_config(folder, tok):
    """What tokenizer.save_pretrained writes, plus what other readers would otherwise assume:
    nothing is added around the text (llama.cpp's converter otherwise marks the GGUF to prepend <s>,
    our prompt/answer separator), and ChatGLM2's five specials are named control tokens (the
    converter otherwise calls them [PAD<id>], unused)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(add_bos_token=False, add_eos_token=False)
    config.setdefault("added_tokens_decoder", {}).update(
        {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token, i in tok.special_ids.items()
        }
    )
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def model_card(ckpt_path, ckpt, model, tok, dtype):
    a = model.args
    return f"""---
language:
- zh
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- medical
---

# Mini-Chinese-GPT ({ckpt.get("phase")}, step {ckpt.get("step")})

A small Chinese language model with a medical focus, trained from scratch with Mini-Chinese-GPT and
exported from `{ckpt_path}`.

| | |
|---|---|
| architecture | Llama-2 (`LlamaForCausalLM`): RMSNorm, RoPE (theta {a.rope_theta:g}), SwiGLU, tied embeddings |
| parameters | {model.num_params() / 1e6:.1f}M |
| layers / width / heads / kv heads | {a.n_layers} / {a.dim} / {a.n_heads} / {a.kv_heads} |
| context | {a.max_seq_len} tokens |
| tokenizer | ChatGLM2 SentencePiece layout, {a.vocab_size} ids (custom code: `trust_remote_code=True`) |
| weights | {dtype} |

## Use

```python
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

tok = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)
model = LlamaForCausalLM.from_pretrained("PATH")
```

The tokenizer adds no special tokens. A pretrained checkpoint continues text. An SFT checkpoint was
trained on the template `prompt <s> answer </s>` per turn: to ask, feed the ids of the prompt followed
by `<s>` (id {tok.bos_id}) and generate until `</s>`:

```python
ids = tok.encode("高血压患者饮食上要注意什么？") + [tok.bos_token_id]
out = model.generate(torch.tensor([ids]))        # generation_config.json: greedy, no repetition penalty
print(tok.decode(out[0, len(ids):], skip_special_tokens=True))
```

`generate()` without arguments decodes greedily, token for token what Mini-Chinese-GPT's own greedy
decoding gives. Its chat defaults sample instead: `do_sample=True, temperature={DEFAULTS["temperature"]},
top_p={DEFAULTS["top_p"]}, repetition_penalty={DEFAULTS["repetition_penalty"]}`.

llama.cpp: `convert_hf_to_gguf.py PATH --outtype f32` converts this folder. The GGUF does not prepend
`<s>` (`tokenizer.ggml.add_bos_token` is false): build the prompt as above, with `<s>` only where the
template puts it.

## Limits

A small research model trained on a small corpus: it makes things up. Its answers are not medical advice.
"""


def write_export(model, ckpt, ckpt_path, tok, folder, dtype_name):
    folder.mkdir(parents=True)
    save_file(hf_state_dict(model, DTYPES[dtype_name]), folder / "model.safetensors", metadata={"format": "pt"})
    hf_config(model.args, tok, dtype_name).save_pretrained(folder)
    # Readers of the older config layout look for these two top-level keys.
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(torch_dtype=dtype_name, rope_theta=float(model.args.rope_theta))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation_config(tok, model.args.max_seq_len).save_pretrained(folder)
    tok.save_pretrained(folder)  # tokenizer.model, tokenizer_config.json (auto_map), tokenization_chatglm.py
    tokenizer_config(folder, tok)
    (folder / "README.md").write_text(model_card(ckpt_path, ckpt, model, tok, dtype_name), encoding="utf-8")


def export(ckpt_path, out, tokenizer, dtype="float32", force=False):
    """Write the folder `out` for checkpoint `ckpt_path`; returns (our model in fp32, out)."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    model, ckpt = load_model(ckpt_path, "cpu", tokenizer)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_export(model, ckpt, ckpt_path, tokenizer, tmp, dtype)
    swap_in(tmp, out)
    return model, out


def swap_in(tmp, out):
    """Replace the folder `out` by `tmp` (renames: a kill leaves the old folder or the new one)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


@torch.no_grad()
def check(folder, model, dtype="float32", length=32, device="cpu"):
    """Max |logit difference| between the exported folder (loaded by transformers, in fp32) and our
    model with its weights rounded to `dtype`, on random ids, both on `device`."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    ours = type(model)(model.args)
    ours.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in model.state_dict().items()})
    ids = torch.randint(
        0, model.args.vocab_size, (2, min(length, model.args.max_seq_len)), generator=torch.Generator().manual_seed(0)
    ).to(device)
    return (hf(ids).logits - ours.to(device).eval()(ids)).abs().max().item()


# ---------------------------------------------------------------------------- vision-language checkpoints


def llava_state_dict(model, dtype=torch.float32):
    def cast(tensors, prefix):
        return {prefix + k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in tensors.items()}

    out = {"language_model." + k: v for k, v in hf_state_dict(model.llm, dtype).items()}
    out |= cast(model.vision.state_dict(), "vision_tower.")
    return out | cast(model.projector.state_dict(), "multi_modal_projector.")


def llava_config(model, tok, dtype):
    from transformers import LlavaConfig

    a = model.args
    return LlavaConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=hf_config(llm_args(a), tok, dtype).to_dict(),
        image_token_id=a.image_token_id,
        vision_feature_layer=a.feature_layer,
        vision_feature_select_strategy=a.feature_select,
        image_seq_length=a.image_tokens,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
        architectures=["LlavaForConditionalGeneration"],
        dtype=dtype,
    )


def llava_processor(model, tok):
    """LlavaProcessor: the tower's image processor (PIL backend: no torchvision) and our tokenizer with "<image>"
    as the image id."""
    import transformers
    from transformers import AddedToken, LlavaProcessor

    a, pre = model.args, model.args.preprocess
    settings = dict(
        do_resize=pre["resize"] is not None,
        size=pre["resize"],
        do_center_crop=pre["crop"] is not None,
        resample=pre["resample"],
        do_rescale=pre["rescale"] is not None,
        do_normalize=pre["mean"] is not None,
        image_mean=pre["mean"],
        image_std=pre["std"],
        do_convert_rgb=pre["rgb"],
    )
    if pre["crop"]:
        settings["crop_size"] = {"height": pre["crop"][0], "width": pre["crop"][1]}
    if pre["rescale"] is not None:
        settings["rescale_factor"] = pre["rescale"]
    image_processor = getattr(transformers, pre["processor"] + "Pil")(
        **{k: v for k, v in settings.items() if v is not None}
    )
    tokenizer = type(tok)(
        vocab_file=tok.vocab_file,
        split_special_tokens=False,
        added_tokens_decoder={a.image_token_id: AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=a.vision["patch_size"],
        vision_feature_select_strategy=a.feature_select,
        num_additional_image_tokens=int(has_cls_token(a.vision)),
        image_token=IMAGE_PLACEHOLDER,
    )


def llava_card(ckpt_path, ckpt, model, tok, dtype):
    a = model.args
    return f"""---
language:
- zh
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- llava
- medical
---

# Mini-Chinese-GPT vision-language model ({ckpt.get("phase")}, step {ckpt.get("step")})

LLaVA-1.5-style: a {a.vision["model_type"]} vision tower, a two-layer MLP projector and a small Llama
trained from scratch with Mini-Chinese-GPT; exported from `{ckpt_path}`.

| | |
|---|---|
| parameters | {model.num_params() / 1e6:.1f}M |
| language model layers / width / heads | {a.n_layers} / {a.dim} / {a.n_heads} |
| image | {a.vision["image_size"]} px, patch {a.vision["patch_size"]}: {a.image_tokens} tokens |
| image features | tower layer {a.feature_layer}, {a.feature_select} |
| context | {a.max_seq_len} tokens |
| weights | {dtype} |

Prompt: the images first, one `<image>` line each, then the question, then `<s>` (id {tok.bos_id}); the model
answers until `</s>`. `trust_remote_code=True` loads the tokenizer.

A small research model: it makes things up. Its answers are not medical advice.
"""


def export_llava(ckpt_path, out, tokenizer, dtype="float32", force=False):
    """Write the LlavaForConditionalGeneration folder `out` for a VLM checkpoint; returns (our model in fp32, out)."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    model, ckpt = load_vlm(ckpt_path, "cpu", tokenizer)
    if model.args.projector_pool > 1:
        raise ValueError(
            f"{ckpt_path} pools image tokens (projector_pool={model.args.projector_pool}): "
            "LlavaForConditionalGeneration has no pooling, so it cannot hold this model"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(llava_state_dict(model, DTYPES[dtype]), tmp / "model.safetensors", metadata={"format": "pt"})
    llava_config(model, tokenizer, dtype).save_pretrained(tmp)
    generation_config(tokenizer, model.args.max_seq_len).save_pretrained(tmp)
    llava_processor(model, tokenizer).save_pretrained(tmp)
    (tmp / "README.md").write_text(llava_card(ckpt_path, ckpt, model, tokenizer, dtype), encoding="utf-8")
    swap_in(tmp, out)
    return model, out


@torch.no_grad()
def check_llava(folder, model, tok, dtype="float32"):
    """(max |logit difference|, whether the processor's ids equal ours, max |pixel difference|) between the exported
    folder (transformers, fp32) and our model with its weights rounded to `dtype`, on a drawn image and a prompt."""
    from PIL import Image, ImageDraw
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    image = Image.new("RGB", (47, 61), (20, 20, 20))
    ImageDraw.Draw(image).ellipse((8, 10, 40, 52), fill=(200, 180, 150))
    text = f"{IMAGE_PLACEHOLDER}\n这张图像显示什么？"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours = type(model)(model.args)
    ours.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in model.state_dict().items()})
    ids = encode_texts(tok, [text], model.args.image_tokens, model.args.image_token_id)[0]
    pixels = pixel_batch([image], model.args.preprocess)
    theirs = hf(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits
    mine = ours.eval()(torch.tensor([ids]), images=pixels)
    same_ids = inputs.input_ids[0].tolist() == ids
    logit_diff = (theirs - mine).abs().max().item() if same_ids else float("inf")
    return logit_diff, same_ids, (inputs.pixel_values - pixels).abs().max().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--tokenizer", default="chatglm_tokenizer", help="the tokenizer the model was trained with")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-check", action="store_true", help="skip loading the export back with transformers")
    args = parser.parse_args(argv)
    vlm = is_vlm_file(args.ckpt)
    try:
        tok = load_tokenizer(args.tokenizer)
        model, out = (export_llava if vlm else export)(args.ckpt, args.out, tok, args.dtype, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"export_hf.py: {err}") from None
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")
    if vlm and not args.no_check:
        diff, same_ids, pixel_diff = check_llava(out, model, tok, args.dtype)
        print(
            f"transformers reload (LLaVA): same prompt ids {same_ids}, max |pixel difference| {pixel_diff:.2e}, "
            f"max |logit difference| vs ours {diff:.2e}"
        )
        if not (same_ids and pixel_diff <= 1e-5 and diff <= CHECK_TOLERANCE):  # NaN fails too
            raise SystemExit("export_hf.py: the exported LLaVA model does not compute what ours does")
    elif not args.no_check:
        diff = check(out, model, args.dtype)
        print(f"transformers reload: max |logit difference| vs ours = {diff:.2e}")
        if not diff <= CHECK_TOLERANCE:  # NaN too
            raise SystemExit(f"export_hf.py: the exported model's logits differ from ours by {diff:.2e}")


if __name__ == "__main__":
    main()
