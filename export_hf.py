"""Export a checkpoint as a Hugging Face LlamaForCausalLM folder: config, safetensors, tokenizer, card.

    python export_hf.py --ckpt out/sft/ckpt.pt --out out/hf/mini-chinese-gpt-sft
    python export_hf.py --ckpt out/pretrain/clinical/ckpt.pt --out out/hf/base --dtype bfloat16 --tokenizer out/tokenizer

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
from inference import DEFAULTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
CHECK_TOLERANCE = 1e-3  # max |logit difference| the export check accepts (fp32 matches to ~1e-5)


def hf_name(name):
    """Our state-dict key -> transformers' (None for the tied output layer)."""
    if name == "output.weight":
        return None
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
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rope_theta)}, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=True, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, architectures=["LlamaForCausalLM"], dtype=dtype)


def generation_config(tok, max_seq_len):
    """Greedy, no repetition penalty: generate() with no arguments is our greedy decoding
    (chat.py --temperature 0 --repetition-penalty 1); the model card gives chat.py's sampling."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, do_sample=False,
                            max_new_tokens=min(DEFAULTS["max_new_tokens"], max_seq_len // 2))


def tokenizer_config(folder, tok):
    """What tokenizer.save_pretrained writes, plus what other readers would otherwise assume:
    nothing is added around the text (llama.cpp's converter otherwise marks the GGUF to prepend <s>,
    our prompt/answer separator), and ChatGLM2's five specials are named control tokens (the
    converter otherwise calls them [PAD<id>], unused)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(add_bos_token=False, add_eos_token=False)
    config.setdefault("added_tokens_decoder", {}).update({
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True} for token, i in tok.special_ids.items()})
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

# Mini-Chinese-GPT ({ckpt.get('phase')}, step {ckpt.get('step')})

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
decoding gives. Its chat defaults sample instead: `do_sample=True, temperature={DEFAULTS['temperature']},
top_p={DEFAULTS['top_p']}, repetition_penalty={DEFAULTS['repetition_penalty']}`.

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
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return model, out


@torch.no_grad()
def check(folder, model, dtype="float32", length=32):
    """Max |logit difference| between the exported folder (loaded by transformers, in fp32) and our
    model with its weights rounded to `dtype`, on random ids."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = type(model)(model.args)
    ours.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, model.args.vocab_size, (2, min(length, model.args.max_seq_len)),
                        generator=torch.Generator().manual_seed(0))
    return (hf(ids).logits - ours.eval()(ids)).abs().max().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--tokenizer", default="chatglm_tokenizer", help="the tokenizer the model was trained with")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-check", action="store_true", help="skip loading the export back with transformers")
    args = parser.parse_args(argv)
    try:
        model, out = export(args.ckpt, args.out, load_tokenizer(args.tokenizer), args.dtype, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"export_hf.py: {err}") from None
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")
    if not args.no_check:
        diff = check(out, model, args.dtype)
        print(f"transformers reload: max |logit difference| vs ours = {diff:.2e}")
        if diff > CHECK_TOLERANCE:
            raise SystemExit(f"export_hf.py: the exported model's logits differ from ours by {diff:.2e}")


if __name__ == "__main__":
    main()
