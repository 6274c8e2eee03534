"""dpo.py and the preference readers: the loss against hand computations, log 2 at the start, pairs rendered with
the SFT template and cut alike, bad records counted, DDP == one process, reward accuracy rising on the sample,
LoRA + DPO resuming bit-exactly."""

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import corpora
import dpo
import lora
from checkpoint import atomic_save, model_checkpoint
from dataset_sft import render
from lm_head import IGNORE_INDEX
from model import ModelArgs, Transformer

from conftest import ROOT

PREFERENCE = ROOT / "data" / "sample" / "preference"
SAMPLE_SOURCES = [f"{name}={PREFERENCE / name}" for name in ("medical_reward", "dpo_pairs", "dpo_conversations")]
ARGS = dict(dim=32, n_layers=2, n_heads=2, max_seq_len=96)


def test_loss_equals_a_hand_computation():
    # rho_c = -10 - (-11) = 1, rho_r = -12 - (-11) = -1: margin beta * 2 = 1 at beta 0.5
    losses, chosen, rejected = dpo.dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.5
    )
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(1) = 0.31326
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    smoothed, _, _ = dpo.dpo_loss(
        torch.tensor([-10.0]),
        torch.tensor([-12.0]),
        torch.tensor([-11.0]),
        torch.tensor([-11.0]),
        beta=0.5,
        label_smoothing=0.2,
    )
    assert smoothed.item() == pytest.approx(0.8 * 0.3132617 + 0.2 * 1.3132617, rel=1e-6)


def tiny_pairs(vocab, seed=0):
    """Two pairs as the trainer sees them: rows [chosen 1, chosen 2, rejected 1, rejected 2], answers labelled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (4, 12), generator=g)
    y = torch.randint(3, vocab, (4, 12), generator=g)
    y[:, :5] = IGNORE_INDEX  # the prompt
    y[1, 9:] = IGNORE_INDEX  # a shorter answer
    return x, y


def full_logit_logps(model, x, y):
    """log p of each row's targets from the full logits: an implementation independent of the chunked loss."""
    logp = F.log_softmax(model(x).float(), dim=-1)
    keep = y != IGNORE_INDEX
    return (logp.gather(-1, y.clamp_min(0)[..., None])[..., 0] * keep).sum(dim=1)


def test_loss_metrics_and_gradients_match_an_independent_computation():
    torch.manual_seed(0)
    policy, reference = Transformer(ModelArgs(vocab_size=50, **ARGS)), Transformer(ModelArgs(vocab_size=50, **ARGS))
    x, y = tiny_pairs(50)
    loss, metrics = dpo.DPOModel(policy, reference, beta=0.3)(x, y)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in policy.named_parameters()}
    policy.zero_grad()
    pc, pr = full_logit_logps(policy, x, y).chunk(2)
    with torch.no_grad():
        rc, rr = full_logit_logps(reference, x, y).chunk(2)
    margin = 0.3 * ((pc - rc) - (pr - rr))
    expected = -F.logsigmoid(margin).sum()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["reward_accuracy"].item() == (margin > 0).sum().item()
    assert metrics["reward_margin"].item() == pytest.approx(margin.sum().item(), rel=1e-4, abs=1e-5)
    assert metrics["logp_chosen"].item() == pytest.approx(pc.sum().item(), rel=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_is_log_2_when_the_policy_is_the_reference():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=50, **ARGS))
    x, y = tiny_pairs(50, seed=1)
    copy = Transformer(model.args)
    copy.load_state_dict(model.state_dict())
    loss, metrics = dpo.DPOModel(model.eval(), copy, beta=0.1)(x, y)
    assert loss.item() / 2 == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["reward_accuracy"].item() == 0 and abs(metrics["reward_margin"].item()) < 1e-6
    # LoRA: the reference is the policy with its adapters off; fresh adapters (B = 0) change nothing yet
    lora.add_adapters(model.train(), 4, 8.0, 0.0)
    loss, _ = dpo.DPOModel(model, beta=0.1)(x, y)
    assert loss.item() / 2 == pytest.approx(math.log(2), rel=1e-6)
    assert model.training  # lora.disabled put the mode back


def write_jsonl(path, records, extra_lines=()):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "".join(extra_lines), encoding="utf-8"
    )
    return path


def test_readers_of_the_three_formats(tmp_path):
    counts = {}
    for spec in SAMPLE_SOURCES:
        problems = corpora.Problems()
        pairs = list(corpora.iter_preferences(corpora.parse_source(spec), problems))
        counts[spec.split("=")[0]] = len(pairs)
        assert problems.total == 0 and all(p["chosen"] != p["rejected"] for p in pairs)
    assert counts == {"medical_reward": 120, "dpo_pairs": 60, "dpo_conversations": 60}
    reward = write_jsonl(
        tmp_path / "reward.json",
        [
            {
                "system": "你是医生。",
                "history": [["头痛怎么办？", "多休息。"]],
                "question": "还发热呢？",
                "response_chosen": "请测体温并就医。",
                "response_rejected": "不用管。",
            },
            {"question": "问", "response_chosen": "同一个回答", "response_rejected": "同一个回答"},
            {"question": "问", "response_chosen": "答"},
            {"question": "", "response_chosen": "答", "response_rejected": "别的"},
        ],
        ["{broken\n"],
    )
    problems = corpora.Problems()
    pairs = list(corpora.iter_preferences(corpora.parse_source(f"medical_reward={reward}"), problems))
    assert pairs == [
        {
            "history": [("你是医生。\n头痛怎么办？", "多休息。")],
            "prompt": "还发热呢？",
            "chosen": "请测体温并就医。",
            "rejected": "不用管。",
        }
    ]
    assert problems.counts == {
        "chosen and rejected are the same answer": 1,
        "missing field 'response_rejected'": 1,
        "empty question or answer": 1,
        "malformed JSON line": 1,
    }
    assert f"{reward}:3: missing field 'response_rejected'" in problems.summary()
    trl = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "感冒吃什么药？"}],
                "chosen": [{"role": "assistant", "content": "对症用药，多喝水。"}],
                "rejected": [{"role": "assistant", "content": "抗生素。"}],
            },
            {
                "prompt": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
                "chosen": "甲",
                "rejected": "乙",
            },
        ],
    )
    problems = corpora.Problems()
    pairs = list(corpora.iter_preferences(corpora.parse_source(f"dpo_pairs={trl}"), problems))
    assert pairs == [
        {"history": [], "prompt": "简短回答。\n感冒吃什么药？", "chosen": "对症用药，多喝水。", "rejected": "抗生素。"}
    ]
    assert problems.counts == {"the conversation does not end with the question the answers answer": 1}
    conversations = write_jsonl(
        tmp_path / "conv.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "第一问"},
                    {"from": "gpt", "value": "第一答"},
                    {"from": "human", "value": "第二问"},
                ],
                "chosen": {"from": "gpt", "value": "好答案"},
                "rejected": {"from": "gpt", "value": "坏答案"},
            },
            {
                "conversations": [{"from": "human", "value": "问"}],
                "chosen": {"from": "gpt", "value": "答"},
                "rejected": 5,
            },
        ],
    )
    problems = corpora.Problems()
    pairs = list(corpora.iter_preferences(corpora.parse_source(f"dpo_conversations={conversations}"), problems))
    assert pairs == [{"history": [("第一问", "第一答")], "prompt": "第二问", "chosen": "好答案", "rejected": "坏答案"}]
    assert problems.counts == {"field 'rejected' is not text or one message": 1}


class ListTokenizer:
    """Characters as ids (enough to check layouts by hand)."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode_batch(self, texts):
        return [[10 + int(c) for c in text] for text in texts]


def test_pairs_share_their_context_and_label_only_the_final_answer(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "1"},
                    {"from": "gpt", "value": "2"},
                    {"from": "human", "value": "34"},
                ],
                "chosen": "56",
                "rejected": "7",
            }
        ],
    )
    tok = ListTokenizer()
    data = dpo.PreferenceData([corpora.parse_source(f"dpo_conversations={path}")], tok, seq_len=10, val_fraction=0)
    (chosen_x, chosen_y), (rejected_x, rejected_y) = data.rows[0]
    context = render([([11], [12]), ([13, 14], None)], 1, 2)[0]  # the history turn, then the question and <bos>
    assert list(chosen_x) == context + [15, 16] and list(rejected_x) == context + [17]
    assert list(chosen_y) == [IGNORE_INDEX] * (len(context) - 1) + [15, 16, 2]  # the history's answer is not scored
    assert list(rejected_y) == [IGNORE_INDEX] * (len(context) - 1) + [17, 2]
    X, Y = data.train_batches(0, 1, 1)[0]
    assert X.shape == (2, 10) and torch.equal(Y[0, : len(chosen_y)], torch.from_numpy(chosen_y).long())
    # seq_len 4: the earlier turn goes, then the question's start, as far as the longer answer needs, for both
    short = dpo.PreferenceData([corpora.parse_source(f"dpo_conversations={path}")], tok, seq_len=4, val_fraction=0)
    (cx, _), (rx, _) = short.rows[0]
    assert list(cx) == [14, 1, 15, 16] and list(rx) == [14, 1, 17]
    long = write_jsonl(
        tmp_path / "long.jsonl",
        [{"prompt": "0", "chosen": "1" * 20, "rejected": "2"}, {"prompt": "0", "chosen": "1", "rejected": "2"}],
    )
    pairs = dpo.PreferenceData([corpora.parse_source(f"dpo_pairs={long}")], tok, seq_len=10, val_fraction=0)
    assert len(pairs.rows) == 1 and pairs.dropped == {"answer longer than max_seq_len": 1}
    assert pairs.problems.total == 0


def batches_on_ranks(rank, world, init_file, result_file, lora_rank):
    """One DPO step of 4 pairs over `world` DDP ranks: (loss, grad norm, metrics) from rank 0."""
    import torch.distributed as dist

    from parallel import Dist
    from trainer import Trainer, default_config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    torch.manual_seed(0)
    policy = Transformer(ModelArgs(vocab_size=60, **ARGS))
    if lora_rank:
        model = dpo.DPOModel(lora.add_adapters(policy, lora_rank, 8.0), beta=0.5)
    else:
        reference = Transformer(policy.args)
        reference.load_state_dict(policy.state_dict())
        model = dpo.DPOModel(policy, reference, beta=0.5)
    cfg = default_config(
        dtype="float32",
        batch_size=2,
        grad_accum=1,
        learning_rate=1e-2,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.95,
        grad_clip=0.0,
        progress=False,
        tensorboard=False,
    )
    trainer = Trainer(model, cfg, Dist("cpu"), trained_only=bool(lora_rank))
    x1, y1 = tiny_pairs(60, seed=2)
    x2, y2 = tiny_pairs(60, seed=3)
    x = torch.cat([x1[:2], x2[:2], x1[2:], x2[2:]])  # 4 pairs: chosen rows, then rejected rows
    y = torch.cat([y1[:2], y2[:2], y1[2:], y2[2:]])
    y[2:4, 8:] = IGNORE_INDEX  # the second rank's pairs have shorter answers
    mine = [rank * 4 // world + i for i in range(4 // world)]
    rows = mine + [4 + i for i in mine]
    results = []
    for _ in range(2):  # the second step sees the first update
        loss, norm, pairs = trainer.train_step([(x[rows], y[rows])], 1e-2)
        results.append({"loss": loss, "norm": norm, "pairs": pairs, **trainer.step_metrics})
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def spawn(world, tmp_path, lora_rank=0):
    result = tmp_path / f"result_{world}_{lora_rank}.json"
    mp.spawn(
        batches_on_ranks, args=(world, tempfile.mktemp(dir=tmp_path), str(result), lora_rank), nprocs=world, join=True
    )
    return json.loads(result.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_ddp_two_processes_equal_one(tmp_path, lora_rank):
    one, two = spawn(1, tmp_path, lora_rank), spawn(2, tmp_path, lora_rank)
    assert one[0]["pairs"] == two[0]["pairs"] == 4
    assert one[0]["loss"] == pytest.approx(math.log(2), rel=1e-6) and one[1]["loss"] < one[0]["loss"]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def make_start(tmp_path, tok):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=256))
    atomic_save(
        model_checkpoint(model, model.args, step=40, phase="sft", tokenizer_fingerprint=tok.fingerprint),
        tmp_path / "sft.pt",
    )
    return tmp_path / "sft.pt"


def run_dpo(out, init_from, tokenizer_dir, *extra):
    dpo.main(
        [
            "config/dpo_tiny.py",
            f"--init_from={init_from}",
            f"--out_dir={out}",
            f"--tokenizer={tokenizer_dir}",
            "--progress=False",
            "--tensorboard=False",
            "--dtype=float32",
            *extra,
        ]
    )


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_reward_accuracy_rises_on_the_sample(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    run_dpo(
        tmp_path / "run",
        make_start(tmp_path, tiny_tokenizer),
        tiny_tokenizer_dir,
        "--max_iters=30",
        "--eval_interval=30",
        "--log_interval=1",
    )
    records = log(tmp_path / "run")
    train = [r for r in records if "reward_accuracy" in r]
    assert train[0]["reward_accuracy"] == 0 and train[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert sum(r["reward_accuracy"] for r in train[-5:]) / 5 > 0.8
    assert train[-1]["reward_margin"] > 0 and train[-1]["loss"] < math.log(2) - 0.05
    held_out = [v for k, v in records[-1].items() if k.endswith("/reward_accuracy")]
    assert len(held_out) == 3 and sum(held_out) / 3 > 0.7
    assert (tmp_path / "run" / "loss.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_dpo_resumes_bit_exactly(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, lora_rank):
    """With LoRA (the reference: the base, adapters off) and without (a frozen copy, reloaded on resume)."""
    start = make_start(tmp_path, tiny_tokenizer)
    extra = (
        f"--lora_rank={lora_rank}",
        "--lora_dropout=0.1",
        "--dropout=0.1",
        "--max_iters=6",
        "--eval_interval=3",
        "--log_interval=1",
        "--batch_size=4",
    )
    run_dpo(tmp_path / "full", start, tiny_tokenizer_dir, *extra)
    run_dpo(tmp_path / "part", start, tiny_tokenizer_dir, *extra, "--stop_at=3")
    run_dpo(tmp_path / "part", "resume", tiny_tokenizer_dir, *extra)
    keys = ("step", "loss", "reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected")
    full, part = (
        [tuple(r[k] for k in keys) for r in log(out) if "loss" in r] for out in (tmp_path / "full", tmp_path / "part")
    )
    assert len(full) == 6 and part == full
    ckpt = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    assert ckpt["phase"] == "dpo" and ckpt["base"]["path"] == str(start)
    assert all(".lora_" in key for key in ckpt["model"]) == bool(lora_rank)
    assert (tmp_path / "full" / "adapter" / "adapter_model.safetensors").is_file() == bool(lora_rank)


def test_resuming_on_other_data_is_refused(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    start, out = make_start(tmp_path, tiny_tokenizer), tmp_path / "run"
    short = ("--max_iters=4", "--eval_interval=100", "--batch_size=2")
    run_dpo(out, start, tiny_tokenizer_dir, *short, "--stop_at=2")
    one_source = '--sources=["dpo_pairs=data/sample/preference/dpo_pairs"]'
    for changed in (one_source, "--seed=7"):
        with pytest.raises(SystemExit, match=r"ckpt.pt was trained on other data \(rows sha256 .*--overwrite=True"):
            run_dpo(out, "resume", tiny_tokenizer_dir, *short, changed)
    run_dpo(out, "resume", tiny_tokenizer_dir, *short)  # the same data: goes on to the end
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


def test_bad_dpo_settings_stop_before_anything_runs(tmp_path, tiny_tokenizer_dir):
    for value, message in (
        ("--beta=0", "beta must be a number > 0"),
        ("--beta=1e400", "beta must be a number > 0, not inf"),
        ("--label_smoothing=0.5", "label_smoothing"),
        ("--parallel=fsdp", "parallel=ddp"),
        ("--sources=[]", "sources is empty"),
    ):
        with pytest.raises(SystemExit, match=message):
            run_dpo(tmp_path / "out", tmp_path / "missing.pt", tiny_tokenizer_dir, value)
    assert not (tmp_path / "out").exists()


def test_a_vision_language_checkpoint_is_refused_before_the_run_claims_its_folder(
    tmp_path, tiny_tokenizer, tiny_tokenizer_dir
):
    import sft

    start = torch.load(make_start(tmp_path, tiny_tokenizer), weights_only=True)
    start["model_args"]["vision"] = {"image_tokens": 4}
    atomic_save(start, tmp_path / "vlm.pt")
    with pytest.raises(SystemExit, match="vlm.pt is a vision-language checkpoint: fine-tune it with vlm_train.py"):
        run_dpo(tmp_path / "dpo", tmp_path / "vlm.pt", tiny_tokenizer_dir)
    with pytest.raises(SystemExit, match="vlm.pt is a vision-language checkpoint"):
        sft.main(
            [
                "config/sft_tiny.py",
                f"--init_from={tmp_path / 'vlm.pt'}",
                f"--out_dir={tmp_path / 'sft'}",
                f"--tokenizer={tiny_tokenizer_dir}",
            ]
        )
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "sft").exists()
