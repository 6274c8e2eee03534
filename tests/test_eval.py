"""eval.py: perplexity windows and bits/char, the multiple-choice harness, answers for review."""

import csv
import errno
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import eval as ev
from corpora import parse_source
from lm_head import IGNORE_INDEX

from conftest import SAMPLE, save, tiny_model

# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("stride", [None, 8, 3])
def test_windows_predict_every_token_once(stride):
    eos, ids = 2, list(range(100, 125))
    seq = [eos] + ids
    rows = ev.windows(ids, eos, max_len=8, stride=stride)
    scored = []
    for x, y in rows:
        assert len(x) == len(y) <= 8
        start = seq.index(x[0])
        assert x == seq[start : start + len(x)]  # a contiguous window
        for k, target in enumerate(y):  # every target is the id after its input
            if target != IGNORE_INDEX:
                assert target == seq[start + k + 1]
                scored.append(target)
    assert scored == ids  # each once, in order: no double counting, nothing left out
    if stride == 3:
        assert all(len(x) == 8 for x, _ in rows) and len(rows) == 1 + 6  # 8 predictions, then 3 at a time (the last 2)


def test_bits_per_char_hand_example(tiny_tokenizer):
    """A model whose weights are all zero predicts uniformly: every token costs ln V nats exactly."""
    tok = tiny_tokenizer
    model = tiny_model(tok.vocab_size, max_seq_len=8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    text = "高血压患者应定期监测血压，遵医嘱服药。糖尿病需要控制饮食、规律运动。" * 2
    ids = tok.encode_batch([text])[0]
    assert len(ids) + 1 > 2 * 8  # three windows or more
    r = ev.perplexity(model, tok, [(ids + [tok.eos_id], len(text))])
    V = tok.vocab_size
    assert r["tokens"] == len(ids) + 1 and r["chars"] == len(text)
    assert r["loss_per_token"] == pytest.approx(math.log(V), rel=1e-5)
    assert r["ppl"] == pytest.approx(V, rel=1e-4)
    assert r["bits_per_char"] == pytest.approx((len(ids) + 1) * math.log2(V) / len(text), rel=1e-5)
    sliding = ev.perplexity(model, tok, [(ids + [tok.eos_id], len(text))], stride=3)
    assert sliding["tokens"] == r["tokens"] and sliding["nats"] == pytest.approx(r["nats"], rel=1e-5)
    assert ev.ppl_summary(12 * math.log(2), 4, 6, 1)["bits_per_char"] == pytest.approx(2.0)  # 12 bits over 6 chars
    assert ev.ppl_summary(12 * math.log(2), 4, 6, 1)["ppl"] == pytest.approx(8.0)  # 3 bits per token


def test_trained_model_has_lower_ppl_on_its_text_than_shuffled(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "高血压患者应定期监测血压，遵医嘱服药。糖尿病需要控制饮食、规律运动。感冒多喝水，注意休息。"
    stream = torch.tensor((tok.encode_batch([text])[0] + [tok.eos_id]) * 40)
    model = tiny_model(tok.vocab_size, dim=48, n_layers=1, max_seq_len=32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(stream) - 33, (16,), generator=g)
        rows = torch.stack([stream[s : s + 33] for s in starts])
        loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    chars = list(text)
    random.Random(0).shuffle(chars)
    shuffled = "".join(chars)
    own, other = (
        ev.perplexity(model, tok, [(tok.encode_batch([t])[0] + [tok.eos_id], len(t))]) for t in (text, shuffled)
    )
    assert own["ppl"] < 3 and own["ppl"] * 10 < other["ppl"]
    assert own["bits_per_char"] < other["bits_per_char"]


def test_ppl_cli_reads_text_and_token_folders_alike(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    tok = tiny_tokenizer
    ckpt = save(tiny_model(tok.vocab_size, max_seq_len=64), tmp_path / "ckpt.pt", tok, step=7, phase="clinical")
    heldout = SAMPLE / "heldout" / "medical_heldout.txt"
    docs = ev.text_documents(parse_source(f"heldout={heldout}"), tok)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    np.array([i for ids, _ in docs for i in ids], dtype=np.uint16).tofile(tokens / "tokens_0000.bin")
    (tokens / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": tok.fingerprint}}))
    out = tmp_path / "ppl.json"
    results = ev.main(
        [
            "ppl",
            "--ckpt",
            ckpt,
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--device",
            "cpu",
            "--source",
            f"heldout={heldout}",
            "--source",
            f"shards={tokens}",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text(encoding="utf-8")) == results
    text, shards = results["sources"]["heldout"], results["sources"]["shards"]
    assert text["documents"] == shards["documents"] == len(docs) > 1
    assert text["tokens"] == shards["tokens"] and text["chars"] == shards["chars"]
    assert text["nats"] == pytest.approx(shards["nats"], rel=1e-6)
    assert results["stride"] == 64 and results["phase"] == "clinical" and results["step"] == 7
    two = ev.main(
        [
            "ppl",
            "--ckpt",
            ckpt,
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--source",
            f"shards={tokens}",
            "--max-docs",
            "2",
        ]
    )
    assert two["sources"]["shards"]["documents"] == 2
    (tokens / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": "f" * 64}}))
    with pytest.raises(SystemExit, match="another tokenizer"):
        ev.main(["ppl", "--ckpt", ckpt, "--tokenizer", str(tiny_tokenizer_dir), "--source", f"shards={tokens}"])


# ---------------------------------------------------------------- multiple choice


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header] + rows)


CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
VAL = [  # answers, and the option each table below prefers (marked *)
    ["0", "诊断痛风最有价值的检查是____", "血尿酸测定*", "腹部超声", "睡眠日记", "血脂四项", "A", ""],
    ["1", "治疗肺结核常用____", "人工泪液", "铁剂", "抗结核药物*", "质子泵抑制剂", "C", ""],
    ["2", "缺铁性贫血首选____", "口服铁剂", "降压药*", "抗病毒药", "激素", "A", ""],
    ["3", "过敏性鼻炎首选检查____", "胃镜", "过敏原检测*", "骨密度", "肌电图", "B", ""],
]
DEV = [
    ["0", "成人正常心率是____", "40次", "60~100次", "150次", "200次", "B", "常识"],
    ["1", "人体最大的器官是____", "心脏", "肝脏", "皮肤", "肺", "C", ""],
]


def table_scorer(tok, values, per_token, seen=None):
    """A scorer from a table {option text: value}: the summed log-prob is value * tokens (so the mean
    is the value) or the value itself (so the sum is)."""

    def score(requests):
        out = []
        for context, continuation in requests:
            text = tok.decode(continuation).strip()
            if seen is not None:
                seen.append((tok.decode(context), text))
            out.append(values.get(text, -5.0) * (len(continuation) if per_token else 1))
        return out

    return score


def ceval_dir(tmp_path):
    root = tmp_path / "ceval"
    write_csv(root / "val" / "anatomy_val.csv", CEVAL_HEADER, [[c.rstrip("*") for c in row] for row in VAL])
    write_csv(root / "dev" / "anatomy_dev.csv", CEVAL_HEADER, DEV)
    preferred = {c.rstrip("*"): -1.0 for row in VAL for c in row if c.endswith("*")}
    return root, preferred


@pytest.mark.parametrize("norm,per_token", [("mean", True), ("sum", False)])
def test_mcq_accuracy_and_chance_exact(tiny_tokenizer, tmp_path, norm, per_token):
    tok = tiny_tokenizer
    root, preferred = ceval_dir(tmp_path)
    r = ev.evaluate_mcq(parse_source(f"ceval={root}"), tok, table_scorer(tok, preferred, per_token), "continue")
    s = r["overall"]
    assert s["n"] == 4 and s[f"correct_{norm}"] == 3 and s[f"accuracy_{norm}"] == 0.75 and s["chance"] == 0.25
    assert list(r["subjects"]) == ["anatomy"] and r["subjects"]["anatomy"][f"accuracy_{norm}"] == 0.75
    assert [i["predicted"][norm] for i in r["items"]] == ["A", "C", "B", "B"]
    assert r["multi"]["n"] == 0 and r["skipped"] == {}


@pytest.mark.parametrize("mode", ["continue", "chat"])
def test_mcq_few_shot_from_dev_split_and_prompt_format(tiny_tokenizer, tmp_path, mode):
    tok = tiny_tokenizer
    root, preferred = ceval_dir(tmp_path)
    seen = []
    r = ev.evaluate_mcq(parse_source(f"ceval={root}"), tok, table_scorer(tok, preferred, True, seen), mode, shots=1)
    assert r["overall"]["n"] == 4  # dev questions give shots only
    assert r["files"][str(root / "val" / "anatomy_val.csv")]["shots_from"] == str(root / "dev" / "anatomy_dev.csv")
    assert len(seen) == 16 and all(i["shots"] == 1 for i in r["items"])
    context, option = seen[0]
    assert "成人正常心率是" in context and "60~100次" in context  # the first dev question, its answer's text
    assert "人体最大的器官是" not in context and "治疗肺结核" not in context
    assert option == "血尿酸测定"
    if mode == "continue":
        assert context.startswith("问题：成人正常心率是") and context.endswith(
            "问题：" + VAL[0][1] + "\nA. 血尿酸测定\nB. 腹部超声\nC. 睡眠日记\nD. 血脂四项\n答案："
        )
    else:
        assert context.endswith("D. 血脂四项<s>") and "60~100次</s>" in context  # template: shot turn, open turn


CMB = [
    {
        "id": 1,
        "exam_subject": "内科",
        "question_type": "单项选择题",
        "question": "贫血初筛首选",
        "option": {"A": "头颅CT", "B": "血常规", "C": "肌电图", "D": "骨密度", "E": ""},
        "answer": "B",
    },
    {
        "id": 2,
        "exam_subject": "内科",
        "question_type": "多项选择题",
        "question": "糖尿病典型症状有",
        "option": {"A": "多饮", "B": "震颤", "C": "多尿", "D": ""},
        "answer": "AC",
    },
    {
        "id": 3,
        "exam_subject": "风湿科",
        "question_type": "多项选择题",
        "question": "痛风患者应",
        "option": {"A": "少吃内脏", "B": "戒酒", "C": "喝甜饮料", "D": "多饮水"},
        "answer": "ABD",
    },
]


def test_cmb_multi_answer_exact_set_and_cmexam_skips_unknown(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    (tmp_path / "cmb").mkdir()
    (tmp_path / "cmb" / "CMB-val-merge.json").write_text(json.dumps(CMB, ensure_ascii=False), encoding="utf-8")
    table = {"血常规": -1.0, "多饮；多尿": -1.0, "少吃内脏；戒酒": -1.0}  # right, right, a subset of the gold set
    seen = []
    r = ev.evaluate_mcq(
        parse_source(f"cmb={tmp_path / 'cmb'}"), tok, table_scorer(tok, table, True, seen), "chat", shots=1
    )
    assert len(seen) == 4 + 7 + 15  # single options; every non-empty combination of 3 and of 4 options
    assert [i["predicted"]["mean"] for i in r["items"]] == ["B", "AC", "AB"]
    assert r["overall"]["correct_mean"] == 2 and r["multi"]["n"] == 2 and r["multi"]["correct_mean"] == 1
    assert r["single"]["accuracy_mean"] == 1.0
    assert r["overall"]["chance"] == pytest.approx((1 / 4 + 1 / 7 + 1 / 15) / 3)
    assert r["subjects"]["风湿科"]["chance"] == pytest.approx(1 / 15)
    assert r["files"][str(tmp_path / "cmb" / "CMB-val-merge.json")]["shots_from"] == "same file"
    for context, _ in seen[:4]:  # the shot is the first other question, never the one asked
        assert context.count("贫血初筛首选") == 1 and "糖尿病典型症状有" in context
    for context, _ in seen[4:11]:
        assert context.count("糖尿病典型症状有") == 1 and "贫血初筛首选" in context

    header = ["Question", "Options", "Answer", "Explanation", "Clinical Department"]
    write_csv(
        tmp_path / "cmexam" / "val.csv",
        header,
        [
            ["贫血初筛首选", "A 头颅CT\nB 血常规\nC 肌电图", "B", "", "血液科"],
            ["无答案的题", "A 甲\nB 乙", "", "", "血液科"],
            ["痛风患者应", "A 少吃内脏\nB 喝甜饮料", "A", "", "风湿科"],
        ],
    )
    r = ev.evaluate_mcq(
        parse_source(f"cmexam={tmp_path / 'cmexam'}"), tok, table_scorer(tok, {"喝甜饮料": -1.0}, True), "continue"
    )
    assert r["skipped"] == {ev.NO_ANSWER: 1} and r["overall"]["n"] == 2 and r["overall"]["correct_mean"] == 0
    assert r["skipped_examples"] == [f"{tmp_path / 'cmexam' / 'val.csv'}:5: {ev.NO_ANSWER}"]  # row 1 spans lines 2-4
    assert r["overall"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert set(r["subjects"]) == {"血液科", "风湿科"}


def test_mcq_sample_files_end_to_end(tiny_tokenizer, tiny_tokenizer_dir, tmp_path, capsys):
    tok = tiny_tokenizer
    ckpt = save(tiny_model(tok.vocab_size, max_seq_len=256), tmp_path / "sft.pt", tok, step=7, phase="sft")
    out = tmp_path / "mcq.json"
    sources = [f"{name}={SAMPLE / 'eval' / name}" for name in ("ceval", "cmmlu", "cmb", "cmexam")]
    ev.main(
        [
            "mcq",
            "--ckpt",
            ckpt,
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--shots",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
        + [arg for s in sources for arg in ("--source", s)]
    )
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["mode"] == "chat" and results["shots"] == 1 and results["norm"] == "mean"
    counts = {name: (r["overall"]["n"], r["multi"]["n"], r["skipped"]) for name, r in results["sources"].items()}
    assert counts == {
        "ceval": (20, 0, {}),
        "cmmlu": (20, 0, {}),
        "cmb": (16, 2, {}),
        "cmexam": (15, 0, {ev.NO_ANSWER: 1}),
    }
    for name, r in results["sources"].items():
        assert r["truncated"] == 0 and r["shot_pool_skipped"] == {}
        assert sum(s["n"] for s in r["subjects"].values()) == r["overall"]["n"] == len(r["items"])
    assert results["sources"]["ceval"]["overall"]["chance"] == 0.25
    assert results["sources"]["cmb"]["multi"]["chance"] == pytest.approx((1 / 15 + 1 / 31) / 2)  # 4 and 5 options
    assert (
        "dev"
        in results["sources"]["cmmlu"]["files"][str(SAMPLE / "eval" / "cmmlu" / "test" / "clinical_knowledge.csv")][
            "shots_from"
        ]
    )
    printed = capsys.readouterr().out
    assert "multi-answer (exact set)" in printed and "chance" in printed


def test_generate_writes_answers_side_by_side(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    tok = tiny_tokenizer
    base = save(tiny_model(tok.vocab_size, max_seq_len=256), tmp_path / "base.pt", tok, step=7, phase="clinical")
    torch.manual_seed(1)
    sft = save(tiny_model(tok.vocab_size, max_seq_len=256), tmp_path / "sft.pt", tok, step=7, phase="sft")
    out = tmp_path / "answers.md"
    ev.main(
        [
            "generate",
            "--ckpt",
            base,
            "--ckpt",
            sft,
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--questions",
            str(SAMPLE / "chat_questions.txt"),
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
        ]
    )
    md = out.read_text(encoding="utf-8")
    questions = (SAMPLE / "chat_questions.txt").read_text(encoding="utf-8").split()
    assert all(f"## {i + 1}. {q}" in md for i, q in enumerate(questions))
    assert md.count(f"**`{base}`** (step 7)") == md.count(f"**`{sft}`** (step 7)") == len(questions)
    assert "| clinical | 7 | continue | 6 |" in md and "| sft | 7 | chat | 6 |" in md
    assert "temperature 0.7, top_k off, top_p 0.9, repetition_penalty 1.1, seed 1337" in md


# ---------------------------------------------------------------- the real scorer, skipped items, bad input


def test_model_scorer_matches_a_hand_computed_log_likelihood(tiny_tokenizer):
    """Through eval.model_scorer with a real model: every option token, the first one included, is scored
    once, given the context and the option tokens before it (a direct forward pass, log_softmax by hand)."""
    model = tiny_model(tiny_tokenizer.vocab_size, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    requests = []
    for context_len, option_len in [(5, 1), (9, 4), (1, 3), (20, 7), (12, 2)]:  # mixed lengths: sorted, padded
        ids = torch.randint(3, tiny_tokenizer.vocab_size, (context_len + option_len,), generator=g).tolist()
        requests.append((ids[:context_len], ids[context_len:]))
    by_hand = []
    with torch.no_grad():
        for context, option in requests:
            logits = model(torch.tensor([context + option]))[0]  # (T, vocab): no targets, no loss code
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            by_hand.append(sum(log_probs[len(context) - 1 + j, token].item() for j, token in enumerate(option)))
    scores = ev.model_scorer(model, tiny_tokenizer, batch_size=2)(requests)
    assert scores == pytest.approx(by_hand, rel=1e-4)


def test_chat_prompt_encodes_each_shot_with_its_own_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    shots = [{"question": f"第{i}题", "options": {"A": f"甲{i}", "B": f"乙{i}"}, "answer": "B"} for i in range(3)]
    q = {"question": "本题", "options": {"A": "对", "B": "错"}, "answer": "A"}
    requests = ev.encode_question(q, shots, ["对", "错"], tok, "chat")

    def enc(text):
        return tok.encode_batch([text])[0]

    context = []
    for s in shots:  # question block <bos> gold option <eos>, shot after shot, then the question and <bos>
        context += enc(f"{s['question']}\nA. {s['options']['A']}\nB. {s['options']['B']}") + [tok.bos_id]
        context += enc(s["options"]["B"]) + [tok.eos_id]
    context += enc("本题\nA. 对\nB. 错") + [tok.bos_id]
    assert requests == [(context, enc("对")), (context, enc("错"))]


def cmb_file(tmp_path, records):
    folder = tmp_path / "cmb"
    folder.mkdir(exist_ok=True)
    (folder / "CMB-val-merge.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return folder


def test_every_skipped_question_is_counted_by_reason(tiny_tokenizer, tmp_path):
    many = {letter: f"选项{letter}" for letter in "ABCDEFGHIJKL"}  # 12 options: 4095 answer sets if enumerated
    folder = cmb_file(
        tmp_path,
        CMB[:2]
        + [
            {"question": "答案不在选项里", "option": {"A": "甲", "B": "乙"}, "answer": "E"},
            {"question": "没有答案", "option": {"A": "甲", "B": "乙"}, "answer": ""},
            {"question": "十二个选项的多选题", "option": many, "answer": "ACE"},
            {"question": "十二个选项的单选题", "option": many, "answer": "L"},
            {"question": "选项不是字母", "option": {"A": "甲", "BB": "乙"}, "answer": "A"},
        ],
    )
    seen = []
    r = ev.evaluate_mcq(
        parse_source(f"cmb={folder}"), tiny_tokenizer, table_scorer(tiny_tokenizer, {}, True, seen), "continue"
    )
    assert r["overall"]["n"] == 3 and len(seen) == 4 + 7 + 12  # the 12-option single-answer item is scored
    assert r["skipped"] == {
        "answer is not one of the options": 1,
        ev.NO_ANSWER: 1,
        ev.TOO_MANY_OPTIONS: 1,
        "option key is not one capital letter": 1,
    }
    path = folder / "CMB-val-merge.json"
    assert f"{path}:#4: {ev.TOO_MANY_OPTIONS} (12 options)" in r["skipped_examples"]


def test_a_benchmark_with_nothing_scorable_is_an_error_with_its_reasons(
    tiny_tokenizer, tiny_tokenizer_dir, tmp_path, capsys
):
    tok = tiny_tokenizer
    ckpt = save(tiny_model(tok.vocab_size, max_seq_len=256), tmp_path / "sft.pt", tok, step=7, phase="sft")
    bad = cmb_file(
        tmp_path, [{"question": f"题{i}", "option": {"A": "甲", "B": "乙"}, "answer": "D"} for i in range(3)]
    )
    out = tmp_path / "mcq.json"
    with pytest.raises(SystemExit) as exit_info:
        ev.main(
            [
                "mcq",
                "--ckpt",
                ckpt,
                "--tokenizer",
                str(tiny_tokenizer_dir),
                "--device",
                "cpu",
                "--out",
                str(out),
                "--source",
                f"cmb={bad}",
                "--source",
                f"ceval={SAMPLE / 'eval' / 'ceval'}",
            ]
        )
    message = str(exit_info.value)
    assert message.startswith(f"eval.py mcq: no question of source 'cmb' ({bad}) could be scored")
    assert "'answer is not one of the options': 3" in message and "cmb reads json files" in message
    printed = capsys.readouterr().out
    assert "cmb (chat prompt, 0-shot): 0 questions scored, 3 skipped" in printed
    assert "skipped      3  answer is not one of the options" in printed
    results = json.loads(out.read_text(encoding="utf-8"))  # what was scored is kept, with the reasons
    assert results["sources"]["cmb"]["skipped"] == {"answer is not one of the options": 3}
    assert results["sources"]["ceval"]["overall"]["n"] == 20


def test_ppl_with_nothing_to_score_is_an_error(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    tok = tiny_tokenizer
    ckpt = save(tiny_model(tok.vocab_size, max_seq_len=64), tmp_path / "ckpt.pt", tok, step=7, phase="clinical")
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"txt": "wrong field"}\n[1]\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["ppl", "--ckpt", ckpt, "--tokenizer", str(tiny_tokenizer_dir), "--source", f"skypile={junk}"])
    message = str(exit_info.value)
    assert message.startswith(f"eval.py ppl: no document read from source 'skypile' ({junk}); expected skypile reads")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    np.array([5, 6, tok.eos_id], dtype=np.uint16).tofile(tokens / "t_0000.bin")
    (tokens / "manifest.json").write_text('{"tokenizer": {"sha', encoding="utf-8")
    with pytest.raises(SystemExit, match=f"{tokens / 'manifest.json'} is not a readable data_process.py manifest"):
        ev.main(["ppl", "--ckpt", ckpt, "--tokenizer", str(tiny_tokenizer_dir), "--source", f"shards={tokens}"])
    (tokens / "manifest.json").unlink()
    np.array([5, tok.vocab_size + 3, tok.eos_id], dtype=np.uint16).tofile(tokens / "t_0000.bin")
    with pytest.raises(SystemExit, match="beyond the tokenizer's"):
        ev.main(["ppl", "--ckpt", ckpt, "--tokenizer", str(tiny_tokenizer_dir), "--source", f"shards={tokens}"])


@pytest.mark.parametrize(
    "args,message", [(["--batch-size", "0"], "--batch-size must be >= 1"), (["--shots", "-1"], "--shots must be >= 0")]
)
def test_mcq_numeric_arguments_are_checked_first(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:  # no checkpoint exists: the check comes before loading
        ev.main(["mcq", "--ckpt", str(tmp_path / "none.pt"), "--source", f"ceval={SAMPLE / 'eval' / 'ceval'}", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_out_problems_are_one_line_and_leave_no_temporary_file(
    tiny_tokenizer, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    tok = tiny_tokenizer
    ckpt = save(tiny_model(tok.vocab_size, max_seq_len=64), tmp_path / "ckpt.pt", tok, step=7, phase="clinical")
    args = [
        "ppl",
        "--ckpt",
        ckpt,
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--source",
        f"heldout={SAMPLE / 'heldout'}",
        "--max-docs",
        "1",
    ]
    with pytest.raises(SystemExit, match="is a folder: give a file"):
        ev.main(args + ["--out", str(tmp_path)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        ev.main(args + ["--out", str(tmp_path / "file" / "ppl.json")])

    def full(self, *args, **kwargs):  # the disk fills up half-way through the file
        with open(self, "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ev.Path, "write_text", full)
    with pytest.raises(SystemExit) as exit_info:
        ev.main(args + ["--out", str(tmp_path / "res" / "ppl.json")])
    assert str(exit_info.value) == f"eval.py ppl: cannot write {tmp_path / 'res' / 'ppl.json'}: No space left on device"
    assert list((tmp_path / "res").iterdir()) == []


def test_fewer_shots_than_asked_names_the_small_pool_not_max_seq_len(tiny_tokenizer, tmp_path, capsys):
    """The dev split holds 2 questions: --shots 5 gives 2 shots, all of which fit, and the line says so."""
    tok = tiny_tokenizer
    root, preferred = ceval_dir(tmp_path)
    r = ev.evaluate_mcq(parse_source(f"ceval={root}"), tok, table_scorer(tok, preferred, True), "continue", shots=5)
    assert r["shots_available"] == 2 and r["shots_used"] == 2
    ev.print_mcq("ceval", r, "mean", "continue", 5)
    printed = capsys.readouterr().out
    assert "5-shot, 2.0 in the shot pool on average)" in printed and "fit max_seq_len" not in printed


def test_generate_checks_every_checkpoint_before_answering(tiny_tokenizer, tiny_tokenizer_dir, tmp_path, monkeypatch):
    good = save(tiny_model(tiny_tokenizer.vocab_size, max_seq_len=256), tmp_path / "good.pt", tiny_tokenizer)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(open(good, "rb").read()[:5000])
    answered = []
    monkeypatch.setattr(ev, "answer", lambda *args, **kw: answered.append(1) or [""] * len(args[2]))
    out = tmp_path / "answers.md"
    argv = ["generate", "--ckpt", good, "--ckpt", str(damaged), "--tokenizer", str(tiny_tokenizer_dir)]
    with pytest.raises(SystemExit, match=f"{damaged} is not a readable checkpoint"):
        ev.main(argv + ["--questions", str(SAMPLE / "chat_questions.txt"), "--out", str(out), "--device", "cpu"])
    assert answered == [] and not out.exists()
