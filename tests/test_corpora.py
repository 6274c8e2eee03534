"""corpora.py: containers, encodings, every reader, sources, splitting; bad input counted with its location."""

import gzip
import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

import corpora
from corpora import (
    Problems,
    Source,
    iter_dialogues,
    iter_preferences,
    iter_questions,
    iter_texts,
    parse_source,
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def texts(fmt, *files):
    problems = Problems()
    return list(iter_texts(Source("t", fmt, [Path(f) for f in files]), problems)), problems


def dialogues(fmt, *files):
    problems = Problems()
    return list(iter_dialogues(Source("t", fmt, [Path(f) for f in files]), problems)), problems


def questions(fmt, *files):
    problems = Problems()
    return list(iter_questions(Source("t", fmt, [Path(f) for f in files]), problems)), problems


# ---------------------------------------------------------------- containers and encodings


def test_jsonl_bad_lines_are_counted_with_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"text": "第一篇"}\n\n{"text": \n{"txt": "wrong field"}\n[1, 2]\n{"text": null}\n{"text": "第二篇"}\n',
        encoding="utf-8",
    )
    docs, problems = texts("skypile", path)
    assert docs == ["第一篇", "第二篇"]
    assert problems.counts == {
        "malformed JSON line": 1,
        "missing field 'text'": 1,
        "record is not an object": 1,
        "empty text": 1,
    }
    assert f"{path}:3: malformed JSON line" in " ".join(problems.examples)
    assert any(e.startswith(f"{path}:4: missing field 'text'") for e in problems.examples)
    assert any(e.startswith(f"{path}:6: empty text") for e in problems.examples)
    assert "skipped 4" in problems.summary()


def test_a_lone_surrogate_escape_skips_its_record_and_a_paired_one_is_text(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        '{"text": "表情 \\ud83d\\ude00 完整"}',  # a pair: one astral character
        '{"text": "表情被截断 \\ud83d"}',  # web text cut inside an emoji
        json.dumps({"text": "全部转义的一行"}),  # ensure_ascii: every character an escape, none a surrogate
        '{"text": "ok", "meta": ["\\udc00"]}',  # in any string of the record
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, problems = texts("skypile", path)
    assert docs == ["表情 😀 完整", "全部转义的一行"]
    assert problems.counts == {corpora.LONE_SURROGATE: 2} and problems.records == 4
    assert problems.examples[0].startswith(f"{path}:2: lone surrogate")


@pytest.mark.parametrize("piece", [64 << 10, 5, 7, 13])
@pytest.mark.parametrize("one_line", [False, True])
def test_json_array_items_with_a_lone_surrogate_escape_are_skipped_wherever_the_reads_cut(
    tmp_path, monkeypatch, piece, one_line
):
    """As in JSON lines; the reads that feed ijson are cut at every offset (pieces of 5, 7, 13 characters), so an
    escape, a pair, or the backslashes before an escape lie across two reads."""
    monkeypatch.setattr(corpora, "SNIFF_BYTES", piece)
    monkeypatch.setattr(corpora, "LINE_PIECE", piece)  # one_line: the whole array is one long line
    strings = [
        "表情 \\ud83d\\ude00 完整",  # a pair
        "表情被截断 \\ud83d",  # a lone high half
        "\\ud83d\\ud83d\\ude00",  # a lone high, then a pair
        "\\ude00 低半个在前",  # a lone low half
        "\\\\ud83d 反斜杠本身",  # an escaped backslash and the text ud83d
        "\\\\\\ud83d 奇数个反斜杠",  # an escaped backslash, then a lone high half
        "\\\\ud83d\\udc00",  # the text ud83d, then a lone low half
        "\\u4e2d\\u6587 \\uD83D\\uDE00",  # ensure_ascii escapes; a pair in capitals
        "?",
        "😀 \\uffff",  # an astral character as UTF-8; the noncharacter as an escape
    ]
    separator = ", " if one_line else ",\n "
    (tmp_path / "a.json").write_text(
        "[" + separator.join('{"completion": "%s", "n": %d}' % (t, i) for i, t in enumerate(strings)) + "]",
        encoding="utf-8",
    )
    expected = [json.loads('"%s"' % t) for t in strings]
    problems = corpora.Problems()
    got = [item["completion"] for _, item in corpora.iter_json_array(tmp_path / "a.json", problems)]
    kept = [t for t in expected if not corpora.holds_surrogate(t)]  # what json.loads makes of them, without
    assert kept[:4] == ["表情 😀 完整", "\\ud83d 反斜杠本身", "中文 😀", "?"]  # the five with a lone surrogate
    assert got == kept[:4]  # and "😀 \\uffff" holds U+FFFF: skipped with them, in a file that holds any
    assert problems.counts == {corpora.LONE_SURROGATE: 6}


def test_json_array_items_are_what_json_loads_makes_and_a_too_deep_one_is_skipped(tmp_path):
    items = [
        {"completion": "正文", "n": 1, "x": 1.5, "ok": True, "none": None, "tags": ["a", {"b": []}], "m": {}},
        "一个字符串",
        7,
        [],
        [[1, [2, {"k": [3]}]]],
        {"completion": "后文"},
    ]
    deep = "[" * 100_000 + "]" * 100_000  # ijson.items would take gigabytes on this
    text = (
        json.dumps(items[:5], ensure_ascii=False)[:-1] + ", " + deep + ", " + json.dumps(items[5], ensure_ascii=False)
    )
    (tmp_path / "a.json").write_text(text + "]", encoding="utf-8")
    problems = corpora.Problems()
    got = list(corpora.iter_json_array(tmp_path / "a.json", problems))
    assert got == [(f"#{i}", item) for i, item in enumerate(items[:5])] + [("#6", items[5])]
    assert problems.counts == {"JSON nested deeper than 512 levels, record skipped": 1}
    assert problems.examples[0].startswith(f"{tmp_path / 'a.json'}:#5:")


def test_json_array_with_a_64_bit_overflow_real_replacement_characters_and_a_bad_line(tmp_path):
    items = [{"completion": f"第{i}条 \ufffd 原文就有的替换符", "id": i} for i in range(6)]
    items[2]["id"] = 123456789012345678901  # valid JSON that yajl refuses
    lines = [json.dumps(item, ensure_ascii=False).encode() for item in items]
    lines[4] = lines[4].replace("原文".encode(), b"\xff\xfe\xfd\xfc")  # undecodable bytes in item 4 only
    (tmp_path / "a.json").write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    problems = corpora.Problems()
    got = [item for _, item in corpora.iter_json_array(tmp_path / "a.json", problems)]
    assert got == items[:4] + items[5:]
    assert problems.counts == {corpora.UNDECODABLE: 1} and problems.examples[0].startswith(f"{tmp_path / 'a.json'}:#4:")
    (tmp_path / "b.json").write_text('[{"completion": "中文"} {"completion": "x"}]', encoding="utf-8")
    problems = corpora.Problems()
    assert [item for _, item in corpora.iter_json_array(tmp_path / "b.json", problems)] == [{"completion": "中文"}]
    (example,) = problems.examples
    assert "\n" not in example and "b'" not in example and "parse error" in example


def test_json_nested_too_deep_or_with_a_huge_integer_is_a_malformed_line(tmp_path):
    path = tmp_path / "c.jsonl"
    deep, huge = "[" * 100_000 + "]" * 100_000, "1" * 5000
    path.write_text(
        f'{{"text": "前"}}\n{{"text": {deep}}}\n{{"text": "中", "id": {huge}}}\n{{"text": "后"}}\n', encoding="utf-8"
    )
    docs, problems = texts("skypile", path)
    assert docs == ["前", "后"] and problems.counts == {"malformed JSON line": 2}
    assert "nested too deeply" in problems.examples[0] and "4300 digits" in problems.examples[1]


def test_json_array_streams_and_a_truncated_file_keeps_what_parsed(tmp_path):
    records = [{"completion": f"第{i}条百科\n历史\n内容", "source": "wikipedia.zh2307"} for i in range(5)]
    whole = json.dumps(records, ensure_ascii=False, indent=2)
    (tmp_path / "ok.json").write_text(whole, encoding="utf-8")
    docs, problems = texts("wiki", tmp_path / "ok.json")
    assert docs == [r["completion"] for r in records] and not problems.counts

    (tmp_path / "cut.json").write_text(whole[: whole.index("第3条")], encoding="utf-8")
    docs, problems = texts("wiki", tmp_path / "cut.json")
    assert docs == [r["completion"] for r in records[:3]]
    assert list(problems.counts) == ["JSON array cut short or malformed, rest of file skipped"]
    assert problems.examples[0].startswith(f"{tmp_path / 'cut.json'}:#3:")
    assert "\n" not in problems.examples[0] and "premature EOF" in problems.examples[0]


def test_json_array_items_with_wrong_fields_report_their_index(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(
        json.dumps([{"title": "a", "content": "正文一"}, {"title": "b"}, {"content": "正文三"}], ensure_ascii=False),
        encoding="utf-8",
    )
    docs, problems = texts("wudao", path)
    assert docs == ["a\n正文一", "正文三"]
    assert problems.examples == [f"{path}:#1: missing field 'content' (fields: title)"]


def test_gzip_jsonl_and_a_truncated_gzip(tmp_path):
    payload = "".join(json.dumps({"text": f"网页正文{i}" * 50}, ensure_ascii=False) + "\n" for i in range(200))
    good = tmp_path / "c4-zh.tfrecord-00000-of-01024.json.gz"
    good.write_bytes(gzip.compress(payload.encode()))
    docs, problems = texts("c4_zh", good)
    assert len(docs) == 200 and docs[7] == "网页正文7" * 50 and not problems.counts

    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    docs, problems = texts("c4_zh", cut)
    assert 0 < len(docs) < 200
    assert list(problems.counts) == ["truncated or corrupt gzip file"]

    tiny = tmp_path / "tiny.json.gz"  # cut inside the part the encoding is sniffed from
    tiny.write_bytes(gzip.compress('[{"text": "短"}]'.encode())[:-6])
    array = tmp_path / "tiny.jsonl.gz"
    array.write_bytes(gzip.compress(b'{"text": "x"}\n')[:-6])
    docs, problems = texts("c4_zh", tiny, array)
    assert docs == [] and problems.counts == {"truncated or corrupt gzip file": 2}


GB_ROWS = [
    (
        "心血管科",
        "高血压患者能吃党参吗？",
        "我有高血压，这两天喝了党参泡的水，可以吗？\n另外，血压140/90。",
        "高血压患者可以少量食用党参，但要监测血压，如有不适及时就医。",
    ),
    (
        "消化科",
        "饭后胃胀怎么办",
        "饭后胃胀怎么办，偶尔反酸，该注意什么",
        "建议少食多餐，避免辛辣油腻，症状持续请就诊。",
    ),
]


def write_gb18030_csv(path, rows=GB_ROWS, extra=b""):
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["department", "title", "ask", "answer"])
    writer.writerows(rows)
    path.write_bytes(text.getvalue().encode("gb18030") + extra)
    return path


def test_gb18030_csv_with_quoted_newlines_decodes_cleanly(tmp_path):
    path = write_gb18030_csv(tmp_path / "内科5000-33000.csv")
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    assert corpora.file_encoding(path) == "gb18030"
    records = list(corpora.iter_csv(path, Problems()))
    assert [where for where, _ in records] == [2, 4]  # the first row's ask spans lines 2-3
    turns, problems = dialogues("medical_dialogue", path)
    assert not problems.counts
    assert turns[0] == [("高血压患者能吃党参吗？\n" + GB_ROWS[0][2], GB_ROWS[0][3])]
    assert turns[1] == [(GB_ROWS[1][2], GB_ROWS[1][3])]  # the title adds nothing to this ask
    docs, _ = texts("medical_dialogue", path)
    assert "党参" in docs[0] and "\ufffd" not in "".join(docs)


def test_a_row_with_undecodable_bytes_is_skipped_and_counted_never_kept_garbled(tmp_path):
    bad_row = "内科,胸闷,胸闷气短怎么办,".encode("gb18030") + b"\xff" + "建议做心电图。\n".encode("gb18030")
    good_row = "外科,骨折,骨折后多久能走路,遵医嘱复查。\n".encode("gb18030")
    path = write_gb18030_csv(tmp_path / "bad.csv", extra=bad_row + good_row)
    turns, problems = dialogues("medical_dialogue", path)
    assert [t[0][1] for t in turns] == [GB_ROWS[0][3], GB_ROWS[1][3], "遵医嘱复查。"]
    assert problems.counts == {corpora.UNDECODABLE: 1}
    assert problems.examples == [f"{path}:5: {corpora.UNDECODABLE}"]


def test_utf8_bom_and_gb18030_are_detected():
    assert corpora.detect_encoding(b"\xef\xbb\xbfid,question") == "utf-8-sig"
    assert corpora.detect_encoding("中文".encode()) == "utf-8"
    assert corpora.detect_encoding("中文测试".encode("gb18030")) == "gb18030"
    assert corpora.detect_encoding("中文".encode()[:-1]) == "utf-8"  # a character cut by the sniff is fine
    assert corpora.detect_encoding("中文".encode("gb18030") + b"\xff" + "测试".encode("gb18030") * 5) == "gb18030"
    assert corpora.detect_encoding("中文测试".encode() * 50 + b"\xff") == "utf-8"  # one stray byte in UTF-8


def test_csv_rows_with_the_wrong_field_count_are_counted(tmp_path):
    path = tmp_path / "clinical_medicine_val.csv"
    path.write_bytes(
        "\ufeffid,question,A,B,C,D,answer,explanation\n"
        "0,成人正常心率是____,40~60次/分,60~100次/分,100~120次/分,120~140次/分,B,\n"
        "1,只有三列,a,b\n".encode("utf-8")
    )
    found, problems = questions("ceval", path)
    assert found == [
        {
            "question": "成人正常心率是____",
            "options": {"A": "40~60次/分", "B": "60~100次/分", "C": "100~120次/分", "D": "120~140次/分"},
            "answer": "B",
            "subject": "clinical_medicine",
            "explanation": "",
            "where": 2,
        }
    ]
    assert problems.examples == [f"{path}:3: CSV row with the wrong number of fields (4 fields, header has 8)"]


def test_folder_with_mixed_files_skips_and_counts_the_unreadable_kinds(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "正文甲"}])
    (tmp_path / "notes.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "hidden"}\n', encoding="utf-8")
    source = parse_source(f"skypile={tmp_path}")
    assert [p.name for p in source.files] == ["a.jsonl", "blob.bin", "notes.csv"]
    docs, problems = texts("skypile", *source.files)
    assert docs == ["正文甲"]
    assert problems.counts == {"file of a kind this format does not read": 2}


# ---------------------------------------------------------------- pretraining readers


def test_baike_joins_title_summary_and_sections_and_survives_nulls(tmp_path):
    path = write_jsonl(
        tmp_path / "563w_baidubaike.json",
        [
            {
                "title": "示例果",
                "summary": "一种虚构的水果。",
                "sections": [
                    {"title": "形态", "content": "果实圆形。"},
                    {"title": "", "content": "常见于南方。"},
                    {"title": "空", "content": None},
                ],
            },
            {"title": "只有标题", "summary": None, "sections": None},
            {"title": "", "summary": "", "sections": []},
        ],
    )
    docs, problems = texts("baike", path)
    assert docs == ["示例果：一种虚构的水果。\n形态：果实圆形。\n常见于南方。", "只有标题"]
    assert problems.counts == {"empty text": 1}


def test_guidelines_fall_back_to_raw_text(tmp_path):
    path = write_jsonl(
        tmp_path / "open_guidelines.jsonl",
        [{"clean_text": "# Hand hygiene\n\nWash hands.", "raw_text": "x"}, {"clean_text": "", "raw_text": "Raw only."}],
    )
    assert texts("guidelines", path)[0] == ["# Hand hygiene\n\nWash hands.", "Raw only."]


def test_cmekg_turns_triples_into_sentences_and_skips_predicate_json(tmp_path):
    (tmp_path / "train_example.json").write_text(
        json.dumps(
            [
                {
                    "text": "示例病的临床表现包括低热、乏力，病因多为受凉。",
                    "spo_list": [
                        ["示例病", "临床表现", "低热"],
                        ["示例病", "临床表现", "乏力"],
                        ["示例病", "病因", "受凉"],
                    ],
                },
                {"text": "坏记录", "spo_list": [["只有两项", "x"]]},
            ],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    (tmp_path / "predicate.json").write_text('{\n  "临床表现": 94657,\n  "病因": 2954\n}\n', encoding="utf-8")
    docs, problems = texts("cmekg", *parse_source(f"cmekg={tmp_path}").files)
    assert docs == [
        "示例病的临床表现包括低热、乏力，病因多为受凉。\n示例病的临床表现包括低热、乏力。示例病的病因包括受凉。"
    ]
    assert problems.counts == {"malformed spo_list triple": 1}  # predicate.json is not counted


def test_cmedqa2_joins_answers_to_questions_and_counts_orphans(tmp_path):
    (tmp_path / "question.csv").write_text(
        "question_id,content\n1,口干舌燥是什么原因？\n2,没有回答的问题\n1,同号的另一个问题\n", encoding="utf-8"
    )
    (tmp_path / "answer.csv").write_text(
        "ans_id,question_id,content\n10,1,可能饮水不足。\n11,1,注意作息。\n12,99,孤儿回答\n", encoding="utf-8"
    )
    (tmp_path / "dev_candidates.txt").write_text("question_id,ans_id,cnt,label\n1,10,0,1\n", encoding="utf-8")
    docs, problems = texts("cmedqa2", *parse_source(f"cmedqa2={tmp_path}").files)
    assert docs == ["口干舌燥是什么原因？\n可能饮水不足。\n注意作息。"]
    assert problems.counts == {
        "question without answers": 1,
        "answer to an unknown question_id": 1,
        "question_id given twice, the later question skipped": 1,
    }
    assert f"{tmp_path / 'answer.csv'}:4: answer to an unknown question_id (99)" in problems.examples
    assert any(e.startswith(f"{tmp_path / 'question.csv'}:4: question_id given twice") for e in problems.examples)


def test_a_csv_header_naming_a_column_twice_skips_the_file(tmp_path):
    path = tmp_path / "dialog.csv"
    path.write_text("department,title,ask,answer,answer\n内科,头痛,头痛怎么办？,多休息。,\n", encoding="utf-8")
    docs, problems = texts("medical_dialogue", path)
    assert docs == [] and problems.counts == {"CSV header names a column twice, file skipped": 1}
    assert problems.examples == [
        f"{path}:1: CSV header names a column twice, file skipped (answer: rename one in the header)"
    ]


def test_plain_text_is_one_document_per_blank_line_separated_block(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("第一段第一行\n第一段第二行\n\n  \n第二段\n\n\n第三段", encoding="utf-8")
    assert texts("text", path)[0] == ["第一段第一行\n第一段第二行\n", "第二段\n", "第三段"]


def test_plain_text_with_lone_cr_line_endings_is_still_one_document_per_block(tmp_path):
    path = tmp_path / "mac.txt"
    path.write_bytes("第一段\r第一段第二行\r\r第二段\r\r第三段\r".encode())
    assert texts("text", path)[0] == ["第一段\n第一段第二行\n", "第二段\n", "第三段\n"]


def test_overlong_lines_are_skipped_unread_and_counted_where_they_are(tmp_path, monkeypatch):
    """A line of more than MAX_LINE_BYTES is dropped as it is read (never held whole), and the record
    that holds it is skipped and counted at its line, in JSON lines, CSV and plain text, read whole or
    cut into units; the lines after it keep their numbers."""
    monkeypatch.setattr(corpora, "MAX_LINE_BYTES", 3000)
    long = "长" * 2000  # 6,000 bytes of UTF-8
    records = ["第一篇", long, "第三篇", long + long, "第五篇", long]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in records), encoding="utf-8")
    rows = ["department,title,ask,answer", "内科,标题一,问一,答一", f'内科,标题二,"问二\n{long}\n问二完",答二']
    rows += ["外科,标题三,问三,答三", f"外科,{long},问四,答四", "儿科,标题五,问五,答五"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    text = tmp_path / "t.txt"
    text.write_text(f"第一段\n\n第二段\n{long}\n第二段完\n\n{long}\n\n第四段\n", encoding="utf-8")
    expected = {
        "skypile": (jsonl, ["第一篇", "第三篇", "第五篇"], [2, 4, 6]),
        "medical_dialogue": (csv_path, ["问一\n答一", "问三\n答三", "问五\n答五"], [3, 7]),
        "text": (text, ["第一段\n", "第四段\n"], [3, 7]),
    }
    for fmt, (path, kept, lines) in expected.items():
        source = Source("t", fmt, [path])
        for unit_bytes in (1 << 30, 50):
            problems, got = Problems(), []
            for unit, span in corpora.split_source(source, unit_bytes):
                got += [t for t in iter_texts(unit, problems, span)]
            assert [t.split("\n", 1)[-1] if fmt == "medical_dialogue" else t for t in got] == kept, (fmt, unit_bytes)
            assert problems.counts == {corpora.OVERLONG_LINE: len(lines)}, (fmt, unit_bytes)
            assert problems.examples == [f"{path}:{line}: {corpora.OVERLONG_LINE}" for line in lines]
    big = tmp_path / "big.jsonl"  # a line 24x the limit goes through in bounded memory
    big.write_bytes(b'{"text": "' + b"x" * 24_000_000 + b'"}\n{"text": "after"}\n')
    monkeypatch.setattr(corpora, "MAX_LINE_BYTES", 1 << 20)
    tracemalloc.start()
    got, problems = texts("skypile", big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == ["after"] and problems.counts == {corpora.OVERLONG_LINE: 1} and peak < 8 << 20


def test_dialogue_formats_read_as_text_flattened(tmp_path):
    path = write_jsonl(tmp_path / "ChatMed_TCM-v0.2.json", [{"query": "示例草有什么功效？", "response": "清热生津。"}])
    assert texts("chatmed_tcm", path)[0] == ["示例草有什么功效？\n清热生津。"]


# ---------------------------------------------------------------- SFT readers


def test_instruction_formats_join_instruction_and_input(tmp_path):
    records = [
        {"instruction": "翻译成英文", "input": "欢迎光临", "output": "Welcome."},
        {"instruction": "示例片的用法用量", "input": "", "output": "口服，一次1片。"},
    ]
    for fmt in ("medical_finetune", "belle"):
        turns, _ = dialogues(fmt, write_jsonl(tmp_path / f"{fmt}.json", records))
        assert turns == [[("翻译成英文\n欢迎光临", "Welcome.")], [("示例片的用法用量", "口服，一次1片。")]]
    (tmp_path / "alpaca.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    assert dialogues("alpaca_zh", tmp_path / "alpaca.json")[0][1] == [("示例片的用法用量", "口服，一次1片。")]
    target = write_jsonl(tmp_path / "belle_target.json", [{"instruction": "问", "input": "", "target": "答"}])
    assert dialogues("belle", target)[0] == [[("问", "答")]]


def test_belle_multiturn_parses_the_history(tmp_path):
    path = write_jsonl(
        tmp_path / "multiturn_chat_0.8M.json",
        [
            {
                "instruction": "Human:推荐一本入门编程书。\nAssistant:可以试试《示例编程入门》。"
                "\nHuman:适合零基础吗？\nAssistant:",
                "input": "",
                "output": "适合。",
            }
        ],
    )
    assert dialogues("belle_multiturn", path)[0] == [
        [("推荐一本入门编程书。", "可以试试《示例编程入门》。"), ("适合零基础吗？", "适合。")]
    ]


def test_huatuo_strips_prefixes_and_counts_a_trailing_question(tmp_path):
    path = write_jsonl(
        tmp_path / "HuatuoGPT_sft_data_v1.jsonl",
        [
            {"data": ["问：头晕乏力查什么？", "答：先查血常规。", "问：要空腹吗？", "答：不需要。"]},
            {"data": ["问：单独的问题", "答：回答", "问：没有回答"]},
        ],
    )
    turns, problems = dialogues("huatuo", path)
    assert turns == [[("头晕乏力查什么？", "先查血常规。"), ("要空腹吗？", "不需要。")], [("单独的问题", "回答")]]
    assert problems.examples == [f"{path}:2: last question without an answer"]


def test_disc_med_and_sharegpt_variants(tmp_path):
    disc = write_jsonl(
        tmp_path / "DISC-Med-SFT_released.jsonl",
        [
            {
                "_id": "x",
                "conversation": [{"role": "user", "content": "膝盖疼"}, {"role": "assistant", "content": "减少爬楼。"}],
            }
        ],
    )
    assert dialogues("disc_med", disc)[0] == [[("膝盖疼", "减少爬楼。")]]

    conversation = [
        {"from": "system", "value": "你是医生。"},
        {"from": "human", "value": "介绍长城"},
        {"from": "gpt", "value": "长城是防御工程。"},
        {"from": "human", "value": "多长？"},
        {"from": "gpt", "value": "两万多公里。"},
    ]
    expected = [("你是医生。\n介绍长城", "长城是防御工程。"), ("多长？", "两万多公里。")]
    jsonl = write_jsonl(tmp_path / "sharegpt_gpt4.jsonl", [{"conversations": conversation}])
    array = tmp_path / "ShareGPT_V3.json"
    array.write_text(json.dumps([{"id": "a_0", "conversations": conversation}], ensure_ascii=False), encoding="utf-8")
    minimind = write_jsonl(
        tmp_path / "minimind.jsonl",
        [
            {
                "conversations": [
                    {"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), "content": m["value"]}
                    for m in conversation
                ]
            }
        ],
    )
    for path in (jsonl, array, minimind):
        assert dialogues("sharegpt", path)[0] == [expected]

    odd = write_jsonl(
        tmp_path / "odd.jsonl",
        [
            {
                "conversations": [
                    {"from": "gpt", "value": "开场白"},
                    {"from": "human", "value": "问"},
                    {"from": "gpt", "value": "答"},
                    {"from": "tool", "value": "工具输出"},
                    {"from": "human", "value": "无人回答"},
                ]
            },
            {"conversations": [{"from": "gpt", "value": "只有回答"}]},
        ],
    )
    turns, problems = dialogues("sharegpt", odd)
    assert turns == [[("问", "答")]]
    assert problems.counts == {"no complete question-answer turn": 1}  # the second record, once
    assert problems.parts == {
        "answer before any question": 2,
        "last question without an answer": 1,
        "message with an unknown role": 1,
    }
    assert any("message with an unknown role ('tool')" in e for e in problems.examples)
    assert problems.records == 2


def test_empty_answers_drop_the_dialogue_and_are_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "ChatMed_Consult-v0.3.json",
        [{"query": "宝宝出汗多正常吗？", "response": ""}, {"query": "问", "response": "答"}],
    )
    turns, problems = dialogues("chatmed_consult", path)
    assert turns == [[("问", "答")]]
    assert problems.examples == [f"{path}:1: empty question or answer"]


NOT_TEXT = [None, 5, 3.5, True, [], ["文本"], {}, {"text": "文本"}]  # null counts as empty; the rest are not text
FIELDS = [
    "prompt",
    "chosen",
    "rejected",
    "response_chosen",
    "response_rejected",
    "text",
    "completion",
    "title",
    "content",
    "summary",
    "sections",
    "clean_text",
    "raw_text",
    "spo_list",
    "instruction",
    "input",
    "output",
    "target",
    "data",
    "conversation",
    "conversations",
    "query",
    "response",
    "question",
    "option",
    "answer",
    "exam_subject",
    "explanation",
    "abstract",
    "body_text",
]


@pytest.mark.parametrize(
    "fmt", sorted(name for name, f in corpora.FORMATS.items() if "json" in f.containers and f.kind != "image")
)  # image: test_vlm.py
def test_values_that_are_not_text_never_become_text(tmp_path, fmt):
    """Every JSON reader, fed records whose fields hold numbers, booleans, lists, objects or null (and
    records that are not objects): no crash, every one counted, and no str() of a non-text value as text."""
    good = {field: "文本" for field in FIELDS} | {
        "sections": [],
        "spo_list": [],
        "data": ["问：文本", "答：文本"],
        "option": {"A": "甲", "B": "乙"},
        "answer": "A",
        "conversation": [{"role": "user", "content": "文本"}, {"role": "assistant", "content": "文本"}],
        "conversations": [{"from": "human", "value": "文本"}, {"from": "gpt", "value": "文本"}],
    }
    good["body_text"] = [{"section": "文本", "text": "文本"}]
    kind = corpora.FORMATS[fmt].kind
    if kind == "preference":  # the answers answer the conversation's last question
        good["conversations"] = good["conversations"][:1]
        good["chosen"] = good["response_chosen"] = "文本一"  # the answers differ
    if fmt.startswith("s2orc"):  # a `content` field makes a record the datasets layout; these test the classic one
        del good["content"]
    records = [value for value in NOT_TEXT] + [{**good, field: value} for field in FIELDS for value in NOT_TEXT]
    records += [{**good, "data": ["问：文本", value]} for value in NOT_TEXT]
    records += [
        {**good, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "文本"}]}
        for value in NOT_TEXT
    ]
    path = write_jsonl(tmp_path / "junk.jsonl", records)
    problems = Problems()
    read = {"text": iter_texts, "dialogue": iter_dialogues, "question": iter_questions, "preference": iter_preferences}[
        kind
    ]
    outputs = list(read(Source("junk", fmt, [path]), problems))
    strings = (
        [o for o in outputs]
        if kind == "text"
        else [t for turns in outputs for turn in turns for t in turn]
        if kind == "dialogue"
        else [o["question"] for o in outputs] + [t for o in outputs for t in o["options"].values()]
        if kind == "question"
        else [o[key] for o in outputs for key in ("prompt", "chosen", "rejected")]
        + [t for o in outputs for turn in o["history"] for t in turn]
    )
    assert all(isinstance(s, str) for s in strings)
    for leaked in ("None", "5", "3.5", "True", "[", "{"):
        assert not any(leaked in s for s in strings), (fmt, leaked)
    not_objects = sum(not isinstance(value, dict) for value in NOT_TEXT)
    assert problems.counts["record is not an object"] == not_objects and strings  # the good variants still read


def test_non_text_sft_items_are_counted_not_turned_into_none(tmp_path):
    path = write_jsonl(
        tmp_path / "HuatuoGPT_sft_data_v1.jsonl",
        [{"data": [None, None]}, {"data": [1, 2]}, {"data": [["问"], {"答": 1}]}, {"data": ["问：头痛", "答：休息"]}],
    )
    turns, problems = dialogues("huatuo", path)
    assert turns == [[("头痛", "休息")]]
    assert problems.counts == {"field 'data' holds a non-text utterance": 3}
    path = write_jsonl(
        tmp_path / "ChatMed_Consult.json",
        [
            {"query": 5, "response": "答"},
            {"query": "问", "response": 7},
            {"query": "问", "response": None},
            {"query": "问", "response": "答"},
        ],
    )
    turns, problems = dialogues("chatmed_consult", path)
    assert turns == [[("问", "答")]]
    assert problems.counts == {
        "field 'query' is not text": 1,
        "field 'response' is not text": 1,
        "empty question or answer": 1,
    }


# ---------------------------------------------------------------- MCQ readers


def test_cmmlu_cmb_cmexam(tmp_path):
    cmmlu = tmp_path / "clinical_knowledge.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,人体最大的器官是,心脏,肝脏,皮肤,肺,C\n", encoding="utf-8")
    assert questions("cmmlu", cmmlu)[0] == [
        {
            "question": "人体最大的器官是",
            "options": {"A": "心脏", "B": "肝脏", "C": "皮肤", "D": "肺"},
            "answer": "C",
            "subject": "clinical_knowledge",
            "explanation": "",
            "where": 2,
        }
    ]

    cmb = tmp_path / "CMB-val-merge.json"
    cmb.write_text(
        json.dumps(
            [
                {
                    "exam_subject": "内科",
                    "question": "评估贫血首选？",
                    "option": {"A": "血常规", "B": "头颅CT", "C": "", "E": ""},
                    "answer": "A",
                    "explanation": "血常规反映血红蛋白。",
                },
                {
                    "exam_subject": "药学",
                    "question": "多选题",
                    "option": {"A": "甲", "B": "乙", "C": "丙"},
                    "answer": "AC",
                },
                {"exam_subject": "药学", "question": "答案不在选项里", "option": {"A": "甲", "B": "乙"}, "answer": "D"},
            ],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    found, problems = questions("cmb", cmb)
    assert found[0]["options"] == {"A": "血常规", "B": "头颅CT"} and found[0]["subject"] == "内科"
    assert found[1]["answer"] == "AC" and len(found) == 2
    assert problems.examples == [f"{cmb}:#2: answer is not one of the options ('D' not in AB)"]

    cmexam = tmp_path / "val.csv"
    cmexam.write_text(
        "Question,Options,Answer,Explanation,Clinical Department\n"
        '"初步评估贫血首选的检查是","A 血常规\nB 头颅CT\nC 肌电图",A,"血常规反映血红蛋白。",内科\n'
        '"没有答案的题","A 甲\nB 乙",,,\n'
        '"科室不适用的题","A 甲\nB 乙",B,,不符合\n'
        '"字母重复的题","A 甲\nB 乙\nB 丙",B,,内科\n',
        encoding="utf-8",
    )
    found, problems = questions("cmexam", cmexam)
    assert found[2]["subject"] == "" and len(found) == 3  # "不符合" (not applicable) is no subject
    assert problems.counts == {"Options gives a letter twice": 1}
    found = found[:2]
    assert found[0] == {
        "question": "初步评估贫血首选的检查是",
        "options": {"A": "血常规", "B": "头颅CT", "C": "肌电图"},
        "answer": "A",
        "subject": "内科",
        "explanation": "血常规反映血红蛋白。",
        "where": 2,
    }
    assert found[1]["answer"] == ""


def test_reading_a_format_as_the_wrong_kind_is_an_error():
    with pytest.raises(ValueError, match="holds questions"):
        list(iter_texts(Source("ceval", "ceval", []), Problems()))
    with pytest.raises(ValueError, match="holds texts"):
        list(iter_dialogues(Source("wiki", "wiki", []), Problems()))


# ---------------------------------------------------------------- sources


def test_parse_source_infers_formats_from_names():
    here = Path(__file__)
    for name, fmt in [
        ("wiki", "wiki"),
        ("wikipedia", "wiki"),
        ("563w_baidubaike", "baike"),
        ("c4", "c4_zh"),
        ("skypile_2020_40", "skypile"),
        ("belle_multiturn", "belle_multiturn"),
        ("belle", "belle"),
        ("Chinese-medical-dialogue", "medical_dialogue"),
        ("heldout", "text"),
    ]:
        assert parse_source(f"{name}={here}").format == fmt
    assert parse_source(f"anything={here}", "wudao").format == "wudao"


def test_parse_source_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format.*wiki") as unknown:
        parse_source(f"mystery={tmp_path}")
    # the advice works with every tool (eval.py has no --format): the name it suggests reads as plain text
    assert "--format" not in str(unknown.value) and "e.g. text_mystery=PATH for plain text" in str(unknown.value)
    assert parse_source(f"text_mystery={tmp_path}").format == "text"
    with pytest.raises(ValueError, match="unknown format 'nope'.*Formats"):
        parse_source(f"x={tmp_path}", "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_source(f"wiki={tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_source(str(tmp_path))
    for name in ("../escape", "..", ".", ".hidden", "a/b", "a\\b", "wiki/.."):  # NAME is OUT/NAME: a plain name
        with pytest.raises(ValueError, match="plain name"):
            parse_source(f"{name}={tmp_path}", "wiki")
    assert parse_source(f"wiki.v2-中文_1={tmp_path}", "wiki").name == "wiki.v2-中文_1"
    empty = parse_source(f"wiki={tmp_path}/*.json")
    assert empty.files == [] and empty.location == f"{tmp_path}/*.json"


def test_parse_source_glob_and_folder_are_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}\n", encoding="utf-8")
    assert [p.name for p in parse_source(f"skypile={tmp_path}").files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert [p.name for p in parse_source(f"skypile={tmp_path}/*.jsonl").files] == ["a.jsonl", "b.jsonl"]
    assert [p.name for p in parse_source(f"skypile={tmp_path}/**/*.jsonl").files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert [p.name for p in parse_source(f"skypile={tmp_path}/**").files] == ["a.jsonl", "b.jsonl", "c.jsonl"]  # once
    (tmp_path / "sky[1].jsonl").write_text("{}\n", encoding="utf-8")  # a real name with glob characters
    (tmp_path / "sky1.jsonl").write_text("{}\n", encoding="utf-8")
    assert parse_source(f"skypile={tmp_path}/sky[1].jsonl").files == [tmp_path / "sky[1].jsonl"]


def test_parse_source_follows_linked_folders_once_and_names_a_broken_link(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.jsonl").write_text("{}\n", encoding="utf-8")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("{}\n", encoding="utf-8")
    (corpus / "linked").symlink_to(tmp_path / "elsewhere")
    (corpus / "loop").symlink_to(corpus)  # a link back up: read once, not forever
    assert [p.name for p in parse_source(f"skypile={corpus}").files] == ["a.jsonl", "b.jsonl"]
    (corpus / "gone.jsonl").symlink_to(tmp_path / "nothing.jsonl")
    with pytest.raises(FileNotFoundError, match="gone.jsonl is a broken link"):
        parse_source(f"skypile={corpus}")


# ---------------------------------------------------------------- splitting for workers


def toyhom_csv(rows: int, encoding: str, stray_quote_at=None) -> bytes:
    """A Toyhom-layout CSV: quoted fields with newlines, commas and doubled quotes, lines that are also
    valid UTF-8 ("什", "时为") in GB18030, a row with undecodable bytes, one with too few fields, a blank
    line; stray_quote_at puts a quote inside an unquoted field of that row (csv reads it as a character)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["department", "title", "ask", "answer"])
    for i in range(rows):
        title = f"标题{i}身高5'11\"" if i == stray_quote_at else f"标题{i}"
        ask = (
            f"第{i}问，"
            + "续行\n" * (i % 3)
            + ('他说"疼"，' if i % 4 == 0 else "")
            + ("\n什\n时为" if i % 5 == 0 else "")
        )
        writer.writerow(["内科", title, ask, f"回答{i}" + "\n补充" * (i % 2)])
        if i == 40:
            text.write("外科,只有三列,没有回答\n\n")
    data = (
        text.getvalue()
        .replace(f'"标题{stray_quote_at}身高5\'11"""', f"标题{stray_quote_at}身高5'11\"")
        .encode(encoding)
    )
    row = data.index("第60问".encode(encoding))
    return data[:row] + b"\xff" + data[row:]


def read_split(pieces):
    """The pieces' texts read one after another, as data_process's parent takes them: the pieces of a
    file after one that read on to its end are dropped."""
    problems, texts_read, done = Problems(), [], set()
    for piece, span in pieces:
        if piece.files[0] in done:
            continue
        texts_read += list(iter_texts(piece, problems, span))
        if span is not None and span.read_to_end:
            done.add(piece.files[0])
    return texts_read, problems


def assert_pieces_read_like_the_whole(source, target, gzip_spans=8):
    whole_problems = Problems()
    whole = list(iter_texts(source, whole_problems))
    pieces = corpora.split_source(source, target, gzip_spans=gzip_spans)
    split, split_problems = read_split(pieces)
    assert split == whole and split_problems.examples == whole_problems.examples, target
    assert (split_problems.counts, split_problems.parts) == (whole_problems.counts, whole_problems.parts), target
    return pieces, whole, whole_problems


@pytest.mark.parametrize(
    "fmt,suffix,encoding",
    [
        ("skypile", ".jsonl", "utf-8"),
        ("text", ".txt", "utf-8"),
        ("text", ".txt", "gb18030"),
        ("medical_dialogue", ".csv", "utf-8"),
        ("medical_dialogue", ".csv", "gb18030"),
    ],
)
def test_split_pieces_read_exactly_like_the_whole_file(tmp_path, fmt, suffix, encoding):
    path = tmp_path / f"big{suffix}"
    if fmt == "skypile":
        lines = [json.dumps({"text": f"文档{i}" * (i % 7 + 1)}, ensure_ascii=False) for i in range(300)]
        lines[150] = "{broken"
        path.write_text("\n".join(lines) + "\n", encoding=encoding)
    elif (
        fmt == "text"
    ):  # GB18030: "什" and "时为" are also valid UTF-8, so every piece must read them as the whole file does
        path.write_text(
            "".join(
                f"第{i}段\n" + "续行\n" * (i % 3) + "什\n时为\n" * (i % 2) + "\n" * (1 + i % 2) for i in range(300)
            ),
            encoding=encoding,
        )
    else:
        path.write_bytes(toyhom_csv(300, encoding))
    source = Source("big", fmt, [path])
    whole_problems = Problems()
    whole = list(iter_texts(source, whole_problems))
    pieces = corpora.split_source(source, 500)
    assert len(pieces) > 5 and all(span.start < span.end for _, span in pieces)
    split, split_problems = read_split(pieces)
    assert split == whole
    assert split_problems.examples == whole_problems.examples  # line numbers survive the split
    assert not any(span.read_to_end for _, span in pieces)  # every cut was a record start
    if encoding == "gb18030":
        assert any("什\n时为" in text for text in whole) and "\ufffd" not in "".join(whole)
    if fmt == "medical_dialogue":
        assert len(whole) == 299 and whole[1] == "标题1\n第1问，续行\n回答1\n补充"
        assert whole_problems.counts == {corpora.UNDECODABLE: 1, "CSV row with the wrong number of fields": 1}


def wiki_array(path, items, separator=",\n", encoding="utf-8"):
    path.write_bytes(("[" + separator.join(items) + "]\n").encode(encoding))
    return Source("w", "wiki", [path])


def wiki_items(n):
    """Items whose strings hold what a scan for JSON's structure must see past: escaped quotes, runs of
    backslashes before a closing quote, brackets and commas, escapes; nested arrays and objects after them."""
    inside = [
        "",
        ' 引号\\"内',
        " 反斜杠\\\\",
        " 括号[{,}]和逗号,\\n",
        " 末尾\\\\\\\\",
        ' 奇数\\\\\\"',
        "\\u4e2d\\ud83d\\ude00",
    ]
    return [
        '{"completion": "第%d条%s", "source": "wiki", "tags": [%d, {"k": [1, 2]}]}' % (i, inside[i % 7], i)
        for i in range(n)
    ]


@pytest.mark.parametrize("piece", [1, 3, 1 << 20])
@pytest.mark.parametrize("separator", [",\n", ", "])  # ", ": the whole array on one line
def test_json_array_pieces_read_exactly_like_the_whole_file(tmp_path, monkeypatch, piece, separator):
    """A JSON array is cut at top-level commas, found by a scan of its bytes in pieces of `piece` bytes (1:
    every carry from one piece to the next); items are numbered as in the whole file."""
    monkeypatch.setattr(corpora, "ARRAY_PIECE", piece)
    items = wiki_items(150)
    items[40], items[41] = '{"title": "错字段"}', '"一个字符串"'  # bad records, reported by their index
    items[60], items[61] = '{"completion": "孤立 \\ud83d 代理"}', "[" * 600 + "]" * 600  # lone surrogate; too deep
    source = wiki_array(tmp_path / "wiki.json", items, separator)
    pieces, whole, whole_problems = assert_pieces_read_like_the_whole(source, 300)
    assert len(whole) == 146 and whole[1] == '第1条 引号"内' and whole[5] == '第5条 奇数\\"'
    assert len(pieces) > 20 and all(span is not None for _, span in pieces)
    assert len(whole_problems.counts) == 4
    assert f"{tmp_path / 'wiki.json'}:#40: missing field 'completion'" in " ".join(whole_problems.examples)
    assert not any(span.read_to_end for _, span in pieces)


def test_a_pretty_printed_json_array_is_cut_between_its_items(tmp_path):
    """pleisto's wikipedia-cn file: one array, each object over several lines (json.dump with indent)."""
    records = [
        {
            "completion": f"第{i}条百科\n历史, [注释] {{模板}}",
            "source": "wikipedia.zh2307",
            "meta": {"tags": ["a", "b"]},
        }
        for i in range(100)
    ]
    path = tmp_path / "wikipedia-cn-20230720-filtered.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    pieces = corpora.split_source(Source("w", "wiki", [path]), 400)
    assert len(pieces) > 10 and all(span for _, span in pieces)
    split, problems = read_split(pieces)
    assert split == [record["completion"] for record in records] and not problems.counts


def test_a_json_array_malformed_in_one_piece_skips_the_rest_as_the_whole_file_does(tmp_path):
    items = wiki_items(150)
    items[80] = '{"completion": tru}'
    source = wiki_array(tmp_path / "wiki.json", items)
    pieces, whole, whole_problems = assert_pieces_read_like_the_whole(source, 300)
    assert len(whole) == 80
    assert whole_problems.counts == {"JSON array cut short or malformed, rest of file skipped": 1}
    assert [span.read_to_end for _, span in pieces].count(True) == 1 and not pieces[-1][1].read_to_end


def test_json_arrays_are_read_whole_unless_clean_utf8_holding_one_well_formed_array(tmp_path):
    items = wiki_items(60)
    cases = {
        "gb18030.json": ("[" + ",\n".join(items) + "]").encode("gb18030"),
        "bad_byte.json": ("[" + ",\n".join(items) + "]").encode().replace("第30条".encode(), b"\xff30"),
        "cut.json": ("[" + ",\n".join(items)).encode(),
        "after.json": ("[" + ",\n".join(items) + "] 尾巴").encode(),
        "two.json": ("[" + ",\n".join(items) + "][1]").encode(),
        "unbalanced.json": ("[" + ",\n".join(items).replace("[1, 2]}", "[1, 2]}}", 1) + "]").encode(),
        "empty_items.json": ("[" + ",,\n".join(items) + "]").encode(),  # every cut would face an empty item
        "string_open.json": ("[" + ",\n".join(items) + ']"').encode(),
        "gzipped.json.gz": gzip.compress(("[" + ",\n".join(items) + "]").encode()),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        source = Source("w", "wiki", [tmp_path / name])
        assert corpora.split_source(source, 300) == [(source, None)], name
    assert len(corpora.split_source(wiki_array(tmp_path / "fine.json", items), 300)) > 10
    docs, problems = texts("wiki", tmp_path / "bad_byte.json")  # read whole: only the item with the bad byte is lost
    assert len(docs) == 59 and problems.counts == {corpora.UNDECODABLE: 1}


MEDLINE_HEAD = (
    '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle//EN"'
    ' "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_240101.dtd">\n<PubmedArticleSet>\n'
)


def medline_record(n, abstract=True, title=None):
    body = f'<Abstract>\n<AbstractText Label="RESULTS">Finding {n}, 第{n}项.</AbstractText>\n</Abstract>\n'
    return (
        f'<PubmedArticle>\n<MedlineCitation>\n<PMID Version="1">{n}</PMID>\n<Article>\n'
        f"<ArticleTitle>{title or f'Title {n} about blood pressure'}</ArticleTitle>\n{body if abstract else ''}"
        "</Article>\n</MedlineCitation>\n</PubmedArticle>\n"
    )


def write_xml(path, text):
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return Source("p", "pubmed", [path])


@pytest.mark.parametrize("name", ["pubmed24n0001.xml", "pubmed24n0001.xml.gz"])
def test_xml_pieces_read_exactly_like_the_whole_file(tmp_path, name):
    """An XML file of records is cut into equal spans (a gzipped one into at most gzip_spans); each span
    reads the records that start in it, after the file's head, with the whole file's line numbers."""
    records = [medline_record(n, abstract=n % 37 != 5) for n in range(300)]
    records[100] = records[100].replace("blood pressure", "blood &undefined; pressure")
    records[200] = "<DeleteCitation>\n<PMID>1</PMID>\n</DeleteCitation>\n" + records[200]
    text = MEDLINE_HEAD + "".join(records) + "</PubmedArticleSet>\n"
    source = write_xml(tmp_path / name, text)
    pieces, whole, problems = assert_pieces_read_like_the_whole(source, 2000)
    assert len(pieces) == 8 if name.endswith(".gz") else len(pieces) > 30
    assert [span.read_to_end for _, span in pieces] == [False] * (len(pieces) - 1) + [True]  # the last reads to EOF
    assert len(whole) == 292 and problems.counts == {"no abstract (title only)": 8}
    assert problems.parts == {"undefined XML entity replaced by a space": 1}
    line = text[: text.index("&undefined;")].count("\n") + 1  # in a span past the first
    assert f"{source.files[0]}:{line}: undefined XML entity" in " ".join(problems.examples) and line > 1000


@pytest.mark.parametrize("name", ["c.xml", "c.xml.gz"])
def test_xml_pieces_agree_with_the_whole_file_where_start_tags_fool_the_bytes(tmp_path, name):
    """The record's start tag in a comment, in a CDATA section, before the first record and under other
    elements than the first record's: a span that meets one where the next span would start reads on to
    the end of the file (the later spans are dropped), so the records are the whole file's."""
    records = [medline_record(n) for n in range(120)]
    for n in range(10, 120, 25):
        records[n] = "<!-- <PubmedArticle> in a comment -->\n" + records[n]
    records[40] = medline_record(40, title="<![CDATA[a <PubmedArticle> in a title]]>")
    records[80] = "<Wrapper>\n" + records[80] + records[81] + "</Wrapper>\n"
    records[81] = ""
    source = write_xml(tmp_path / name, MEDLINE_HEAD + "".join(records) + "</PubmedArticleSet>\n")
    fooled = set()  # the spans that read on to the end, by their index
    for parts in range(3, 40):  # cuts in many places
        size = source.files[0].stat().st_size
        pieces, whole, _ = assert_pieces_read_like_the_whole(source, -(-size // parts), gzip_spans=parts)
        assert len(whole) == 120 and len(pieces) > 2
        fooled |= {index for index, (_, span) in enumerate(pieces[:-1]) if span.read_to_end}
    assert len(fooled) > 3  # spans past the first among them: each read after spans that stopped where they should
    head_fooled = MEDLINE_HEAD.replace("<PubmedArticleSet>", "<!-- <PubmedArticle> --><PubmedArticleSet>")
    source = write_xml(
        tmp_path / f"head_{name}", head_fooled + "".join(map(medline_record, range(120))) + "</PubmedArticleSet>\n"
    )
    pieces, whole, _ = assert_pieces_read_like_the_whole(source, source.files[0].stat().st_size // 4, gzip_spans=4)
    assert len(whole) == 120 and pieces[0][1].read_to_end  # every span's head would end inside the comment


def test_xml_malformed_in_one_piece_skips_the_rest_as_the_whole_file_does(tmp_path):
    records = [medline_record(n) for n in range(120)]
    records[70] = records[70].replace("</ArticleTitle>", "</Title>")
    source = write_xml(tmp_path / "m.xml", MEDLINE_HEAD + "".join(records) + "</PubmedArticleSet>\n")
    pieces, whole, problems = assert_pieces_read_like_the_whole(source, 2000)
    assert len(whole) == 70 and list(problems.counts) == ["malformed XML, rest of file skipped"]


def test_xml_in_utf16_or_a_declared_multibyte_encoding_is_read_whole(tmp_path):
    text = MEDLINE_HEAD + "".join(map(medline_record, range(60))) + "</PubmedArticleSet>\n"
    (tmp_path / "utf16.xml").write_bytes(text.replace("utf-8", "utf-16").encode("utf-16"))
    (tmp_path / "gb.xml").write_bytes(text.replace("utf-8", "GB2312").encode("gb2312"))
    for name in ("utf16.xml", "gb.xml"):
        source = Source("p", "pubmed", [tmp_path / name])
        assert corpora.split_source(source, 2000) == [(source, None)]
        assert len(list(iter_texts(source, Problems()))) == 60


def test_a_csv_cut_inside_a_row_reads_that_row_and_the_rest_of_the_file(tmp_path):
    """A quote inside an unquoted field is a plain character to csv, but the split counts it: later cuts
    land inside quoted fields. The piece whose row runs past its end reads on to the end of the file."""
    path = tmp_path / "stray.csv"
    path.write_bytes(toyhom_csv(300, "gb18030", stray_quote_at=20))
    source = Source("big", "medical_dialogue", [path])
    whole_problems = Problems()
    whole = list(iter_texts(source, whole_problems))
    assert any("身高5'11\"" in text for text in whole)
    pieces = corpora.split_source(source, 500)
    split, split_problems = read_split(pieces)
    assert split == whole and split_problems.examples == whole_problems.examples
    assert any(span.read_to_end for _, span in pieces)


def test_files_the_format_does_not_read_are_counted_once_each_however_big(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "正文甲"}])
    (tmp_path / "notes.txt").write_text("一段笔记\n\n" * 2000, encoding="utf-8")  # text: split if it were read
    (tmp_path / "table.csv").write_text("x,y\n1,2\n" * 2000, encoding="utf-8")
    (tmp_path / "object.json").write_text(json.dumps({f"key{i}": i for i in range(3000)}, indent=2), encoding="utf-8")
    source = parse_source(f"skypile={tmp_path}")
    pieces = corpora.split_source(source, 1000)
    assert [span for _, span in pieces] == [None] * 4  # only a.jsonl is JSON lines, and it is small
    problems, docs = Problems(), []
    for piece, span in pieces:
        docs += list(iter_texts(piece, problems, span))
    assert docs == ["正文甲"]
    assert problems.counts == {"file of a kind this format does not read": 2, "not a record file (one JSON object)": 1}


def test_small_files_are_grouped_into_pieces_in_reading_order(tmp_path):
    """Consecutive files read whole share a piece of up to target_bytes; a file cut into spans closes the
    group before it, so the pieces read in the source's order, and their problems are the same."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        lines = [json.dumps({"text": f"第{i}号文件第{j}篇"}, ensure_ascii=False) for j in range(3)]
        (folder / f"part_{i:02d}.jsonl").write_text("\n".join(lines + (["{oops"] if i == 7 else [])) + "\n")
    write_jsonl(folder / "part_15_big.jsonl", [{"text": f"大文件第{j}篇"} for j in range(200)])
    source = parse_source(f"skypile={folder}")
    pieces = corpora.split_source(source, 600)
    whole_problems = Problems()
    whole = list(iter_texts(source, whole_problems))
    split, split_problems = read_split(pieces)
    assert split == whole and len(whole) == 290 and split_problems.examples == whole_problems.examples
    grouped = [piece.files for piece, span in pieces if span is None]
    assert [path for files in grouped for path in files] == [p for p in source.files if "big" not in p.name]
    assert max(map(len, grouped)) > 3 and all(sum(p.stat().st_size for p in files) <= 600 for files in grouped)
    spans = [index for index, (piece, span) in enumerate(pieces) if span is not None]
    assert spans == list(range(spans[0], spans[-1] + 1)) and len(spans) > 5  # the big file's spans, together
    assert pieces[spans[0] - 1][0].files[-1].name == "part_15.jsonl"
    assert pieces[spans[-1] + 1][0].files[0].name == "part_16.jsonl"
    sizes = [path.stat().st_size for path in source.files]
    assert corpora.split_source(source, 600, sizes) == pieces  # the caller's sizes, no stat of its own
    assert corpora.split_source(source, 600, [1] * len(sizes)) != pieces  # and they are what it goes by


def test_listing_and_checking_many_files_shows_progress(tmp_path, monkeypatch, capsys):
    """A folder of millions of files takes minutes to list and check before any work starts: a bar says so
    (after LISTING_BAR_DELAY seconds; small folders print nothing)."""
    for i in range(5):
        (tmp_path / f"{i}.jsonl").write_text('{"text": "x"}\n')
    parse_source(f"skypile={tmp_path}")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(corpora, "LISTING_BAR_DELAY", 0)
    parse_source(f"skypile={tmp_path}")
    err = capsys.readouterr().err
    assert f"listing {tmp_path}" in err and "skypile: checking files" in err and "/5 " in err


def test_gzip_files_are_not_split(tmp_path):
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "x"}\n' * 500))
    assert corpora.split_source(Source("w", "skypile", [gz]), 100) == [(Source("w", "skypile", [gz]), None)]


def test_problems_merge_keeps_counts_and_a_few_examples_per_reason():
    a, b = Problems(), Problems()
    for i in range(5):
        a.add("bad", "f.jsonl", i + 1)
        b.add("bad", "g.jsonl", i + 1)
    b.add("other", "g.jsonl", None, "detail")
    a.merge(b)
    assert a.counts == {"bad": 10, "other": 1}
    assert a.examples == ["f.jsonl:1: bad", "f.jsonl:2: bad", "f.jsonl:3: bad", "g.jsonl: other (detail)"]


# ---------------------------------------------------------------- every reader on its sample file

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="data/sample/ not present")


def raw_records(path):
    """The file as the standard library reads it: the reference the readers are checked against."""
    import csv

    path = SAMPLE / path
    if path.suffix == ".csv":
        encoding = "gb18030" if "Data_数据" in str(path) else "utf-8"
        with open(path, encoding=encoding, newline="") as f:
            return list(csv.DictReader(f))
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return (
        json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    )


PRETRAIN_SAMPLES = [  # format, file, the field that must appear in its record's document
    ("wiki", "wiki/wikipedia-cn-20230720-filtered.json", "completion"),
    ("baike", "baike/563w_baidubaike.json", "title"),
    ("c4_zh", "c4_zh/c4-zh.tfrecord-00000-of-01024.json.gz", "text"),
    ("wudao", "wudao/part-2021000001.json", "content"),
    ("medical_pretrain", "medical_pretrain/medical_book_zh.json", "text"),
    ("medical_pretrain", "medical_pretrain/train_encyclopedia.json", "text"),
    ("skypile", "skypile/2020-40_zh_head_0000.jsonl", "text"),
    ("guidelines", "guidelines/open_guidelines.jsonl", "clean_text"),
    ("cmekg", "cmekg/train_example.json", "text"),
    ("chatmed_tcm", "chatmed_tcm/ChatMed_TCM-v0.2.json", "response"),
    ("medical_finetune", "medical_finetune/train_zh_0.json", "output"),
    ("medical_dialogue", "medical_dialogue/Data_数据/IM_内科/内科5000-33000.csv", "answer"),
]


@needs_sample
@pytest.mark.parametrize("fmt,path,key", PRETRAIN_SAMPLES)
def test_pretraining_reader_on_its_sample(fmt, path, key):
    records = raw_records(path)
    docs, problems = texts(fmt, SAMPLE / path)
    assert not problems.counts
    assert len(docs) == len(records) > 5
    for record, doc in zip(records, docs):
        assert record[key].strip() in doc


@needs_sample
def test_sample_baike_nulls_and_cmekg_triples():
    records = raw_records("baike/563w_baidubaike.json")
    docs, _ = texts("baike", SAMPLE / "baike/563w_baidubaike.json")
    for record, doc in zip(records, docs):
        assert "None" not in doc and doc.startswith(record["title"])
        assert all(s["content"] in doc for s in record["sections"] if s["content"])
    assert any(r["summary"] is None for r in records) and any(
        s["content"] is None for r in records for s in r["sections"]
    )

    source = parse_source(f"cmekg={SAMPLE / 'cmekg'}")
    assert {p.name for p in source.files} == {"train_example.json", "predicate.json"}
    problems = Problems()
    docs = list(iter_texts(source, problems))
    assert not problems.counts  # predicate.json is skipped quietly
    first = raw_records("cmekg/train_example.json")[0]
    subject, predicate, obj = first["spo_list"][0]
    assert f"{subject}的{predicate}包括" in docs[0] and obj in docs[0].split("\n", 1)[1]


@needs_sample
def test_sample_cmedqa2_join():
    questions_ = {r["question_id"]: r["content"] for r in raw_records("cmedqa2/question.csv")}
    answers = raw_records("cmedqa2/answer.csv")
    orphans = [a for a in answers if a["question_id"] not in questions_]
    problems = Problems()
    docs = list(iter_texts(parse_source(f"cmedqa2={SAMPLE / 'cmedqa2'}"), problems))
    assert len(docs) == len({a["question_id"] for a in answers} & set(questions_))
    assert problems.counts == {"answer to an unknown question_id": len(orphans)} and orphans
    by_question = {doc.split("\n")[0]: doc for doc in docs}
    for answer in answers:
        if answer["question_id"] in questions_:
            assert answer["content"] in by_question[questions_[answer["question_id"]].strip()]


@needs_sample
def test_sample_gb18030_dialogues_decode_to_the_right_characters():
    path = "medical_dialogue/Data_数据/Pediatric_儿科/儿科5-14000.csv"
    with pytest.raises(UnicodeDecodeError):
        (SAMPLE / path).read_bytes().decode("utf-8")
    rows = raw_records(path)
    turns, problems = dialogues("medical_dialogue", SAMPLE / path)
    assert not problems.counts and len(turns) == len(rows)
    for row, dialogue in zip(rows, turns):
        assert dialogue == [(dialogue[0][0], row["answer"].strip())] and row["ask"].strip() in dialogue[0][0]
    assert all("\ufffd" not in prompt + answer for [(prompt, answer)] in turns)


@needs_sample
def test_sample_plain_text_blocks():
    text = (SAMPLE / "text/medical_notes.txt").read_text(encoding="utf-8")
    docs, problems = texts("text", SAMPLE / "text/medical_notes.txt")
    assert [d.strip() for d in docs] == [b.strip() for b in text.split("\n\n") if b.strip()] and not problems.counts


def user_turns(fmt, record):
    """How many question-answer turns the record holds, and its first question, read by hand."""
    if fmt in ("medical_finetune", "alpaca_zh", "belle"):
        return 1, record["instruction"]
    if fmt in ("chatmed_consult", "chatmed_tcm"):
        return 1, record["query"]
    if fmt == "huatuo":
        return len(record["data"]) // 2, record["data"][0].removeprefix("问：")
    if fmt == "disc_med":
        return len(record["conversation"]) // 2, record["conversation"][0]["content"]
    if fmt == "belle_multiturn":
        return record["instruction"].count("Human:"), record["instruction"].split("\n")[0].removeprefix("Human:")
    humans = [m["value"] for m in record["conversations"] if m["from"] == "human"]
    return len(humans), humans[0]


SFT_SAMPLES = [
    ("medical_finetune", "medical_finetune/train_zh_0.json", "output"),
    ("huatuo", "huatuo/HuatuoGPT_sft_data_v1.jsonl", None),
    ("disc_med", "disc_med/DISC-Med-SFT_released.jsonl", None),
    ("chatmed_consult", "chatmed_consult/ChatMed_Consult-v0.3.json", "response"),
    ("chatmed_tcm", "chatmed_tcm/ChatMed_TCM-v0.2.json", "response"),
    ("alpaca_zh", "alpaca_zh/alpaca_gpt4_data_zh.json", "output"),
    ("belle", "belle/Belle_open_source_1M.json", "output"),
    ("belle_multiturn", "belle_multiturn/multiturn_chat_0.8M.json", "output"),
    ("sharegpt", "sharegpt/sharegpt_gpt4.jsonl", None),
    ("sharegpt", "sharegpt/ShareGPT_V3_sample.json", None),
]


@needs_sample
@pytest.mark.parametrize("fmt,path,answer_key", SFT_SAMPLES)
def test_sft_reader_on_its_sample(fmt, path, answer_key):
    records = raw_records(path)
    found, problems = dialogues(fmt, SAMPLE / path)
    assert not problems.counts and len(found) == len(records) > 5
    for record, turns in zip(records, found):
        count, first_question = user_turns(fmt, record)
        assert len(turns) == count and first_question.strip() in turns[0][0]
        if answer_key:
            assert turns[-1][1] == record[answer_key].strip()
    if fmt == "sharegpt":
        for record, turns in zip(records, found):
            system = [m["value"] for m in record["conversations"] if m["from"] == "system"]
            if system:
                assert turns[0][0].startswith(system[0] + "\n")


MCQ_SAMPLES = [
    ("ceval", "eval/ceval", "clinical_medicine"),
    ("cmmlu", "eval/cmmlu", "clinical_knowledge"),
    ("cmb", "eval/cmb", None),
    ("cmexam", "eval/cmexam", None),
]


@needs_sample
@pytest.mark.parametrize("fmt,folder,subject", MCQ_SAMPLES)
def test_mcq_reader_on_its_sample(fmt, folder, subject):
    source = parse_source(f"{fmt}={SAMPLE / folder}")
    rows = [r for path in source.files for r in raw_records(path.relative_to(SAMPLE))]
    problems = Problems()
    found = list(iter_questions(source, problems))
    assert not problems.counts and len(found) == len(rows) > 5
    question_key = {"ceval": "question", "cmb": "question"}.get(fmt, "Question")
    answer_key = {"ceval": "answer", "cmb": "answer"}.get(fmt, "Answer")
    for row, question in zip(rows, found):
        assert question["question"] == row[question_key].strip() and question["answer"] == row[answer_key].strip()
        assert all(question["options"].values()) and set(question["answer"]) <= set(question["options"])
        if fmt == "cmb":
            assert question["options"] == {k: v for k, v in row["option"].items() if v}
        if subject:
            assert question["subject"] == subject
    if fmt == "cmb":
        assert any(len(q["answer"]) > 1 for q in found) and any(len(q["options"]) == 4 for q in found)
        assert all(q["subject"] for q in found)
    if fmt == "cmexam":
        assert sum(q["answer"] == "" for q in found) >= 1 and all(len(q["options"]) == 5 for q in found)


@pytest.mark.parametrize("long_line", [False, True])  # True: one line longer than LINE_PIECE, read in pieces
def test_json_array_in_gb18030_with_a_bad_byte_loses_only_that_item(tmp_path, long_line):
    path = tmp_path / "gb.json"
    first = "中文百科" * (200_000 if long_line else 3000)
    good = json.dumps([{"completion": first}, {"completion": "第二条"}, {"completion": "第三条"}], ensure_ascii=False)
    cut = good.index("第二条")
    path.write_bytes(good[:cut].encode("gb18030") + b"\xff" + good[cut:].encode("gb18030"))
    assert (path.stat().st_size > corpora.LINE_PIECE) == long_line
    docs, problems = texts("wiki", path)
    assert docs == [first, "第三条"]
    assert problems.examples == [f"{path}:#1: {corpora.UNDECODABLE}"]


# ---------------------------------------------------------------- medical literature: S2ORC, PMC, PubMed, PDF


def sample_generator():
    """data/sample/make_sample_data.py as a module: its PDF writer and the guideline lines it wrote."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample_data", SAMPLE / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_sample
def test_sample_files_are_what_the_generator_writes(tmp_path):
    """Every file under data/sample/ but vlm/ and preference/ (which have their own scripts) and the hand-written
    heldout_general/ is byte for byte what make_sample_data.py writes, and it writes nothing else: after editing
    the generator, regenerate."""
    written = sample_generator().build(str(tmp_path)).written
    skip = ("README.md", "sources.json", "make_sample_data.py", "vlm", "preference", "heldout_general", "__pycache__")
    on_disk = [p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.is_file()]
    assert sorted(written) == sorted(rel for rel in on_disk if rel.split("/")[0] not in skip)
    assert [rel for rel in written if (tmp_path / rel).read_bytes() != (SAMPLE / rel).read_bytes()] == []


def test_literature_formats_are_inferred_from_source_names():
    found = {
        name: corpora.infer_format(name)
        for name in (
            "s2orc",
            "s2orc_full",
            "pmc",
            "pmc_full",
            "pubmed",
            "pdf",
            "pubmed_central_2024",
            "medline_2024",
            "medsci",
        )
    }
    assert found == {
        "s2orc": "s2orc",
        "s2orc_full": "s2orc_full",
        "pmc": "pmc",
        "pmc_full": "pmc_full",
        "pubmed": "pubmed",
        "pdf": "pdf",
        "pubmed_central_2024": "pmc",
        "medline_2024": "pubmed",
        "medsci": "pdf",
    }


def spans_text(record, layer):
    text = record["content"]["text"]
    return [text[s["start"] : s["end"]] for s in json.loads(record["content"]["annotations"][layer] or "[]")]


@needs_sample
def test_s2orc_sample_both_layouts_in_reading_order():
    classic = raw_records("s2orc/pdf_parses_0.jsonl")
    datasets = raw_records("s2orc/s2orc-part0.jsonl.gz")
    problems = Problems()
    docs = list(iter_texts(parse_source(f"s2orc={SAMPLE / 's2orc'}"), problems))
    assert problems.counts == {"no abstract and no body_text": 1}
    assert problems.examples[0].startswith(f"{SAMPLE / 's2orc/pdf_parses_0.jsonl'}:3:")
    assert len(docs) == len(classic) - 1 + len(datasets) == 6

    kept = [r.get("grobid_parse", r) for r in classic if r.get("grobid_parse", r)["body_text"]]
    for record, doc in zip(kept, docs):
        body = record["body_text"]
        lines = doc.split("\n")
        headings = [p["section"] for p in body]
        assert [line for line in lines if line in headings] == list(dict.fromkeys(headings))  # each once, in order
        positions = [lines.index(p["text"]) for p in body]
        assert positions == sorted(positions)
        assert not any(entry["text"] in doc for entry in record["ref_entries"].values())
    assert docs[1].split("\n")[0] == classic[1]["metadata"]["title"]
    assert all(part in docs[1].split("\n") for part in classic[1]["metadata"]["abstract"].split(":::"))
    assert docs[2].split("\n")[0] == classic[3]["title"]

    for record, doc in zip(datasets, docs[3:]):
        lines = doc.split("\n")
        assert lines[0] == spans_text(record, "title")[0] and lines[1] == spans_text(record, "abstract")[0]
        body = spans_text(record, "sectionheader")[:-1] + spans_text(record, "paragraph")
        assert lines[2:] == [x.strip() for x in sorted(body, key=record["content"]["text"].index)]
        assert "Figure 1" not in lines and not any(caption in doc for caption in spans_text(record, "figurecaption"))
        assert not any(entry in doc for entry in spans_text(record, "bibentry"))

    full, problems = texts("s2orc_full", SAMPLE / "s2orc/pdf_parses_0.jsonl", SAMPLE / "s2orc/s2orc-part0.jsonl.gz")
    assert all(entry["text"] in full[0] for entry in classic[0]["ref_entries"].values())
    assert all(entry["title"] in full[0] for entry in classic[0]["bib_entries"].values())
    for record, doc in zip(datasets, full[3:]):
        assert all(x in doc for x in spans_text(record, "figurecaption") + spans_text(record, "bibentry"))


def test_s2orc_every_abstract_span_once_and_overlapping_paragraphs_once(tmp_path):
    text = "\nTitle\nAbstract one.\nAbstract two.\nBody one.\nFigure 1: a caption.\nBody two."
    at = {part: (text.index(part), text.index(part) + len(part)) for part in text.split("\n") if part}

    def layer(*parts):
        return json.dumps([{"start": at[p][0], "end": at[p][1]} for p in parts])

    covering = {"start": at["Body one."][0], "end": at["Body two."][1]}  # over both paragraphs and the caption
    annotations = {
        "title": layer("Title"),
        "abstract": layer("Abstract one.", "Abstract two."),
        "paragraph": json.dumps([*json.loads(layer("Body one.", "Body one.", "Body two.")), covering]),
        "figurecaption": layer("Figure 1: a caption."),
    }
    path = write_jsonl(tmp_path / "s2orc.jsonl", [{"content": {"text": text, "annotations": annotations}}])
    docs, problems = texts("s2orc", path)
    assert docs == ["Title\nAbstract one.\nAbstract two.\nBody one.\nBody two."] and not problems.counts


def test_s2orc_text_inside_figures_tables_and_references_is_not_body():
    """A heading or paragraph lies inside a figure, table or bibliography entry only when one of them holds
    it whole: one straddling two that overlap each other is body text."""
    text = "T\nA\nfigure start. straddling paragraph. table end.\nIn the table.\nRef 1.\nBody."
    figure, table = (4, 30), (25, 64)  # overlapping: together they cover the straddling paragraph
    at = {part: (text.index(part), text.index(part) + len(part)) for part in ("T", "A", "Ref 1.", "Body.")}
    inside = (text.index("In the table."), text.index("In the table.") + len("In the table."))
    straddling = (text.index("straddling"), text.index("table end.") + len("table end."))
    assert figure[0] < straddling[0] < table[0] < figure[1] < straddling[1] <= inside[0] < inside[1] == table[1]

    def layer(*spans):
        return json.dumps([{"start": start, "end": end} for start, end in spans])

    annotations = {
        "title": layer(at["T"]),
        "abstract": layer(at["A"]),
        "figure": layer(figure),
        "table": layer(table),
        "bibentry": layer(at["Ref 1."]),
        "paragraph": layer((figure[0] + 1, figure[1] - 1), straddling, inside, at["Ref 1."], at["Body."]),
        "sectionheader": layer((table[0] + 1, table[0] + 5)),
    }
    (doc,) = corpora.s2orc({"content": {"text": text, "annotations": annotations}})
    assert doc == "T\nA\nstraddling paragraph. table end.\nBody."


def test_s2orc_classic_abstract_from_another_parse_than_the_body(tmp_path):
    record = {
        "paper_id": "9",
        "pdf_parse": {"abstract": [{"text": "The abstract.", "section": "Abstract"}], "body_text": []},
        "latex_parse": {"body_text": [{"text": "The body.", "section": "Intro"}]},
    }
    docs, _ = texts("s2orc", write_jsonl(tmp_path / "s2orc.jsonl", [record]))
    assert docs == ["The abstract.\nIntro\nThe body."]


def test_s2orc_bad_records_are_counted(tmp_path):
    text = "\nTitle of a paper\nA paragraph of text."
    layers = {"title": '[{"start":1,"end":17}]', "paragraph": '[{"start":18,"end":38}]'}
    good = {"content": {"text": text, "annotations": layers}}
    path = write_jsonl(
        tmp_path / "s2orc.jsonl",
        [
            good,
            {"content": {"text": text, "annotations": {"paragraph": "[{start: 1}"}}},
            {"content": {"text": text, "annotations": {"paragraph": '[{"start":18,"end":99}]'}}},
            {"content": {"text": text, "annotations": {"paragraph": '[{"begin":18}]'}}},
            {"content": {"text": text, "annotations": {"paragraph": '[{"start":1e400,"end":3}]'}}},
            {"content": {"text": text, "annotations": {"paragraph": '[{"start":1.9,"end":3}]'}}},
            {"content": {"text": text, "annotations": {"paragraph": "5"}}},
            {"content": "just text"},
            {"paper_id": "1", "title": "Only a title"},
            {"paper_id": "2", "title": "T", "body_text": "not a list"},
            {
                "paper_id": "3",
                "title": "Headings only",
                "abstract": "  ",
                "body_text": [{"section": "Intro", "text": ""}],
            },
        ],
    )
    docs, problems = texts("s2orc", path)
    assert docs == ["Title of a paper\nA paragraph of text."]
    assert problems.counts == {
        "annotation 'paragraph' is not JSON": 1,
        "annotation 'paragraph' points outside the text": 1,
        "annotation 'paragraph' has a span without integer start and end": 3,
        "annotation 'paragraph' is not a list of spans": 1,
        "field 'content' is not an object": 1,
        "no abstract and no body_text": 2,
        "field 'body_text' is not a list of paragraphs": 1,
    }
    assert any(
        e.startswith(f"{path}:3: annotation 'paragraph' points outside the text (18-99 of 38")
        for e in problems.examples
    )


def jats_reference(path):
    """Title, paragraphs, captions and references of a JATS file, read with the standard library."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()

    def flat(element):
        return " ".join("".join(element.itertext()).split())

    return {
        "title": flat(root.find("front/article-meta/title-group/article-title")),
        "paragraphs": [
            flat(p)
            for p in root.find("body").iter("p")
            if not p.findall("fig") and all(p not in c.iter("p") for c in root.iter("caption"))
        ],
        "captions": [flat(c) for c in root.iter("caption")],
        "references": [flat(r) for r in root.iter("ref")],
    }


@needs_sample
def test_pmc_sample_keeps_text_and_drops_floats_and_references_unless_full():
    source = parse_source(f"pmc={SAMPLE / 'pmc'}")
    problems = Problems()
    docs = list(iter_texts(source, problems))
    assert not problems.counts and len(docs) == len(source.files) == 3
    assert {p.suffix for p in source.files} == {".xml", ".nxml"}
    full, _ = texts("pmc_full", *source.files)
    for path, doc, full_doc in zip(source.files, docs, full):
        reference = jats_reference(path)
        lines = doc.split("\n")
        assert lines[0] == reference["title"]
        assert [p for p in reference["paragraphs"] if p in lines] == reference["paragraphs"]  # all, in order
        assert lines.index("Introduction") < lines.index(reference["paragraphs"][-1])
        assert "Age 18 years or older" in lines  # a list inside the body
        assert reference["captions"] and not any(c in doc for c in reference["captions"])
        assert not any(r in doc for r in reference["references"]) and "References" not in lines
        assert all(c in full_doc for c in reference["captions"]) and all(r in full_doc for r in reference["references"])


def test_pmc_article_sets_gzip_and_malformed_files(tmp_path):
    article = (
        "<article><front><article-meta><title-group><article-title>T{n}</article-title></title-group>"
        "<abstract><p>Abstract {n} with <italic>emphasis</italic>.</p></abstract></article-meta></front>"
        "<body><sec><title>Intro</title><p>Body {n}.</p></sec></body></article>"
    )
    both = tmp_path / "set.xml.gz"
    both.write_bytes(
        gzip.compress(("<pmc-articleset>" + article.format(n=1) + article.format(n=2) + "</pmc-articleset>").encode())
    )
    cut = tmp_path / "cut.xml"
    cut.write_text(article.format(n=3) + "\n<article><front>\n<article-meta", encoding="utf-8")
    empty = tmp_path / "empty.xml"
    empty.write_text(
        "<article><front><article-meta><title-group><article-title>Only</article-title>"
        "</title-group></article-meta></front></article>",
        encoding="utf-8",
    )
    docs, problems = texts("pmc", both, cut, empty)
    assert docs == [f"T{n}\nAbstract {n} with emphasis.\nIntro\nBody {n}." for n in (1, 2, 3)]
    assert problems.counts == {"malformed XML, rest of file skipped": 1, "no abstract and no body text": 1}
    assert f"{cut}:2: malformed XML, rest of file skipped (junk after document element)" in problems.examples


def test_pmc_inline_markup_glossaries_supplements_and_deep_nesting(tmp_path):
    body = (
        "<sec><title>Methods</title>"
        "<p>Counts of 10<sup>6</sup> cells and 10<sup>−3</sup> M; CD4<sup>+</sup> T cells; "
        'risk rises<sup><xref ref-type="bibr" rid="B1">1</xref>,<xref ref-type="bibr" rid="B2">2</xref></sup> '
        'with age [<xref ref-type="bibr" rid="B3">3</xref>]<fn><p>A footnote.</p></fn> daily.</p>'
        "<p>Formula <inline-formula><alternatives><tex-math>x^2</tex-math>"
        "<mml:math><mml:mi>x</mml:mi><mml:mn>2</mml:mn></mml:math></alternatives></inline-formula> end.</p>"
        "<def-list><def-item><term>BP</term><def><p>blood pressure</p></def></def-item></def-list>"
        "<supplementary-material><caption><p>Supplementary table S1.</p></caption></supplementary-material>"
        "</sec>"
        '<sec sec-type="display-objects"><title>Figures and Tables</title>'
        "<fig><caption><p>Figure 1.</p></caption></fig></sec>"
    )
    article = (
        "<article><front><article-meta><title-group><article-title>T</article-title></title-group>"
        "<abstract><p>Abstract.</p></abstract></article-meta></front><body>{}</body></article>"
    )
    path = tmp_path / "a.xml"
    deep = "<sec><title>t</title>" * 5000 + "<p>x</p>" + "</sec>" * 5000
    path.write_text(
        "<pmc-articleset>" + article.format(body) + article.format(deep) + article.format(body) + "</pmc-articleset>",
        encoding="utf-8",
    )
    docs, problems = texts("pmc", path)
    expected = (
        "T\nAbstract.\nMethods\n"
        "Counts of 10^6 cells and 10^−3 M; CD4+ T cells; risk rises with age [3] daily.\n"
        "Formula x^2 end.\nBP: blood pressure"
    )
    assert docs == [expected, expected]
    assert problems.counts == {"record nested too deeply, record skipped": 1}
    full, _ = texts("pmc_full", path)
    assert "Supplementary table S1." in full[0] and "Figures and Tables\nFigure 1." in full[0]


def test_pmc_drops_headings_over_nothing_kept(tmp_path):
    body = (
        "<sec><title>Results</title><p>Found.</p><sec><title>Table 1</title><table-wrap><caption><p>T1.</p>"
        "</caption></table-wrap></sec></sec><sec><p>Untitled section.</p></sec>"
        "<sec><title>Supplementary Material</title><supplementary-material><caption><p>Data S1.</p></caption>"
        "</supplementary-material></sec>"
    )
    path = tmp_path / "a.xml"
    path.write_text(
        "<article><front><article-meta><title-group><article-title>T</article-title></title-group>"
        f"<abstract><p>Abstract.</p></abstract></article-meta></front><body>{body}</body></article>",
        encoding="utf-8",
    )
    assert texts("pmc", path)[0] == ["T\nAbstract.\nResults\nFound.\nUntitled section."]
    assert texts("pmc_full", path)[0] == [
        "T\nAbstract.\nResults\nFound.\nTable 1\nT1.\nUntitled section.\nSupplementary Material\nData S1."
    ]


def test_pmc_never_builds_what_it_does_not_read(tmp_path, monkeypatch):
    """Reference lists, tables, figures, back matter, sub-articles and journal metadata are passed over
    while parsing (not built, not counted against the record size cap), and the documents are the same
    as reading the whole tree: text after a figure inside a paragraph is kept."""
    article = (
        "<article><front><journal-meta><journal-title>J</journal-title></journal-meta><article-meta>"
        "<title-group><article-title>T</article-title></title-group><abstract><p>Abstract.</p></abstract>"
        "</article-meta></front><body><sec><title>Results</title>"
        "<p>Before <fig><caption><p>Figure 1.</p></caption></fig> after, then 10<sup>6</sup>.</p>"
        "<table-wrap><table><tr><td>{cells}</td></tr></table></table-wrap><p>Last.</p></sec>"
        '<sec sec-type="display-objects"><title>Figures</title></sec></body>'
        "<back><ack><p>Thanks.</p></ack><ref-list><ref><mixed-citation>Ref 1.</mixed-citation></ref></ref-list>"
        "</back><floats-group><fig><caption><p>F2.</p></caption></fig></floats-group>"
        "<sub-article><front-stub><title-group><article-title>Reply</article-title></title-group></front-stub>"
        "<body><p>Sub.</p></body></sub-article></article>"
    )
    path = tmp_path / "a.xml"
    path.write_text(article.format(cells="cell " * 400), encoding="utf-8")
    monkeypatch.setattr(corpora, "MAX_RECORD_CHARS", 1000)  # the table alone is 2,000 characters
    fmt = corpora.FORMATS["pmc"]
    ((_, record),) = corpora.iter_records(path, Problems(), None, fmt)
    built = {element.tag for element in record.iter()}
    assert built >= {"article", "front", "article-meta", "abstract", "body", "sec", "p", "sup"}
    assert not built & (corpora.JATS_UNREAD | {"table", "td", "caption"})
    assert "Figures" not in {element.text for element in record.iter("title")}
    docs, problems = texts("pmc", path)
    assert docs == ["T\nAbstract.\nResults\nBefore after, then 10^6.\nLast."] and not problems.counts
    monkeypatch.setattr(corpora, "MAX_RECORD_CHARS", 1 << 20)
    files = [path, *parse_source(f"pmc={SAMPLE / 'pmc'}").files]
    docs = texts("pmc", *files)[0]
    monkeypatch.setitem(corpora.FORMATS, "pmc", replace(fmt, unread=None))
    assert texts("pmc", *files)[0] == docs and len(docs) == 4  # the same as from the whole tree


def test_xml_entity_declarations_are_refused_and_external_dtds_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET", encoding="utf-8")
    article = (
        "<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>1</PMID><Article>"
        "<ArticleTitle>{}</ArticleTitle>"
        "<Abstract><AbstractText>Text.</AbstractText></Abstract></Article></MedlineCitation></PubmedArticle>"
        "</PubmedArticleSet>"
    )
    xxe = tmp_path / "xxe.xml"
    xxe.write_text(
        f'<!DOCTYPE x [<!ENTITY leak SYSTEM "{secret.as_uri()}">]>' + article.format("&leak;"), encoding="utf-8"
    )
    laughs = tmp_path / "laughs.xml"
    entities = '<!ENTITY lol0 "lol">' + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    laughs.write_text(f"<!DOCTYPE x [{entities}]>" + article.format("&lol9;"), encoding="utf-8")
    dtd = tmp_path / "evil.dtd"
    dtd.write_text(f'<!ENTITY leak SYSTEM "{secret.as_uri()}">', encoding="utf-8")
    external = tmp_path / "external.xml"
    external.write_text(
        f'<!DOCTYPE PubmedArticleSet SYSTEM "{dtd.as_uri()}">'
        + article.format("A &leak;title of&nbsp;an &alpha;-type"),
        encoding="utf-8",
    )
    docs, problems = texts("pubmed", xxe, laughs, external)
    assert docs == [
        "A title of an α-type\nText."
    ]  # an HTML name is its character (&nbsp;: a space here), another a space
    assert problems.counts == {"XML declares entities (XXE / billion laughs risk), file refused": 2}
    assert problems.parts == {"undefined XML entity replaced by a space": 1}
    assert "TOP-SECRET" not in " ".join(docs + problems.examples)


def test_xml_in_an_encoding_expat_lacks_a_file_without_records_and_a_huge_record(tmp_path, monkeypatch):
    article = (
        '<?xml version="1.0" encoding="{}"?>\n<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>1</PMID>'
        "<Article><ArticleTitle>{}</ArticleTitle><Abstract><AbstractText>{}</AbstractText></Abstract></Article>"
        "</MedlineCitation></PubmedArticle></PubmedArticleSet>"
    )
    for encoding in ("GB2312", "GBK", "GB18030"):
        (tmp_path / f"{encoding}.xml").write_bytes(article.format(encoding, "高血压", "摘要").encode(encoding))
    (tmp_path / "unknown.xml").write_bytes(article.format("x-nonesuch", "T", "A").encode())
    (tmp_path / "bad.xml").write_bytes(article.format("GB2312", "T", "A").encode() + b"\xff\xff")
    (tmp_path / "error.xml").write_text("<html><body>503 Service Unavailable</body></html>", encoding="utf-8")
    monkeypatch.setattr(corpora, "MAX_RECORD_CHARS", 1000)
    (tmp_path / "huge.xml").write_text(article.format("UTF-8", "T", "词" * 2000) + "\n", encoding="utf-8")
    in_attributes = article.format("UTF-8", "T", "A").replace("<PMID>", f'<PMID Version="{"1" * 2000}">')
    (tmp_path / "huge_attributes.xml").write_text(in_attributes, encoding="utf-8")  # counted like text
    docs, problems = texts("pubmed", *sorted(tmp_path.iterdir()))
    assert docs == ["高血压\n摘要"] * 3
    assert problems.counts == {
        "undecodable bytes for the XML's declared encoding, rest of file skipped": 1,
        "no <PubmedArticle> element in the file (an error page? another format?), file skipped": 1,
        "XML record of more than 1,000 characters, record skipped": 2,
        "XML declares an encoding Python does not know, file skipped": 1,
    }


@needs_sample
def test_pubmed_sample_titles_labels_and_title_only_citations():
    with gzip.open(SAMPLE / "pubmed/pubmed24n0001.xml.gz", "rt", encoding="utf-8") as f:
        xml = f.read()
    source = parse_source(f"pubmed={SAMPLE / 'pubmed'}")
    assert {p.name for p in source.files} == {"pubmed24n0001.xml.gz", "pubmed24n0001.xml.gz.md5"}
    problems = Problems()
    docs = list(iter_texts(source, problems))
    assert xml.count("<PubmedArticle>") == len(docs) + 1 and "<DeleteCitation>" in xml
    assert problems.counts == {"no abstract (title only)": 1} and "PMID 90000032" in problems.examples[0]
    labelled = [d for d in docs if "\nMETHODS: We randomly assigned" in d]
    assert len(labelled) == 8 and all(d.split("\n")[1].startswith("BACKGROUND: ") for d in labelled)
    vernacular = "[Blood pressure control in rural clinics].\n农村诊所的血压控制情况\nAmong 1,200 adults"
    assert vernacular in "\n".join(docs)


def pubmed_file(path, articles):
    article = (
        '<PubmedArticle><MedlineCitation><PMID Version="1">{n}</PMID><Article><ArticleTitle>Title {n} about '
        'blood pressure</ArticleTitle><Abstract><AbstractText Label="RESULTS">{body}</AbstractText></Abstract>'
        "</Article></MedlineCitation><PubmedData><ReferenceList>{refs}</ReferenceList></PubmedData>"
        "</PubmedArticle>\n"
    )
    refs = "".join(f"<Reference><Citation>Reference {k}.</Citation></Reference>" for k in range(3))
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        f.write("<PubmedArticleSet>\n")
        for n in range(articles):
            f.write(article.format(n=n, body=f"Finding {n}. " * 200, refs=refs))
        f.write("</PubmedArticleSet>\n")


def test_pubmed_is_streamed_in_memory_far_below_the_file_size(tmp_path):
    import tracemalloc

    path = tmp_path / "pubmed.xml.gz"
    pubmed_file(path, 2_500)
    with gzip.open(path, "rb") as f:
        xml_bytes = len(f.read())
    problems = Problems()
    tracemalloc.start()
    count = sum(1 for _ in iter_texts(Source("p", "pubmed", [path]), problems))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 2_500 and not problems.counts
    assert xml_bytes > 6e6 and peak < 2e6, (peak, xml_bytes)  # one 64 KiB chunk's records, not the file


@needs_sample
def test_pdf_sample_drops_running_headers_joins_hyphens_and_counts_scans():
    generator = sample_generator()
    source = parse_source(f"pdf={SAMPLE / 'pdf'}")
    problems = Problems()
    docs = list(iter_texts(source, problems))
    assert problems.counts == {"no text layer: needs OCR": 1} and "scanned_guideline.pdf" in problems.examples[0]
    english = next(d for d in docs if d.startswith("Hypertension in adults"))
    chinese = next(d for d in docs if d.startswith("高血压基层诊疗指南"))
    assert "Example Health Service" not in english and "Page 1 of" not in english
    assert "中华示例医学会" not in chinese and "第 1 页" not in chinese and "页" not in chinese
    assert all(line in chinese.split("\n") for d in generator.DISEASES[:2] for line in generator.guideline_zh_lines(d))
    guideline = generator.GUIDELINES[1]
    written = [guideline["title"]] + [line for head, texts in guideline["sections"] for line in [head] + texts]
    assert english.split() == " ".join(written).split()  # every word in order, none cut by a hyphen, no furniture
    assert "pres-" not in english and "pressure monitoring" in english


def test_pdf_running_lines_are_page_furniture_not_numbered_text():
    topics = ["salt", "exercise", "sleep", "smoking", "alcohol", "weight"]
    pages = [
        f"Hypertension guideline 2024\nBody text about {topic}.\nMaximum dose {10 * i} mg per day\nPage {i} of 6"
        for i, topic in enumerate(topics, 1)
    ]
    (doc,) = corpora.pdf(pages)
    assert doc.split("\n") == [
        line
        for i, topic in enumerate(topics, 1)
        for line in (f"Body text about {topic}.", f"Maximum dose {10 * i} mg per day")
    ]
    printed = [f"{topic.title()}\nAdvice on {topic}.\n- {i + 4} -" for i, topic in enumerate(topics, 1)]  # page + 4
    (doc,) = corpora.pdf(printed)
    assert doc == "\n".join(f"{topic.title()}\nAdvice on {topic}." for topic in topics)  # the page numbers only
    (doc,) = corpora.pdf(["Treat\u00ad\nment with the ﬁrst-line drug; soft\u00adhyphen kept out.", "ﬂuid ﬀ."])
    assert doc == "Treatment with the first-line drug; softhyphen kept out.\nfluid ff."
    text = "A well-\nknown drug, well-known to GPs; Well-\nKnown stays; treat-\nment; anti-inflam-\nmatory; "
    text += "well\u00ad\nknown"
    assert corpora.join_hyphenated(text) == (
        "A well-known drug, well-known to GPs; Well-\nKnown stays; treatment; anti-inflammatory; wellknown"
    )  # a soft hyphen marks a break even where the compound exists
    with pytest.raises(corpora.BadRecord, match="PDF has no pages"):
        list(corpora.pdf([]))


def test_a_pdf_whose_text_passes_the_record_limit_is_skipped(tmp_path, monkeypatch):
    pdf_bytes = sample_generator().pdf_bytes
    path = tmp_path / "long.pdf"
    path.write_bytes(pdf_bytes([("F1", [f"Line {i} of a long page of text."]) for i in range(8)]))
    monkeypatch.setattr(corpora, "MAX_RECORD_CHARS", 100)
    docs, problems = texts("pdf", path)
    assert docs == [] and problems.counts == {"PDF of more than 100 characters of text, file skipped": 1}
    assert "pages read" in problems.examples[0]


def test_pdf_textless_pages_and_damaged_files_are_counted(tmp_path):
    pdf_bytes = sample_generator().pdf_bytes
    mixed = tmp_path / "mixed.pdf"
    mixed.write_bytes(pdf_bytes([("F1", ["First page text."]), ("image", None), ("F1", ["Third page text."])]))
    cut = tmp_path / "cut.pdf"
    cut.write_bytes(mixed.read_bytes()[:300])
    fake = tmp_path / "fake.pdf"
    fake.write_text("not a pdf at all", encoding="utf-8")
    docs, problems = texts("pdf", mixed, cut, fake)
    assert docs == ["First page text.\nThird page text."]
    assert problems.counts == {"unreadable PDF": 2}
    assert problems.parts == {"page without a text layer: needs OCR": 1}
    assert f"{mixed}: page without a text layer: needs OCR (page 2)" in problems.examples


BINARY_LINE = bytes(b for b in range(256) if b != 0x0A) * 32  # 8 KiB of every byte value but a newline
HIGH_BYTES = bytes(range(0x80, 0x100)) * 64  # 8 KiB of bytes that are never ASCII: quotes and commas stay intact
DOCS = [f"第{i}篇：高血压患者应定期监测血压，遵医嘱服药。" + "糖尿病需要控制饮食。" * (i % 5) for i in range(40)]


def in_container(kind, docs, encoding, bad_at=None, ascii_head=0):
    """The documents as bytes of one container: (file suffix, bytes); bad_at puts HIGH_BYTES into that
    document's text; ascii_head puts ASCII-only documents in front."""
    import csv
    import io

    head = [f"ascii only document {i} " + "x" * 1000 for i in range(ascii_head)]
    if kind == "jsonl":
        lines = [json.dumps({"text": d}, ensure_ascii=False).encode(encoding) + b"\n" for d in head + docs]
    elif kind == "array":
        lines = [b"[\n"] + [
            json.dumps({"completion": d}, ensure_ascii=False).encode(encoding) + b",\n" for d in head + docs
        ]
        lines[-1] = lines[-1].replace(b",\n", b"\n")
        lines.append(b"]\n")
    elif kind == "csv":
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([["ask", "answer"]] + [["Q", d] for d in head + docs])
        lines = [line.encode(encoding) + b"\n" for line in text.getvalue().splitlines()]
    else:
        lines = [d.encode(encoding) + b"\n\n" for d in head + docs]
    if bad_at is not None:  # the binary line goes inside the record of that document
        where = {"jsonl": 0, "array": 1, "csv": 1, "text": 0}[kind] + len(head) + bad_at
        lines[where] = lines[where][:12] + HIGH_BYTES + lines[where][12:]
    return {"jsonl": ".jsonl", "array": ".json", "csv": ".csv", "text": ".txt"}[kind], b"".join(lines)


KIND_FORMAT = {"jsonl": "skypile", "array": "wiki", "csv": "medical_dialogue", "text": "text"}  # csv: ask -> answer


def test_a_binary_line_in_a_utf8_jsonl_is_skipped_and_the_file_stays_utf8(tmp_path):
    lines = [json.dumps({"text": d}, ensure_ascii=False).encode() + b"\n" for d in DOCS * 60]
    for at in (0, 1000):  # where the encoding is sniffed, and further on
        path = tmp_path / f"c{at}.jsonl"
        path.write_bytes(b"".join(lines[:at] + [BINARY_LINE + b"\n"] + lines[at:]))
        docs, problems = texts("skypile", path)
        assert docs == DOCS * 60
        assert problems.examples == [f"{path}:{at + 1}: {corpora.UNDECODABLE}"]


@pytest.mark.parametrize("kind", ["jsonl", "array", "csv", "text"])
@pytest.mark.parametrize("bad_at", [0, 17])  # 0: the bad bytes are where the file's encoding is sniffed
def test_bad_bytes_skip_their_record_only(tmp_path, kind, bad_at):
    suffix, data = in_container(kind, DOCS, "utf-8", bad_at=bad_at)
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(data)
    docs, problems = texts(KIND_FORMAT[kind], path)
    docs = [d.strip().removeprefix("Q\n") for d in docs]
    assert docs == DOCS[:bad_at] + DOCS[bad_at + 1 :]  # every other document exactly, none garbled
    assert problems.counts == {corpora.UNDECODABLE: 1}


@pytest.mark.parametrize("kind", ["jsonl", "array", "csv", "text"])
def test_gb18030_after_an_ascii_head_longer_than_the_sniff_is_read_right(tmp_path, kind):
    suffix, data = in_container(kind, DOCS + ["什", "时为", "症\n状"], "gb18030", ascii_head=80)
    assert data[: corpora.SNIFF_BYTES].isascii()
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(data)
    assert corpora.file_encoding(path) == "gb18030"
    docs, problems = texts(KIND_FORMAT[kind], path)
    docs = [d.strip().removeprefix("Q\n") for d in docs]
    assert docs[80:] == DOCS + ["什", "时为", "症\n状"] and not problems.counts


def test_line_decoder_decides_every_line_on_its_own():
    utf8, gb = corpora.LineDecoder("utf-8"), corpora.LineDecoder("gb18030")
    chinese = "高血压患者应定期监测血压，遵医嘱服药。"
    for decoder in (utf8, gb):
        assert decoder.decode(chinese.encode()) == chinese  # long valid UTF-8 is UTF-8 in any file
        assert decoder.decode(chinese.encode("gb18030")) == chinese  # invalid UTF-8, valid GB18030
        assert decoder.decode(b"plain ascii\n") == "plain ascii\n"
        assert decoder.decode(BINARY_LINE) is None
    short = "什".encode("gb18030")  # also valid UTF-8 ("ʲ"): the file's encoding decides
    assert gb.decode(short) == "什" and utf8.decode(short) == short.decode("utf-8")
    both = ("中文" * 10).encode()  # E4 B8 | AD E6 | 96 87: UTF-8 that is also valid GB18030 (as mojibake)
    assert both.decode("gb18030") != "中文" * 10
    assert gb.decode(both) == "中文" * 10  # long enough to be UTF-8 even in a GB18030 file
    bad_pair = ("中文" * 5).encode() + b"\x81\x40" + ("中文" * 5).encode()  # a UTF-8 line with two bad bytes ...
    assert bad_pair.decode("gb18030")  # ... that GB18030 would read without an error, as mojibake
    assert utf8.decode(bad_pair) is None


def test_line_blocks_decode_as_their_lines_one_by_one():
    """decode_block takes a whole block in one call only where that reads every line as decode() does."""
    lines = [
        "高血压患者应定期监测血压。\n".encode(),
        "高血压患者应定期监测血压。\n".encode("gb18030"),
        "什\n".encode("gb18030"),
        ("中文" * 10 + "\n").encode(),
        b"plain ascii\r\n",
        BINARY_LINE + b"\n",
        ("记录：é糖尿病" * 4 + "\n").encode(),  # long UTF-8 whose GB18030 reading is CJK, not private use
        "末行".encode("gb18030"),
    ]
    for encoding in ("utf-8", "gb18030"):
        decoder = corpora.LineDecoder(encoding)
        for chosen in ([0, 4], [1, 2, 4], [1, 3, 7], [3, 1], [0, 1, 5, 4], [2, 4, 7], [1, 6, 2], list(range(8))):
            block = b"".join(lines[i] for i in chosen)
            expected = [decoder.decode(lines[i]) for i in chosen]
            text, bad = decoder.decode_block(block)
            assert bad == [index for index, line in enumerate(expected) if line is None]
            assert text == "".join(  # an undecodable line's private-use characters (GB18030's reading) marked too
                line if line is not None else corpora.PRIVATE_USE.sub("\ufffd", corpora._with_replacements(lines[i]))
                for i, line in zip(chosen, expected)
            )


def test_mostly_utf8_file_with_gb18030_lines_and_a_big5_file(tmp_path):
    docs = [f"记录{i}：é糖尿病" for i in range(200)]  # short: valid UTF-8 lines that also read as GB18030
    lines = [
        json.dumps({"text": d}, ensure_ascii=False).encode("gb18030" if i % 20 == 0 else "utf-8")
        for i, d in enumerate(docs)
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")  # 5% GB18030 lines
    got, problems = texts("skypile", tmp_path / "mixed.jsonl")
    assert got == docs and not problems.counts
    traditional = ["高血壓患者應定期監測血壓，遵醫囑服藥。", "糖尿病患者需要控制飲食並規律運動。"] * 3
    (tmp_path / "big5.txt").write_bytes("\n\n".join(traditional).encode("big5"))
    got, problems = texts("text", tmp_path / "big5.txt")
    assert got == [] and problems.counts == {corpora.UNDECODABLE: 6}  # not kept as GB18030 mojibake


def test_ceval_row_with_options_beyond_d_is_refused_not_cut_to_four(tmp_path):
    path = tmp_path / "x_val.csv"
    path.write_text(
        "id,question,A,B,C,D,E,F,answer,explanation\n"
        "0,六选一____,一,二,三,四,五,六,B,\n"
        "1,四选一____,一,二,三,四,,,C,\n",
        encoding="utf-8",
    )
    found, problems = questions("ceval", path)
    assert [q["answer"] for q in found] == ["C"] and found[0]["options"] == {"A": "一", "B": "二", "C": "三", "D": "四"}
    assert problems.examples == [f"{path}:2: option columns beyond D (this format has four options, A-D) (E, F)"]


def test_companion_globs_match_as_path_match_does():
    """Files shipped beside a dataset's records (file lists, checksums, images, SLAKE's KG/ folder) are
    recognised by the formats' globs with Path.match's rule: a glob matches the path's last components."""
    globs = tuple(sorted({glob for fmt in corpora.FORMATS.values() for glob in fmt.companions}))
    assert "KG/*" in globs and "*.md5" in globs  # one glob with a folder, others on the name alone
    paths = [
        "KG/en_kg.csv",
        "/data/slake/KG/en_kg.csv",
        "data/KG",
        "/KG",
        "data/KGx/a.csv",
        "oa_file_list.csv",
        "/pmc/oa_file_list.txt",
        "/pmc/PMC001/PMC0012345.xml",
        "/pmc/PMC001/PMC0012345.XML.md5",
        "/pmc/PMC001/figure.JPG",
        "/pmc/PMC001/figure.jpg",
        "train_candidates.txt",
        "/s2orc/LICENSE",
        "/s2orc/LICENSE.txt",
        "/s2orc/xLICENSE",
        "predicate.json",
        "sub/predicate.json",
        "a.filelist.csv",
        "dir.md5/article.xml",
    ]
    for path in paths:
        for glob in globs:
            assert corpora.matches_any(path, (glob,)) == Path(path).match(glob), (path, glob)
        assert corpora.matches_any(path, globs) == any(Path(path).match(glob) for glob in globs), path
