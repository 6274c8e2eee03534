"""lora.py, merge_lora.py, sft.py --lora_rank: adapters that start as the identity, train alone, resume bit-exactly,
load in PEFT on the Hugging Face export with our logits, and fold into the weights."""

import json

import pytest
import torch
from safetensors import safe_open
from test_pretrain import train_losses
from test_trainer import run_sft, sft_setup

import export_hf
import lora
import merge_lora
from checkpoint import CheckpointError, atomic_save, load_model, model_checkpoint
from inference import load
from model import Transformer

from conftest import ROOT, save, tiny_model, wander

SETTINGS = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": list(lora.TARGETS)}


def base_model(vocab):
    return tiny_model(vocab, rope_theta=50000.0)


def trained_adapters(model, seed=1):
    """Adapters with nonzero B (as after training), so that every matrix changes the output."""
    lora.add_adapters(model, SETTINGS["rank"], SETTINGS["alpha"], SETTINGS["dropout"], SETTINGS["targets"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_adapters_start_as_the_base_and_only_they_train():
    model = base_model(300)
    x = ids(300)
    with torch.no_grad():
        before = model(x)
    lora.add_adapters(model.train(), 4, 8.0, 0.0, ["wq", "w2"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"layers.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in ("attention.wq", "feed_forward.w2") for ab in "AB"
    }
    assert model.layers[0].attention.wq.lora_A.weight.shape == (4, 64)  # A: (rank, in); B: (out, rank)
    assert model.layers[0].feed_forward.w2.lora_B.weight.shape == (64, 4)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: the base model exactly
    model(x, x).backward()
    assert all(p.grad is None for name, p in model.named_parameters() if not p.requires_grad)
    assert model.layers[1].feed_forward.w2.lora_B.weight.grad.abs().sum() > 0  # A's is 0 while B is 0


def test_the_chunked_head_skips_a_frozen_weight_and_keeps_the_adapters_gradients():
    """With the LM head frozen, the chunked loss forms no weight gradient; the adapters' gradients are the
    F.cross_entropy reference path's."""
    model = trained_adapters(base_model(300)).train()
    x = ids(300)
    grads = {}
    for path in ("chunked", "reference"):
        model.zero_grad()
        model.tok_embeddings.loss_path = path
        torch.manual_seed(0)  # the same dropout masks
        model(x, x, reduction="sum").backward()
        grads[path] = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads["chunked"].keys() == grads["reference"].keys() and len(grads["chunked"]) == 2 * 7 * 2
    for name, grad in grads["chunked"].items():
        torch.testing.assert_close(grad, grads["reference"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_scaling_disabling_and_merging():
    model = trained_adapters(base_model(300))
    x = ids(300)
    layer = model.layers[0].attention.wq
    h = torch.randn(3, 64)
    expected = h @ layer.weight.T + (h @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * (8.0 / 4)
    torch.testing.assert_close(layer(h), expected)  # alpha / rank
    with torch.no_grad():
        adapted = model(x)
        with lora.disabled(model):
            assert torch.equal(model(x), base_model(300)(x))
        assert torch.equal(model(x), adapted)  # turned back on
        lora.merge(model)
        assert not lora.adapter_layers(model) and set(model.state_dict()) == set(base_model(300).state_dict())
        assert (model(x) - adapted).abs().max() < 1e-5


@pytest.fixture(scope="module")
def adapter_on_export(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir):
    """A base checkpoint, its Hugging Face export, and an adapter folder trained (here: set) on it."""
    root = tmp_path_factory.mktemp("lora")
    base = base_model(tiny_tokenizer.vocab_size)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    atomic_save(
        model_checkpoint(
            base,
            base.args,
            phase="clinical",
            step=7,
            run_id="base-run",
            tokenizer_fingerprint=tiny_tokenizer.fingerprint,
        ),
        root / "base.pt",
    )
    export_hf.export(root / "base.pt", root / "hf", tiny_tokenizer)
    model = trained_adapters(load_model(root / "base.pt")[0])
    info = {
        "base_checkpoint": root / "base.pt",
        "base_run_id": "base-run",
        "base_step": 7,
        "phase": "sft",
        "step": 30,
        "tokenizer_fingerprint": tiny_tokenizer.fingerprint,
    }
    lora.save_adapter(model, root / "adapter", SETTINGS, info)
    return root, model.eval()


def test_folder_is_pefts_format(adapter_on_export):
    root, _ = adapter_on_export
    assert {p.name for p in (root / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert config["bias"] == "none" and config["use_dora"] is False and config["modules_to_save"] is None
    with safe_open(root / "adapter" / "adapter_model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        assert f.metadata()["base_step"] == "7"
    assert len(shapes) == 2 * 7 * 2
    ffn = base_model(10).args.ffn_dim
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 64)
    assert shapes["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] == (32, 4)  # 2 kv heads x 16
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (4, ffn)
    assert shapes["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"] == (ffn, 4)


def test_peft_on_the_export_gives_our_logits(adapter_on_export, tiny_tokenizer):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, ours = adapter_on_export
    hf = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(root / "hf", dtype=torch.float32), root / "adapter"
    ).eval()
    x = ids(tiny_tokenizer.vocab_size, seed=3)
    with torch.no_grad():
        theirs, mine = hf(x).logits, ours(x)
        with hf.disable_adapter():
            base_diff = (hf(x).logits - mine).abs().max().item()
    assert (theirs - mine).abs().max().item() < 1e-4
    assert base_diff > 1e-2  # the adapters matter: the comparison above is not the base model's


def test_load_merge_and_merge_lora_agree(adapter_on_export, tiny_tokenizer, tmp_path):
    root, ours = adapter_on_export
    x = ids(tiny_tokenizer.vocab_size, seed=4)
    model, _, ckpt, mode = load(root / "base.pt", tiny_tokenizer, adapter=root / "adapter")
    assert mode == "chat" and ckpt["phase"] == "sft" and ckpt["step"] == 30 and not lora.adapter_layers(model)
    with torch.no_grad():
        assert (model(x) - ours(x)).abs().max() < 1e-5
    merge_lora.main(
        ["--ckpt", str(root / "base.pt"), "--adapter", str(root / "adapter"), "--out", str(tmp_path / "m.pt")]
    )
    merged, meta = load_model(tmp_path / "m.pt")
    assert meta["phase"] == "sft" and meta["merged_from"]["adapter"] == str(root / "adapter")
    with torch.no_grad():
        assert (merged(x) - ours(x)).abs().max() < 1e-5


def test_command_lines_take_an_adapter(adapter_on_export, tiny_tokenizer_dir, tmp_path, capsys):
    """eval.py ppl with --adapter scores as merge_lora.py's checkpoint does (and not as the base); chat.py answers
    through it; serve.py loads through the same function (a folder that is not an adapter stops it)."""
    import chat
    import serve
    from eval import main as eval_main

    root, _ = adapter_on_export
    merge_lora.main(
        ["--ckpt", str(root / "base.pt"), "--adapter", str(root / "adapter"), "--out", str(tmp_path / "m.pt")]
    )
    heldout = f"heldout={ROOT / 'data/sample/heldout/medical_heldout.txt'}"
    results = {}
    for name, extra in (("adapter", ["--adapter", str(root / "adapter")]), ("merged", []), ("base", [])):
        ckpt = tmp_path / "m.pt" if name == "merged" else root / "base.pt"
        out = tmp_path / f"{name}.json"
        common = ["--tokenizer", str(tiny_tokenizer_dir), "--device", "cpu", "--dtype", "float32", "--max-docs", "3"]
        eval_main(["ppl", "--ckpt", str(ckpt), *extra, "--source", heldout, *common, "--out", str(out)])
        results[name] = json.loads(out.read_text())
    assert results["adapter"]["adapter"] == str(root / "adapter") and results["adapter"]["step"] == 30
    loss = {name: r["sources"]["heldout"]["loss_per_token"] for name, r in results.items()}
    assert loss["adapter"] == pytest.approx(loss["merged"], abs=1e-5) and abs(loss["adapter"] - loss["base"]) > 1e-3
    chat.main(
        [
            "--ckpt",
            str(root / "base.pt"),
            "--adapter",
            str(root / "adapter"),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--prompt",
            "头痛",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ]
    )
    assert f"+ adapter {root / 'adapter'}: phase sft, step 30" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="serve.py: .* is not a LoRA adapter folder"):
        serve.main(
            ["--ckpt", str(root / "base.pt"), "--adapter", str(tmp_path), "--tokenizer", str(tiny_tokenizer_dir)]
        )


def test_an_adapter_is_refused_on_another_model(adapter_on_export, tiny_tokenizer, tmp_path):
    root, _ = adapter_on_export
    other = wander(base_model(tiny_tokenizer.vocab_size))
    atomic_save(model_checkpoint(other, other.args, phase="clinical", step=8, run_id="base-run"), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="was trained on .*base.pt .*step 7.*pass that one"):
        load(tmp_path / "other.pt", tiny_tokenizer, adapter=root / "adapter")
    wide = tiny_model(tiny_tokenizer.vocab_size, dim=32, n_heads=2)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        lora.load_adapter(wide, root / "adapter")
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((root / "adapter" / "adapter_model.safetensors").read_bytes())
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=True"):
        lora.load_adapter(base_model(tiny_tokenizer.vocab_size), dora)
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        lora.load_adapter(base_model(tiny_tokenizer.vocab_size), tmp_path)


def test_a_damaged_adapter_is_refused_and_no_merged_file_written(adapter_on_export, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _ = adapter_on_export
    source = root / "adapter"
    config = json.loads((source / "adapter_config.json").read_text())
    with safe_open(str(source / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(source / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    damaged = tmp_path / "nan"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {**tensors, key: torch.full_like(tensors[key], float("nan"))}, damaged / "adapter_model.safetensors", metadata
    )
    out = tmp_path / "merged.pt"
    with pytest.raises(SystemExit, match="holds NaN or inf values"):
        merge_lora.main(["--ckpt", str(root / "base.pt"), "--adapter", str(damaged), "--out", str(out)])
    assert not out.exists()
    infinite = tmp_path / "inf"
    infinite.mkdir()
    (infinite / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    (infinite / "adapter_config.json").write_text(
        json.dumps(config).replace(f'"lora_alpha": {config["lora_alpha"]}', '"lora_alpha": Infinity')
    )
    with pytest.raises(CheckpointError, match="lora_alpha=inf must be positive numbers"):
        lora.load_adapter(base_model(tiny_tokenizer.vocab_size), infinite)


@pytest.mark.parametrize(
    "value,message",
    [
        ("--lora_rank=-1", "lora_rank must be >= 0"),
        ("--lora_targets=wq,wx", "unknown: wx"),
        ("--lora_dropout=1.0", "lora_dropout must be in"),
        ("--lora_alpha=1e400", "lora_alpha must be a number > 0, not inf"),
    ],
)
def test_bad_lora_settings_stop_before_anything_runs(tmp_path, tiny_tokenizer_dir, value, message):
    with pytest.raises(SystemExit, match=message):
        rank = [] if "rank" in value else ["--lora_rank=4"]
        run_sft(tmp_path, tmp_path / "out", tiny_tokenizer_dir, *rank, value)
    assert not (tmp_path / "out").exists()


def test_lora_sft_resumes_bit_exactly_and_saves_only_adapters(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, capsys):
    sft_setup(tmp_path, tiny_tokenizer)
    lora_args = ("--lora_rank=4", "--lora_dropout=0.1", "--learning_rate=1e-2")
    run_sft(tmp_path, tmp_path / "full", tiny_tokenizer_dir, *lora_args)
    run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, *lora_args, "--stop_at=3")
    run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, *lora_args, init_from="resume")
    full, part = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert len(full) == 8 and part == full
    assert full[-1][1] < full[0][1]
    ckpt = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    assert ckpt["model"] and all(".lora_" in key for key in ckpt["model"])
    assert ckpt["base"]["path"] == str(tmp_path / "pretrained.pt") and ckpt["lora"]["rank"] == 4
    with pytest.raises(CheckpointError, match="holds the LoRA adapters of a run"):
        load_model(tmp_path / "full" / "ckpt.pt")
    model, _, info, mode = load(tmp_path / "pretrained.pt", tiny_tokenizer, adapter=tmp_path / "full" / "adapter")
    assert info["step"] == 8 and mode == "chat"
    with pytest.raises(SystemExit, match="trained with LoRA"):  # resuming with other LoRA settings
        run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, "--lora_rank=8", init_from="resume")
    base = Transformer(model.args)
    atomic_save(model_checkpoint(base, base.args, step=11, phase="clinical"), tmp_path / "pretrained.pt")
    with pytest.raises(SystemExit, match="no longer the checkpoint this run was built on"):
        run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, *lora_args, "--max_iters=10", init_from="resume")


def test_exporting_a_lora_runs_checkpoint_points_to_merge_lora(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    """export_hf.py takes no --adapter: the message names the command that makes an exportable checkpoint."""
    run = tmp_path / "sft_lora"
    run.mkdir()
    save(
        tiny_model(tiny_tokenizer.vocab_size), run / "ckpt.pt", tiny_tokenizer, lora={"rank": 4}, base={"path": "b.pt"}
    )
    with pytest.raises(SystemExit) as refused:
        export_hf.main(
            ["--ckpt", str(run / "ckpt.pt"), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "hf")]
        )
    assert f"merge_lora.py --ckpt b.pt --adapter {run / 'adapter'} --out merged.pt" in str(refused.value)
    assert not (tmp_path / "hf").exists()
