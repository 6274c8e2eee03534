"""chatglm_tokenizer and train_tokenizer.py: id layout, exact round trips, the HF API, errors."""

import re

import pytest
from transformers import AutoTokenizer

import train_tokenizer
from chatglm_tokenizer import SPECIAL_TOKENS, load_tokenizer

ROUND_TRIP = [
    "高血压是一种以体循环动脉血压增高为主要特征的临床综合征。",
    "Hypertension is a common chronic disease; check blood pressure regularly.",
    "2023年12月31日，体温37.5℃，心率 88 次/分，用药 0.25g×3。",
    "emoji 😀👍🏽🩺 mixed 中文 and English",
    "  leading spaces,\ttabs,   runs of spaces  \n\n\nand newlines\n",
    "\n",
    "",
    "<s>literal specials</s> [gMASK] sop eop stay text",
]


def test_chatglm2_id_layout(chatglm_tokenizer):
    tok = chatglm_tokenizer
    assert tok.n_pieces == 64789
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(64789, 64794))
    assert tok.convert_ids_to_tokens(list(range(64789, 64794))) == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.vocab_size == len(tok) == 64794
    assert tok.vocab_size - 1 <= 65535  # every id fits uint16
    assert len(tok.get_vocab()) == 64794


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_chatglm2_round_trip(chatglm_tokenizer, text):
    ids = chatglm_tokenizer.encode(text)
    assert chatglm_tokenizer.decode(ids) == text
    assert chatglm_tokenizer.encode_batch([text])[0] == ids  # fast path == HF path
    assert all(0 <= i < 64789 for i in ids)  # text never turns into special ids


def test_chatglm2_known_encoding_is_stable(chatglm_tokenizer):
    # Pinned ids: a changed tokenizer.model or class would silently invalidate every .bin file.
    assert chatglm_tokenizer.encode("高血压患者应定期监测血压。") == [
        30910,
        35951,
        32016,
        54720,
        33666,
        33536,
        33778,
        31155,
    ]
    assert chatglm_tokenizer.tokenize("高血压") == ["▁", "高血压"]


def test_chatglm2_specials_decode_and_skip(chatglm_tokenizer):
    tok = chatglm_tokenizer
    prompt, answer = tok.encode("头痛怎么办？"), tok.encode("多休息。")
    ids = prompt + [tok.bos_id] + answer + [tok.eos_id, 64790]
    assert tok.decode(ids) == "头痛怎么办？<s>多休息。</s>[gMASK]"
    assert tok.decode(ids, skip_special_tokens=True) == "头痛怎么办？多休息。"
    assert tok.encode("头痛") == tok("头痛")["input_ids"]  # no specials added around text


def test_autotokenizer_loads_folder(chatglm_tokenizer, tmp_path):
    chatglm_tokenizer.save_pretrained(tmp_path)
    assert {"tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    auto = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(auto).__name__ == "ChatGLMTokenizer"
    for text in ROUND_TRIP:
        assert auto.encode(text) == chatglm_tokenizer.encode(text)
        assert auto.decode(auto.encode(text)) == text
    assert auto.vocab_size == 64794


def test_autotokenizer_loads_the_package_folder(chatglm_tokenizer, tmp_path):
    """`AutoTokenizer.from_pretrained("chatglm_tokenizer", trust_remote_code=True)` as README shows,
    with tokenizer.model in the package folder (here: a copy of the folder)."""
    import shutil

    from chatglm_tokenizer import DEFAULT_DIR

    folder = tmp_path / "chatglm_tokenizer"
    shutil.copytree(DEFAULT_DIR, folder, ignore=shutil.ignore_patterns("__pycache__", "tokenizer.model"))
    shutil.copyfile(chatglm_tokenizer.vocab_file, folder / "tokenizer.model")
    auto = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert auto.encode("高血压患者应定期监测血压。") == chatglm_tokenizer.encode("高血压患者应定期监测血压。")


def test_trained_tokenizer_round_trips(tiny_tokenizer, tiny_tokenizer_dir):
    tok = tiny_tokenizer
    assert 256 < tok.n_pieces <= 2000  # a soft limit: a small corpus may yield fewer merges
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(tok.n_pieces, tok.n_pieces + 5))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in ROUND_TRIP + ["罕见字：龘靐齉，byte fallback 𠀀"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i < 65536 for i in ids)
    assert tok.encode("12345") == tok.encode_batch(["12345"])[0]
    assert len([t for t in tok.tokenize("2024") if any(c.isdigit() for c in t)]) == 4  # digits split
    auto = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), trust_remote_code=True)
    assert auto.encode("血压 2024") == tok.encode("血压 2024")


def test_train_refuses_vocab_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        train_tokenizer.train(["一些文本"], tmp_path, vocab_size=65532)


def test_train_explains_a_vocab_too_small_for_the_characters(tmp_path):
    """The message names the smallest vocab_size that trains (checked by training at it and one below) and
    this script's --vocab-size, not SentencePiece's own --character_coverage flag."""
    texts = ["".join(chr(0x4E00 + i) for i in range(600))] * 3
    with pytest.raises(ValueError) as refused:
        train_tokenizer.train(texts, tmp_path / "small", vocab_size=300)
    message = str(refused.value)
    needed = int(re.search(r"use --vocab-size >= (\d+)$", message)[1])
    assert "--character_coverage" not in message and 600 + 256 + 3 <= needed <= 600 + 256 + 3 + 5
    with pytest.raises(ValueError, match=f"use --vocab-size >= {needed}$"):
        train_tokenizer.train(texts, tmp_path / "below", vocab_size=needed - 1)
    assert train_tokenizer.train(texts, tmp_path / "enough", vocab_size=needed).n_pieces >= needed


def test_missing_model_names_path_and_remedies(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "tokenizer.model") in message
    assert "THUDM/chatglm2-6b" in message and "train_tokenizer.py" in message


def test_a_source_that_yields_nothing_stops_training(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(ROUND_TRIP[:3] * 20), encoding="utf-8")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "tok"
    with pytest.raises(SystemExit) as stop:
        train_tokenizer.main(
            ["--source", f"wiki={tmp_path / 'empty'}", "--source", f"text={corpus}", "--out", str(out)]
        )
    message = str(stop.value.code)
    assert "source 'wiki' yielded no document" in message and "wiki reads json files" in message
    assert not out.exists()
