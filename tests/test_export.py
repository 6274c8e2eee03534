"""export_hf.py: the folder loads in transformers and computes what our model computes."""

import json

import pytest
import torch
from safetensors import safe_open

import export_hf
from checkpoint import atomic_save, model_checkpoint
from model import ModelArgs, Transformer

from conftest import wander

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, rope_theta=50000.0, norm_eps=1e-6)


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tiny_tokenizer_dir, tmp_path_factory):
    """A GQA model with a non-default rope_theta, its weights perturbed so that every norm counts."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=tiny_tokenizer.vocab_size, **ARGS)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("export")
    atomic_save(
        model_checkpoint(model, model.args, phase="sft", step=11, tokenizer_fingerprint=tiny_tokenizer.fingerprint),
        root / "ckpt.pt",
    )
    export_hf.main(["--ckpt", str(root / "ckpt.pt"), "--out", str(root / "hf"), "--tokenizer", str(tiny_tokenizer_dir)])
    return model, root


def test_folder_contents_and_config(exported, tiny_tokenizer, tiny_tokenizer_dir):
    model, root = exported
    folder = root / "hf"
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "tokenization_chatglm.py",
        "README.md",
    } <= {p.name for p in folder.iterdir()}
    assert not (root / "hf.tmp").exists()
    config = json.loads((folder / "config.json").read_text())
    expected = dict(
        vocab_size=tiny_tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=model.args.ffn_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tiny_tokenizer.bos_id,
        eos_token_id=tiny_tokenizer.eos_id,
        pad_token_id=tiny_tokenizer.pad_id,
        torch_dtype="float32",
    )
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tiny_tokenizer.eos_id and generation["do_sample"] is False
    assert not {"temperature", "top_p", "top_k", "repetition_penalty"} & set(generation)  # greedy, as ours
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer["add_bos_token"] is False and tokenizer["add_eos_token"] is False  # llama.cpp reads these
    specials = {int(i): entry["content"] for i, entry in tokenizer["added_tokens_decoder"].items() if entry["special"]}
    n = tiny_tokenizer.n_pieces
    chatglm = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert {i: specials[i] for i in range(n, n + 5)} == dict(enumerate(chatglm, n))
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert "model.layers.1.self_attn.k_proj.weight" in keys and len(keys) == 2 * 9 + 2
    with pytest.raises(SystemExit, match="exists"):
        export_hf.main(["--ckpt", str(root / "ckpt.pt"), "--out", str(folder), "--tokenizer", str(tiny_tokenizer_dir)])


def test_transformers_round_trip(exported, tiny_tokenizer):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, root = exported
    hf, info = LlamaForCausalLM.from_pretrained(root / "hf", output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert hf.config.num_key_value_heads == 2 and hf.config.rope_parameters["rope_theta"] == 50000.0

    tok = AutoTokenizer.from_pretrained(root / "hf", trust_remote_code=True)
    text = "高血压患者应定期监测血压，遵医嘱服药。"
    ids = tiny_tokenizer.encode_batch([text])[0]
    assert tok.encode(text) == ids and tok.decode(ids) == tiny_tokenizer.decode(ids)
    typed = "<s>[MASK] sop</s>"  # special names typed in text stay text, as with our tokenizer
    assert tok.encode(typed) == tiny_tokenizer.encode_batch([typed])[0]
    special = [tiny_tokenizer.n_pieces + i for i in range(5)] + ids[:3]
    assert tok.decode(special) == tiny_tokenizer.decode(special) and "[gMASK]" in tok.decode(special)
    assert tok.decode(special, skip_special_tokens=True) == tiny_tokenizer.decode(special, skip_special_tokens=True)

    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < 1e-4
    assert export_hf.check(root / "hf", model) < 1e-4

    ours = model.generate([ids], 24, eos_id=tiny_tokenizer.eos_id, temperature=0)[0]
    theirs = hf.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=24,
        do_sample=False,
        repetition_penalty=1.0,
    )[0, len(ids) :].tolist()
    assert len(ours) == 24 and theirs == ours


def test_bfloat16_export(exported, tiny_tokenizer_dir, tmp_path):
    model, root = exported
    export_hf.main(
        [
            "--ckpt",
            str(root / "ckpt.pt"),
            "--out",
            str(tmp_path / "bf16"),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--dtype",
            "bfloat16",
        ]
    )
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert export_hf.check(tmp_path / "bf16", model, "bfloat16") < 1e-4  # ours with the same rounding
    export_hf.main(
        [
            "--ckpt",
            str(root / "ckpt.pt"),
            "--out",
            str(tmp_path / "bf16"),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--force",
            "--no-check",
        ]
    )
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "float32"
    assert not (tmp_path / "bf16.old").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(SystemExit, match="no checkpoint"):
        export_hf.main(
            ["--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "hf"), "--tokenizer", str(tiny_tokenizer_dir)]
        )


def test_a_checkpoint_with_nan_weights_is_refused_and_nothing_written(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    model = Transformer(ModelArgs(vocab_size=tiny_tokenizer.vocab_size, **ARGS))
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[3, 5] = float("nan")
    atomic_save(model_checkpoint(model, model.args, phase="sft", step=1), tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"1 weight tensor\(s\) hold NaN or inf values \(e.g. layers.1.feed_forward"):
        export_hf.main(
            ["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf"), "--tokenizer", str(tiny_tokenizer_dir)]
        )
    assert not (tmp_path / "hf").exists()


def test_generate_with_the_exported_generation_config_is_our_greedy(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    """A user's plain generate() gives what our greedy decoding gives, for SFT prompts (ids, then <s>)."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=tok.vocab_size, **ARGS)).eval()
    wander(model)  # greedy output wanders, so a repetition penalty would change it
    ckpt = model_checkpoint(model, model.args, phase="sft", tokenizer_fingerprint=tok.fingerprint)
    atomic_save(ckpt, tmp_path / "c.pt")
    export_hf.main(
        [
            "--ckpt",
            str(tmp_path / "c.pt"),
            "--out",
            str(tmp_path / "hf"),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--no-check",
        ]
    )
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    steps = hf.generation_config.max_new_tokens
    penalised_differs = False
    for question in ("高血压患者饮食上要注意什么？", "感冒", "头痛怎么办？"):
        ids = tok.encode_batch([question])[0] + [tok.bos_id]
        theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        theirs = theirs[0, len(ids) :].tolist()
        ours = model.generate([ids], steps, eos_id=tok.eos_id, temperature=0)[0]
        assert theirs[: len(ours)] == ours and theirs[len(ours) :] in ([], [tok.eos_id]) and len(ours) > 8
        penalised = model.generate([ids], steps, eos_id=tok.eos_id, temperature=0, repetition_penalty=1.1)[0]
        penalised_differs |= penalised != ours
    assert penalised_differs  # the check above would see a penalty left in the generation config
