"""inference.py and chat.py: generation through the chat API (cache, batching, penalty, eos), the template, loading."""

import re

import pytest
import torch

import chat
import inference
from checkpoint import atomic_save, model_checkpoint
from dataset_sft import render
from model import ModelArgs, Transformer

from conftest import save, tiny_model, wander


def echo_model(tok):
    """Blocks that add nothing (zero output projections): the logits are norm(e_t) . e_j, largest for
    j = t (random embeddings are nearly orthogonal), so greedy decoding repeats the last token."""
    model = wander(tiny_model(tok.vocab_size))
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
    return model


PROMPTS = ["高血压患者饮食上要注意什么？", "感冒", "糖尿病需要控制饮食、规律运动吗？请详细说明。"]


def test_kv_cache_greedy_equals_no_cache(tiny_tokenizer):
    model = wander(tiny_model(tiny_tokenizer.vocab_size))
    for mode in inference.MODES:
        cached = inference.answer_ids(model, tiny_tokenizer, PROMPTS[:1], mode=mode, max_new_tokens=24, temperature=0)
        plain = inference.answer_ids(
            model, tiny_tokenizer, PROMPTS[:1], mode=mode, max_new_tokens=24, temperature=0, use_cache=False
        )
        assert cached == plain and len(set(cached[0])) > 8  # long enough and varied to mean something


def test_batch_of_different_lengths_equals_one_by_one(tiny_tokenizer):
    model = wander(tiny_model(tiny_tokenizer.vocab_size))
    lengths = [len(inference.build_prompt(tiny_tokenizer, p)[0]) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)  # the batch really is left-padded
    for mode in inference.MODES:
        together = inference.answer_ids(model, tiny_tokenizer, PROMPTS, mode=mode, max_new_tokens=16, temperature=0)
        alone = [
            inference.answer_ids(model, tiny_tokenizer, [p], mode=mode, max_new_tokens=16, temperature=0)[0]
            for p in PROMPTS
        ]
        assert together == alone and len({tuple(ids) for ids in together}) == len(PROMPTS)


def test_sampling_is_reproducible_with_a_seed(tiny_tokenizer):
    model = wander(tiny_model(tiny_tokenizer.vocab_size))
    runs = [
        inference.answer_ids(model, tiny_tokenizer, PROMPTS[:1], max_new_tokens=16, temperature=1.0, top_k=50, seed=s)
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_repetition_penalty(tiny_tokenizer):
    model = echo_model(tiny_tokenizer)
    prompt_ids = inference.build_prompt(tiny_tokenizer, "感冒", mode="continue")[0]
    plain = inference.answer_ids(model, tiny_tokenizer, ["感冒"], mode="continue", max_new_tokens=8, temperature=0)[0]
    assert plain == [prompt_ids[-1]] * 8
    penalised = inference.answer_ids(
        model, tiny_tokenizer, ["感冒"], mode="continue", max_new_tokens=8, temperature=0, repetition_penalty=100.0
    )[0]
    assert len(set(penalised)) == 8 and not set(penalised) & set(prompt_ids)  # every token new


def test_stops_at_eos_per_sequence(tiny_tokenizer):
    tok = tiny_tokenizer
    model = echo_model(tok)
    a = inference.build_prompt(tok, "感冒", mode="continue")[0][-1]
    b = inference.build_prompt(tok, "头痛", mode="continue")[0][-1]
    assert a != b
    with torch.no_grad():  # after token a the model says eos; after b it repeats b
        emb = model.tok_embeddings.weight
        emb[b] = -emb[a]
        emb[tok.eos_id] = 10 * emb[a]
    out = inference.answer_ids(model, tok, ["感冒", "头痛"], mode="continue", max_new_tokens=6, temperature=0)
    assert out == [[], [b] * 6]
    assert (
        list(
            inference.stream_answer(
                model, tok, inference.build_prompt(tok, "感冒", mode="continue")[0], 6, temperature=0
            )
        )
        == []
    )


def test_chat_template_and_history_placement(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    model = wander(tiny_model(tok.vocab_size))
    fed = []
    stream = model.stream

    def recording(prompts, *args, **kwargs):
        fed.extend(prompts)
        return stream(prompts, *args, **kwargs)

    monkeypatch.setattr(model, "stream", recording)
    history = [("头痛怎么办？", "多休息。")]
    inference.answer(model, tok, ["还要注意什么？"], history=history, mode="chat", max_new_tokens=4, temperature=0)
    enc = tok.encode_batch
    expected = render(
        [(enc(["头痛怎么办？"])[0], enc(["多休息。"])[0]), (enc(["还要注意什么？"])[0], None)], tok.bos_id, tok.eos_id
    )[0]
    assert fed == [expected] and expected[-1] == tok.bos_id
    assert expected.count(tok.eos_id) == 1  # the earlier answer is closed, the new one left open
    fed.clear()
    inference.answer(model, tok, ["还要注意什么？"], history=history, mode="continue", max_new_tokens=4, temperature=0)
    assert fed == [enc(["头痛怎么办？多休息。"])[0] + enc(["还要注意什么？"])[0]]
    assert tok.bos_id not in fed[0]


def test_long_history_drops_oldest_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    history = [(f"问题{i}：高血压患者饮食上要注意什么？", f"回答{i}：少盐，多吃蔬菜。") for i in range(10)]
    full, dropped = inference.build_prompt(tok, "还有呢？", history, "chat", budget=None)
    assert dropped == 0
    ids, dropped = inference.build_prompt(tok, "还有呢？", history, "chat", budget=len(full) // 3)
    assert 0 < dropped < 10 and len(ids) <= len(full) // 3
    kept = history[dropped:]
    assert ids == inference.build_prompt(tok, "还有呢？", kept, "chat")[0]  # whole turns, newest kept
    ids, dropped = inference.build_prompt(tok, "还有呢？", history, "continue", budget=40)
    assert len(ids) <= 40 and dropped > 0


def test_streaming_prints_whole_characters(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "头痛龘，多喝水𝔘。"  # two characters the tiny tokenizer never saw: 3 and 4 byte pieces
    ids = tok.encode_batch([text])[0]
    assert sum(tok.sp.is_byte(i) for i in ids) == 7
    pieces = list(inference.incremental_text(tok, iter(ids)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_equals_answer(tiny_tokenizer):
    model = wander(tiny_model(tiny_tokenizer.vocab_size))
    ids = inference.build_prompt(tiny_tokenizer, PROMPTS[0])[0]
    streamed = "".join(inference.stream_answer(model, tiny_tokenizer, ids, 20, temperature=0))
    assert streamed == inference.answer(model, tiny_tokenizer, PROMPTS[:1], max_new_tokens=20, temperature=0)[0]


def test_mode_from_checkpoint_and_cli(tiny_tokenizer, tiny_tokenizer_dir, tmp_path, capsys):
    model = wander(tiny_model(tiny_tokenizer.vocab_size))
    sft = save(model, tmp_path / "sft.pt", tiny_tokenizer, phase="sft")
    base = save(model, tmp_path / "base.pt", tiny_tokenizer, phase="clinical")
    assert inference.load(sft, tiny_tokenizer)[3] == "chat"
    assert inference.load(base, tiny_tokenizer)[3] == "continue"
    questions = tmp_path / "q.txt"
    questions.write_text("感冒\n\n头痛\n", encoding="utf-8")
    chat.main(
        [
            "--ckpt",
            str(sft),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--prompt",
            "发烧",
            "--prompt-file",
            str(questions),
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert out.count("用户> ") == 3 and out.count("助手> ") == 3 and "头痛" in out


def test_a_prompt_longer_than_the_context_says_its_start_was_cut(tiny_tokenizer, tiny_tokenizer_dir, tmp_path, capsys):
    model = wander(tiny_model(tiny_tokenizer.vocab_size))
    sft = save(model, tmp_path / "sft.pt", tiny_tokenizer, phase="sft")
    long = "高血压患者饮食上要注意什么？" * 40
    length, budget = len(inference.build_prompt(tiny_tokenizer, long)[0]), model.args.max_seq_len - 8
    assert length > budget
    cli = ["--ckpt", str(sft), "--tokenizer", str(tiny_tokenizer_dir), "--max-new-tokens", "8", "--device", "cpu"]
    chat.main(cli + ["--prompt", "感冒", "--prompt", long])
    out = capsys.readouterr().out
    assert out.count("tokens were cut)") == 1 and out.count("助手> ") == 2
    assert f"(the prompt is {length} tokens" in out and f"its first {length - budget} tokens were cut)" in out


def test_missing_and_mismatched_checkpoints(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    def run(path):
        with pytest.raises(SystemExit) as err:
            chat.main(["--ckpt", str(path), "--tokenizer", str(tiny_tokenizer_dir), "--prompt", "x"])
        return str(err.value)

    assert "no checkpoint" in run(tmp_path / "nothing.pt")
    wrong = model_checkpoint(
        tiny_model(tiny_tokenizer.vocab_size, dim=32),
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tiny_tokenizer.vocab_size, max_seq_len=96),
        phase="sft",
    )
    atomic_save(wrong, tmp_path / "wrong.pt")
    assert "do not match" in run(tmp_path / "wrong.pt")
    model = wander(tiny_model(tiny_tokenizer.vocab_size))
    atomic_save(model_checkpoint(model, model.args, tokenizer_fingerprint="0" * 64, phase="sft"), tmp_path / "other.pt")
    assert "different tokenizer" in run(tmp_path / "other.pt")


def test_interactive_session_keeps_history_and_resets(
    tiny_tokenizer, tiny_tokenizer_dir, tmp_path, monkeypatch, capsys
):
    tok = tiny_tokenizer
    model = wander(tiny_model(tok.vocab_size))
    path = save(model, tmp_path / "sft.pt", tok, phase="sft")
    first = inference.answer(model, tok, ["头痛怎么办？"], max_new_tokens=6, temperature=0)[0]
    assert first
    lines = iter(["头痛怎么办？", "还有呢？", "/reset", "感冒", "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    fed, stream = [], Transformer.stream

    def recording(self, prompts, *args, **kwargs):
        fed.append(prompts[0])
        return stream(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Transformer, "stream", recording)
    chat.main(
        [
            "--ckpt",
            str(path),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert fed == [
        inference.build_prompt(tok, "头痛怎么办？")[0],
        inference.build_prompt(tok, "还有呢？", [("头痛怎么办？", first)])[0],  # the first turn before it
        inference.build_prompt(tok, "感冒")[0],
    ]  # after /reset: no history
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out and out.count("助手> ") == 3 and first in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-new-tokens", "-5"], r"argument --max-new-tokens: -5 is outside \[1, \]"),
        (["--temperature", "-1"], r"argument --temperature: -1 is outside \[0, \]"),
        (["--top-p", "0"], r"argument --top-p: 0 is outside \(0, 1\]"),
        (["--batch-size", "0"], r"argument --batch-size: 0 is outside \[1, \]"),
        (["--prompt-file", "MISSING"], "cannot read --prompt-file .*MISSING: No such file or directory"),
        (["--prompt-file", "BINARY"], "--prompt-file .*BINARY is not UTF-8 text"),
        (["--prompt-file", "EMPTY"], "--prompt-file .*EMPTY holds no prompt"),
    ],
)
def test_bad_arguments_are_one_line_before_loading_anything(tiny_tokenizer_dir, tmp_path, capsys, args, message):
    (tmp_path / "BINARY").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "EMPTY").write_text("\n  \n", encoding="utf-8")
    args = [str(tmp_path / a) if a in ("MISSING", "BINARY", "EMPTY") else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        chat.main(["--ckpt", str(tmp_path / "never_loaded.pt"), "--tokenizer", str(tiny_tokenizer_dir), *args])
    said = str(exit_.value) + capsys.readouterr().err
    assert exit_.value.code != 0 and re.search(message, said), said
    assert "no checkpoint" not in said  # refused before the checkpoint was looked at


def test_a_malformed_history_turn_is_refused_never_shifted(tiny_tokenizer):
    good = [("头痛", "多休息"), ("发烧", "多喝水")]
    ids, _ = inference.build_prompt(tiny_tokenizer, "还有呢？", good)
    expected = render(
        [(tiny_tokenizer.encode_batch([q])[0], tiny_tokenizer.encode_batch([a])[0]) for q, a in good]
        + [(tiny_tokenizer.encode_batch(["还有呢？"])[0], None)],
        tiny_tokenizer.bos_id,
        tiny_tokenizer.eos_id,
    )[0]
    assert ids == expected
    for bad in ([("头痛", "多休息", "多余")] + good, [("头痛",)] + good, [("头痛", None)]):
        with pytest.raises(ValueError, match=r"\(prompt, answer\) pair of strings"):
            inference.build_prompt(tiny_tokenizer, "还有呢？", bad)
