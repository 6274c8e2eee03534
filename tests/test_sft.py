"""sft_data_process.py, dataset_sft.py, sft.py: the CSV, the template, the answer-only loss."""

import csv
import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import corpora
import sft_data_process
from dataset_sft import SFTData, encode_turns, fit_turns, labels_for, render
from lm_head import IGNORE_INDEX
from model import ModelArgs, Transformer

from conftest import ROOT, SAMPLE, SAMPLE_SOURCES, tiny_model

BOS, EOS = 1, 2
SFT_SOURCES = SAMPLE_SOURCES["sft"]


def test_labels_hand_computed():
    # prompt [10, 11], answer [20, 21]: ids = 10 11 <bos> 20 21 <eos>
    ids, is_answer = render([([10, 11], [20, 21])], BOS, EOS)
    assert ids == [10, 11, BOS, 20, 21, EOS]
    x, y = labels_for(ids, is_answer)
    assert x == [10, 11, BOS, 20, 21]
    assert y == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, EOS]  # targets: every answer token and the <eos>


def test_multi_turn_history_placement():
    turns = [([10], [20]), ([11, 12], [21, 22])]  # earlier turn first
    ids, is_answer = render(turns, BOS, EOS)
    assert ids == [10, BOS, 20, EOS, 11, 12, BOS, 21, 22, EOS]
    x, y = labels_for(ids, is_answer)
    assert y == [IGNORE_INDEX, 20, EOS, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 21, 22, EOS]
    chat, _ = render(turns[:1] + [([11, 12], None)], BOS, EOS)  # what chat.py feeds the model
    assert chat == [10, BOS, 20, EOS, 11, 12, BOS]


def test_truncation_keeps_answers_whole():
    turns = [([1] * 5, [2] * 5), ([3] * 10, [4] * 6)]
    assert fit_turns(turns, 100) == turns
    assert fit_turns(turns, 19) == [([3] * 10, [4] * 6)]  # earliest turn dropped first
    assert fit_turns(turns, 12) == [([3] * 4, [4] * 6)]  # then the start of the last prompt
    assert fit_turns(turns, 8) is None  # the answer (6 + <eos>) and one prompt token + <bos> don't fit


def test_prompt_targets_do_not_change_the_loss():
    model = tiny_model(100, dim=32, n_heads=2, n_kv_heads=None, max_seq_len=64)
    ids, is_answer = render([([10, 11, 12, 13], [20, 21, 22])], BOS, EOS)
    x, y = map(torch.tensor, labels_for(ids, is_answer))
    other_ids, other_mask = render([([50, 51, 52, 53], [20, 21, 22])], BOS, EOS)  # other prompt tokens
    _, y_other = map(torch.tensor, labels_for(other_ids, other_mask))
    assert torch.equal(model(x[None], y[None]), model(x[None], y_other[None]))
    unmasked = torch.tensor(ids[1:])  # the same row with prompt targets counted: a different loss
    assert not torch.isclose(model(x[None], y[None]), model(x[None], unmasked[None]))
    per_token = model(x[None], y[None], reduction="none")[0]
    assert (per_token[:4] == 0).all() and (per_token[4:] > 0).all()  # 4 prompt targets (incl. <bos>), 4 answer targets
    assert torch.isclose(model(x[None], y[None]), per_token.sum() / 4)


def test_padding_rows_contribute_nothing():
    model = tiny_model(100, dim=32, n_heads=2, n_kv_heads=None, max_seq_len=64)
    x = torch.randint(3, 100, (1, 12))
    y = torch.randint(3, 100, (1, 12))
    y[0, :4] = IGNORE_INDEX
    pad_x, pad_y = torch.zeros(1, 12, dtype=torch.long), torch.full((1, 12), IGNORE_INDEX)
    alone = model(x, y, reduction="sum")
    with_pad = model(torch.cat([x, pad_x]), torch.cat([y, pad_y]), reduction="sum")
    assert torch.equal(alone, with_pad)
    assert torch.isclose(model(torch.cat([x, pad_x]), torch.cat([y, pad_y])), alone / 8)


@pytest.fixture(scope="module")
def sft_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "sft_data.csv"
    sources = [corpora.parse_source(f"{name}={SAMPLE / name}") for name in SFT_SOURCES]
    summary = sft_data_process.process(sources, out)
    return out, summary


def test_every_sft_sample_set_is_read(sft_csv):
    _, summary = sft_csv
    assert set(summary) == set(SFT_SOURCES)
    for name, s in summary.items():
        assert s["kept"] > 0 and s["read"] >= s["kept"], (name, s)
    with open(sft_csv[0], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    multi = [r for r in rows if json.loads(r["history"])]
    assert {r["source"] for r in multi} >= {"huatuo", "disc_med", "belle_multiturn", "sharegpt"}
    assert sum(s["kept"] for s in summary.values()) == len(rows)


def test_csv_round_trips_commas_quotes_newlines(tmp_path):
    tricky = tmp_path / "tricky.jsonl"
    records = [
        {"query": '他说："头痛, 发热"，怎么办？', "response": '第一，多喝水；\n第二，休息。\n"注意"体温, 必要时就医。'},
        {"query": "重复", "response": "重复的回答"},
        {"query": "重复", "response": "重复的回答"},
        {"query": "", "response": "没有问题"},
        {"oops": 1},
    ]
    tricky.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n{not json\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    summary = sft_data_process.process([corpora.parse_source(f"chatmed_consult={tricky}")], out)
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prompt"], r["answer"]) for r in rows] == [
        (records[0]["query"], records[0]["response"]),
        ("重复", "重复的回答"),
    ]
    s = summary["chatmed_consult"]
    assert s["kept"] == 2 and s["dropped"] == {"duplicate": 1}
    assert sum(s["skipped_records"].values()) == 3  # empty prompt, wrong fields, broken JSON line
    assert s["read"] == 6  # every record of the file, each kept, dropped or skipped once
    assert any(":7" in e or ":6" in e for e in s["examples"])  # file:line of a bad record
    assert json.loads((tmp_path / "out.summary.json").read_text())["chatmed_consult"]["kept"] == 2


def test_summary_counts_each_record_once_and_parts_apart(tmp_path):
    conversations = [
        [{"from": "human", "value": "头痛怎么办？"}, {"from": "gpt", "value": "多休息。"}],
        [{"from": "gpt", "value": "你好"}, {"from": "human", "value": "发烧了"}],  # no complete turn
        ["not a message", {"from": "gpt", "value": "x"}],
        [
            {"from": "gpt", "value": "开场白"},
            {"from": "human", "value": "问"},
            {"from": "gpt", "value": "答"},
            {"from": "human", "value": "无人回答"},
        ],
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": c} for c in conversations], ensure_ascii=False), encoding="utf-8")
    s = sft_data_process.process([corpora.parse_source(f"sharegpt={path}")], tmp_path / "out.csv")["sharegpt"]
    assert s["read"] == 4 and s["kept"] == 2
    assert s["skipped_records"] == {
        "no complete question-answer turn": 1,
        "a message of 'conversations' is not an object": 1,
    }
    assert s["parts_left_out"] == {"answer before any question": 2, "last question without an answer": 2}
    assert s["read"] == s["kept"] + sum(s["dropped"].values()) + sum(s["skipped_records"].values())


def test_length_filters(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(
        json.dumps({"query": "问" * 50, "response": "答"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"query": "问", "response": "答" * 50}, ensure_ascii=False)
        + "\n"
        + json.dumps({"query": "问", "response": "答"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    summary = sft_data_process.process([corpora.parse_source(f"chatmed_consult={src}")], tmp_path / "o.csv", 20, 20)
    assert summary["chatmed_consult"]["dropped"] == {"prompt too long": 1, "answer too long": 1}
    assert summary["chatmed_consult"]["kept"] == 1


def test_sft_data_batches_mask_answers(sft_csv, tokenizer, tmp_path):
    """The batches the trainer receives: targets exactly at the answer tokens and the closing <eos>, each
    predicted from the token before it (expected rows built here from the texts, not by labels_for)."""
    conversations = [
        ("头痛怎么办？", "多休息，多喝水。"),
        ("发烧三天了", "请尽快就医。"),
        ("咳嗽有痰", "可以多喝温水，观察几天。"),
    ]
    path = tmp_path / "three.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "answer", "history", "source"])
        writer.writerows([(q, a, "[]", "s") for q, a in conversations])
    small = SFTData(path, tokenizer, seq_len=64, seed=0, val_fraction=0.0)
    ((x, y),) = small.train_batches(0, 1, 3)
    assert x.shape == y.shape and x.shape[1] == 32  # the longest row, rounded up to 32
    expected = {}
    for q, a in conversations:
        p_ids, a_ids = tokenizer.encode_batch([q])[0], tokenizer.encode_batch([a])[0]
        row_x = p_ids + [tokenizer.bos_id] + a_ids
        row_y = [IGNORE_INDEX] * len(p_ids) + a_ids + [tokenizer.eos_id]
        expected[tuple(row_x)] = row_y
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        key = next(k for k in expected if tuple(row_x[: len(k)]) == k)
        assert row_y == expected[key] + [IGNORE_INDEX] * (len(row_y) - len(expected[key]))
    data = SFTData(sft_csv[0], tokenizer, seq_len=256, seed=0, val_fraction=0.1)
    whole = data.train_batches(3, 1, 8)[0]
    split = [data.train_batches(3, 2, 4)[0], data.train_batches(3, 2, 4)[1]]
    assert torch.equal(whole[1][:4, : split[0][1].shape[1]], split[0][1][:, : whole[1].shape[1]])
    packed = SFTData(sft_csv[0], tokenizer, seq_len=256, seed=0, val_fraction=0.1, pack=True)
    assert len(packed.epoch(0)) < len(data.epoch(0))
    assert sorted(i for row in packed.epoch(0) for i in row) == sorted(data.train_ids.tolist())
    assert set(data.val_batches(4)) <= set(SFT_SOURCES)


@pytest.mark.slow
def test_sft_lowers_answer_loss(tmp_path, sft_csv, tiny_tokenizer_dir):
    """A random model fine-tuned on the sample SFT sets: the held-out answer loss falls well below a fresh model's."""
    from chatglm_tokenizer import load_tokenizer
    from checkpoint import atomic_save, model_checkpoint

    tok = load_tokenizer(tiny_tokenizer_dir)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=512)
    torch.manual_seed(0)
    atomic_save(
        model_checkpoint(Transformer(args), args, step=0, phase="init", tokenizer_fingerprint=tok.fingerprint),
        tmp_path / "init.pt",
    )
    out = tmp_path / "sft"
    result = subprocess.run(
        [
            sys.executable,
            "sft.py",
            "config/sft_tiny.py",
            f"--sft_csv={sft_csv[0]}",
            f"--init_from={tmp_path / 'init.pt'}",
            f"--tokenizer={tiny_tokenizer_dir}",
            f"--out_dir={out}",
            "--max_iters=60",
            "--eval_interval=30",
            "--learning_rate=3e-3",
            "--progress=False",
            "--tensorboard=False",
            "--val_fraction=0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r["val/val"] for r in records if "val/val" in r]
    train = [r["loss"] for r in records if "loss" in r]
    # a fresh model's answer loss is about ln(vocab); after 60 steps the held-out answers' is far below it
    assert len(val) == 2 and val[-1] < math.log(tok.vocab_size) - 1.5 and val[-1] < val[0], (train, val)
    assert train[-1] < train[0] - 1.0, (train, val)
    assert (out / "ckpt.pt").is_file() and (out / "loss.png").is_file()


# ---------------------------------------------------------------- bad rows never shift conversations

GOOD = [("问题一", "回答一", []), ("问题二", "回答二", [["早先的问题", "早先的回答"]]), ("问题三", "回答三", [])]
BAD_ROWS = [  # (CSV line as written, the reason it is counted under)
    ('问题甲,回答甲,"[[""p"", ""a"", ""extra""]]",s\n', "a turn is not [prompt, answer] of two strings"),
    ("问题乙,回答乙,5,s\n", "history is not a list of [prompt, answer] turns"),
    ('问题丙,回答丙,"[[""only one""]]",s\n', "a turn is not [prompt, answer] of two strings"),
    ('问题丁,回答丁,"[[1, 2]]",s\n', "a turn is not [prompt, answer] of two strings"),
    ('问题戊,回答戊,"[[""p"", """"]]",s\n', "a turn has an empty prompt or answer"),
    ('问题己,回答己,"{""p"": ""a""}",s\n', "history is not a list of [prompt, answer] turns"),
    ("问题庚,回答庚,not json,s\n", "history is not JSON"),
    (",回答辛,[],s\n", "a turn has an empty prompt or answer"),
    ("问题壬,回答壬\n", "CSV row with the wrong number of fields"),
    ("问题癸,回答癸,[],s,extra\n", "CSV row with the wrong number of fields"),
]


def write_sft_csv(path, unterminated=False):
    """GOOD rows with a bad row before each of them and after the last; optionally an unterminated quote."""
    lines = ["prompt,answer,history,source\n"]
    for i, (prompt, answer, history) in enumerate(GOOD):
        lines += [row for row, _ in BAD_ROWS[i :: len(GOOD)]]
        lines.append(f'{prompt},{answer},"{json.dumps(history, ensure_ascii=False).replace(chr(34), 2 * chr(34))}",s\n')
    if unterminated:
        lines.append('"问题子,回答子,[],s\n问题丑,回答丑,[],s\n')
    path.write_text("".join(lines), encoding="utf-8")
    return lines


def test_malformed_sft_rows_are_counted_and_never_shift_later_conversations(tmp_path, tokenizer):
    path = tmp_path / "sft.csv"
    lines = write_sft_csv(path, unterminated=True)
    data = SFTData(path, tokenizer, seq_len=256, val_fraction=0)
    assert len(data.offsets) - 1 == len(GOOD)
    for i, (prompt, answer, history) in enumerate(GOOD):  # each conversation is its own text, encoded by hand
        turns = [
            (tokenizer.encode_batch([p])[0], tokenizer.encode_batch([a])[0]) for p, a in history + [[prompt, answer]]
        ]
        ids, is_answer = render(turns, tokenizer.bos_id, tokenizer.eos_id)
        tokens, mask = data.sample(i)
        assert tokens.tolist() == ids and mask.tolist() == is_answer
    expected = {}
    for _, reason in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    expected["CSV row with the wrong number of fields"] += 1  # the unterminated quote swallows the rest: one row
    assert dict(data.problems.counts) == expected
    first_bad = lines.index(BAD_ROWS[0][0]) + 1
    assert any(
        f"{path}:{first_bad}: a turn is not [prompt, answer] of two strings" in e for e in data.problems.examples
    )
    assert any(f"lines {len(lines)}-{len(lines) + 1} (an unterminated quote?)" in e for e in data.problems.examples)
    assert "bad CSV row(s) skipped" in data.describe()


def test_encode_turns_keeps_every_text_with_its_own_turn(tokenizer):
    conversations = [[("甲问", "甲答")], [("乙问一", "乙答一"), ("乙问二", None)], [], [("丙问", "丙答")]]
    encoded = encode_turns(tokenizer, conversations)
    by_hand = [
        [(tokenizer.encode_batch([p])[0], None if a is None else tokenizer.encode_batch([a])[0]) for p, a in turns]
        for turns in conversations
    ]
    assert encoded == by_hand
    with pytest.raises(ValueError):
        encode_turns(tokenizer, [[("p", "a", "extra")]])


def test_sft_data_process_never_writes_non_text_or_nothing(tmp_path):
    huatuo = tmp_path / "HuatuoGPT_sft_data_v1.jsonl"
    huatuo.write_text(
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {"data": [None, None]},
                {"data": [1, 2]},
                {"data": [[], {}]},
                {"data": ["问：头痛", "答：多休息"]},
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.csv"
    summary = sft_data_process.process([corpora.parse_source(f"huatuo={huatuo}")], out)
    with open(out, encoding="utf-8", newline="") as f:
        assert [(r["prompt"], r["answer"]) for r in csv.DictReader(f)] == [("头痛", "多休息")]
    assert summary["huatuo"]["skipped_records"] == {"field 'data' holds a non-text utterance": 3}

    before = out.read_bytes()
    only_junk = tmp_path / "ChatMed_Consult.json"
    only_junk.write_text('{"query": 5, "response": null}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        sft_data_process.main(
            ["--source", f"huatuo={huatuo}", "--source", f"chatmed_consult={only_junk}", "--out", str(out)]
        )
    message = str(exit_info.value)
    assert message.startswith(f"sft_data_process: nothing written to {out}: source 'chatmed_consult' yielded no")
    assert "field 'query' is not text" in message and "query -> response" in message  # what it expected
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []


def test_sft_data_process_out_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"query": "问", "response": "答"}, ensure_ascii=False) + "\n", encoding="utf-8")
    source = ["--source", f"chatmed_consult={src}"]
    with pytest.raises(SystemExit, match="is a folder: give a file"):
        sft_data_process.main(source + ["--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        sft_data_process.main(source + ["--out", str(tmp_path / "o.csv"), "--max-prompt-chars", "-1"])
    assert exit_info.value.code == 2 and "--max-prompt-chars must be >= 0" in capsys.readouterr().err

    with pytest.raises(SystemExit, match=f"--out would overwrite {src}, an input file of source 'chatmed_consult'"):
        sft_data_process.main(source + ["--out", str(src)])
    assert json.loads(src.read_text(encoding="utf-8")) == {"query": "问", "response": "答"}
    with pytest.raises(SystemExit, match="--source name chatmed_consult given twice"):
        sft_data_process.main(source + source + ["--out", str(tmp_path / "o.csv")])
    sft_data_process.main(source + ["--out", str(tmp_path / "v1.5")])
    assert (tmp_path / "v1.5.summary.json").is_file()

    class FullDisk(csv.DictWriter):
        def writerow(self, row):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sft_data_process.csv, "DictWriter", FullDisk)
    with pytest.raises(SystemExit) as exit_info:
        sft_data_process.main(source + ["--out", str(tmp_path / "sft" / "o.csv")])
    out = tmp_path / "sft" / "o.csv"
    assert str(exit_info.value) == f"sft_data_process: cannot write {out}: No space left on device"
    assert list((tmp_path / "sft").iterdir()) == []


def test_a_csv_without_one_good_row_is_refused_with_its_reasons(tmp_path, tokenizer):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,answer,history,source\n" + "".join(row for row, _ in BAD_ROWS), encoding="utf-8")
    with pytest.raises(ValueError, match="no usable conversation .*'history is not JSON': 1.*bad.csv:2: a turn is not"):
        SFTData(path, tokenizer, seq_len=256)
    (tmp_path / "wrong.csv").write_text("question,response\n问,答\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing columns \['answer', 'prompt'\]"):
        SFTData(tmp_path / "wrong.csv", tokenizer, seq_len=256)
