"""data_process.py: cleaning, shards that decode back to the documents, dedup, manifests, determinism,
idempotent re-runs, crash safety, and the errors raised before any work."""

import errno
import gzip
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import atomic
import chatglm_tokenizer
import corpora
import data_process as dp
from corpora import Source

from conftest import ROOT, SAMPLE, SAMPLE_SOURCES, needs_compiler

DOCS = [
    "高血压患者应定期监测血压，遵医嘱服药。",
    "糖尿病需要控制饮食、规律运动，定期复查血糖。",
    "Mixed text: English, digits 0123456789, 3.14%, emoji 😀, tabs\tand  spaces.",
    "感冒后嗓子痛：多喝温水、注意休息。\n\n\n\n必要时在医生指导下用药（如对乙酰氨基酚）。",
]


def write_corpus(path, texts, bad_lines=()):
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    for index, line in bad_lines:
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def many_docs(n, tag=""):
    return [f"{tag}第{i}篇：" + DOCS[i % len(DOCS)] * (1 + i % 5) for i in range(n)]


def random_docs(n, seed=0):
    """Documents unlike each other (MinHash keeps them all): random runs of the characters in DOCS."""
    rng = np.random.default_rng(seed)
    chars = np.array(sorted(set("".join(DOCS)) - set("\n\t")))
    return ["".join(rng.choice(chars, rng.integers(20, 200))).strip() + "。" for _ in range(n)]


def cleaned(texts):
    return [dp.clean_text(t) for t in texts]


def process(sources, out, tokenizer, **settings):
    return dp.process_sources(sources, out, tokenizer.vocab_file, **settings)


def shard_tokens(folder, manifest):
    return np.concatenate([np.fromfile(folder / s["file"], np.uint16) for s in manifest["shards"]])


def decoded_documents(folder, manifest, tokenizer):
    tokens = shard_tokens(folder, manifest)
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def test_clean_text_normalises_whitespace_and_controls_but_not_chinese_punctuation():
    raw = (
        "  第一行\x00内容\u3000，标点！（注）  \r\n\r\n\r\n\n"
        "第二行\t制表\u200b  多   空格 \x1b \r第三行\u2028第四行\n\n"
    )
    assert dp.clean_text(raw) == "第一行内容\u3000，标点！（注）\n\n第二行\t制表 多 空格\n第三行\n第四行"
    assert dp.clean_text(" \n\x07\n ") == ""


def reference_clean_text(text):
    """CLEANING, rule by rule, with no shortcut: what clean_text must return for any text."""
    import re

    text = re.sub(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]", "\n", text)
    text = re.sub(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff\u200b]", "", text)
    text = re.sub(r"[ \u00a0\u2000-\u200a\u202f\u205f]+", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def test_clean_text_agrees_with_the_rules_on_random_texts():
    rng = np.random.default_rng(0)
    whitespace = [chr(c) for c in range(0x110000) if chr(c).isspace()]  # every character str.strip removes
    alphabet = np.array(whitespace + list("\x00\x07\x1b\x7f\x9f\ufeff\u200b") + list("血压，。ab1") * 4)
    for _ in range(20000):
        text = "".join(rng.choice(alphabet, rng.integers(0, 12)))
        assert dp.clean_text(text) == reference_clean_text(text), repr(text)


def test_shards_decode_back_to_the_cleaned_documents(tmp_path, tokenizer):
    texts = DOCS + ["短", "  \x00 "] + many_docs(30)
    source = Source("medical_pretrain", "medical_pretrain", [write_corpus(tmp_path / "m.json", texts)])
    manifest = process([source], tmp_path / "out", tokenizer)[0]
    folder = tmp_path / "out" / "medical_pretrain"
    cleaned = [dp.clean_text(t) for t in texts]
    kept = [t for t in cleaned if len(t) >= dp.MIN_CHARS]
    assert decoded_documents(folder, manifest, tokenizer) == kept

    tokens = shard_tokens(folder, manifest)
    assert tokens.dtype == np.uint16 and tokens[-1] == tokenizer.eos_id
    assert (tokens == tokenizer.eos_id).sum() == manifest["documents_kept"] == len(kept)
    assert manifest["tokens"] == len(tokens) == sum(s["tokens"] for s in manifest["shards"])
    assert manifest["documents_read"] == len(texts)
    assert manifest["skipped"] == {"shorter than --min-chars after cleaning": 1, "empty after cleaning": 1}
    assert (manifest["dtype"], manifest["eos_id"], manifest["vocab_size"]) == (
        "uint16",
        tokenizer.eos_id,
        tokenizer.vocab_size,
    )
    assert manifest["tokenizer"]["sha256"] == tokenizer.fingerprint
    stat = source.files[0].stat()
    digest = hashlib.sha256(f"{source.files[0]}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()).hexdigest()
    assert manifest["inputs"] == {"files": 1, "bytes": stat.st_size, "sha256": digest}


def test_bad_records_are_counted_in_the_manifest_with_file_and_line(tmp_path, tokenizer):
    path = write_corpus(tmp_path / "s.jsonl", many_docs(5), bad_lines=[(2, '{"text": "cut'), (4, '{"txt": "x"}')])
    manifest = process([Source("skypile", "skypile", [path])], tmp_path / "out", tokenizer)[0]
    assert manifest["documents_kept"] == 5
    assert manifest["skipped"] == {"malformed JSON line": 1, "missing field 'text'": 1}
    assert f"{path}:3: malformed JSON line" in " ".join(manifest["skipped_examples"])
    assert any(e.startswith(f"{path}:5: missing field 'text'") for e in manifest["skipped_examples"])


def test_a_lone_surrogate_in_one_record_does_not_stop_the_run(tmp_path, tokenizer):
    path = write_corpus(
        tmp_path / "s.jsonl", many_docs(4), bad_lines=[(1, '{"text": "截断的表情 \\ud83d 之后的正文"}')]
    )
    manifest = process([Source("skypile", "skypile", [path])], tmp_path / "out", tokenizer)[0]
    assert manifest["documents_kept"] == 4
    assert manifest["skipped"] == {corpora.LONE_SURROGATE: 1}
    assert manifest["skipped_examples"][0].startswith(f"{path}:2: lone surrogate")


def test_exact_duplicates_are_dropped_across_the_sources_of_a_run(tmp_path, tokenizer):
    first = write_corpus(tmp_path / "a.jsonl", [DOCS[0], DOCS[1], DOCS[0]])
    second = write_corpus(tmp_path / "b.jsonl", [DOCS[2], "  " + DOCS[1] + "   \n\n", DOCS[3]])
    a, b = process([Source("a", "skypile", [first]), Source("b", "skypile", [second])], tmp_path / "out", tokenizer)
    assert a["documents_kept"] == 2 and a["skipped"] == {"exact duplicate of an earlier document": 1}
    assert b["documents_kept"] == 2 and b["skipped"] == {"exact duplicate of an earlier document": 1}
    assert decoded_documents(tmp_path / "out" / "b", b, tokenizer) == cleaned(DOCS[2:])
    assert b["dedup_against"] == [{"name": "a", "dedup_sha256": a["dedup_sha256"]}]


def test_minhash_drops_near_duplicates_only(tmp_path, tokenizer):
    long = "".join(many_docs(8))
    near = long[:200] + "改" + long[201:]
    path = write_corpus(tmp_path / "n.jsonl", [long, near, DOCS[1] * 3])
    plain = process([Source("n", "skypile", [path])], tmp_path / "plain", tokenizer)[0]
    assert plain["documents_kept"] == 3
    fuzzy = process([Source("n", "skypile", [path])], tmp_path / "fuzzy", tokenizer, minhash=True)[0]
    assert fuzzy["documents_kept"] == 2
    assert fuzzy["skipped"] == {"near duplicate (MinHash) of an earlier document": 1}
    assert decoded_documents(tmp_path / "fuzzy" / "n", fuzzy, tokenizer) == cleaned([long, DOCS[1] * 3])


def write_dialogue_csv(path, docs, stray_quote_at):
    """Toyhom layout in GB18030: quoted multi-line asks, and one title with a quote inside an unquoted field,
    which csv reads as a character but which fools the split's quote count (later cuts land inside rows)."""
    rows = ["department,title,ask,answer"]
    for i, doc in enumerate(docs):
        title = f"标题{i}5'11\"" if i == stray_quote_at else f"标题{i}"
        rows.append(f'内科,{title},"{doc[:20]}\n{doc[20:]}",回答{i}')
    path.write_bytes(("\n".join(rows) + "\n").encode("gb18030"))
    return path


def test_output_is_the_same_bytes_for_any_workers_and_unit_size(tmp_path, tokenizer):
    path = write_corpus(tmp_path / "big.jsonl", random_docs(400) + random_docs(50), bad_lines=[(100, "{oops")])
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(random_docs(120, seed=1)), encoding="utf-8")
    dialogues = write_dialogue_csv(tmp_path / "dialogue.csv", random_docs(200, seed=2), stray_quote_at=120)
    folder = tmp_path / "many"  # small files, grouped into units, around one that is cut into spans
    folder.mkdir()
    small = random_docs(120, seed=3)
    small[16], small[38] = "短", small[10]  # file 5: too short; file 12: a copy of file 3's
    for i in range(40):
        write_corpus(folder / f"part_{i:02d}.jsonl", small[3 * i : 3 * i + 3])
    write_corpus(folder / "part_20_big.jsonl", random_docs(100, seed=4))
    items = [json.dumps({"completion": doc, "source": "wiki"}, ensure_ascii=False) for doc in random_docs(200, seed=5)]
    items[150] = '{"completion": 断}'  # malformed: the whole file's reading stops here, and so do the units'
    array = tmp_path / "wiki.json"
    array.write_text("[" + ",\n".join(items) + "]", encoding="utf-8")
    medline = tmp_path / "pubmed24n0001.xml.gz"  # cut into as many spans as workers, each decompressing from the start
    articles = "".join(
        f"<PubmedArticle><MedlineCitation><PMID>{n}</PMID><Article><ArticleTitle>{doc}</ArticleTitle><Abstract>"
        f"<AbstractText>{doc[::-1]}</AbstractText></Abstract></Article></MedlineCitation></PubmedArticle>\n"
        for n, doc in enumerate(random_docs(200, seed=6))
    )
    medline.write_bytes(gzip.compress(f"<PubmedArticleSet>\n{articles}</PubmedArticleSet>\n".encode()))
    sources = [
        Source("big", "skypile", [path]),
        Source("notes", "text", [text]),
        Source("dialogue", "medical_dialogue", [dialogues]),
        corpora.parse_source(f"skypile_many={folder}"),
        Source("wiki", "wiki", [array]),
        Source("medline", "pubmed", [medline]),
    ]
    units = corpora.split_source(sources[2], 2000)
    for unit, span in units:  # the CSV is cut into pieces, one of which reads on to the end of the file
        list(corpora.iter_texts(unit, corpora.Problems(), span))
    assert len(units) > 5 and any(span.read_to_end for _, span in units[:-1])
    runs = {}
    for name, workers, unit_bytes in [("one", 1, 1 << 30), ("two", 2, 2000)]:
        manifests = process(
            sources, tmp_path / name, tokenizer, workers=workers, unit_bytes=unit_bytes, shard_tokens=3000, minhash=True
        )
        runs[name] = manifests
    assert len(corpora.split_source(sources[0], 2000)) > 20 and len(corpora.split_source(sources[1], 2000)) > 5
    for source, one, two in zip(sources, runs["one"], runs["two"]):
        assert len(one["shards"]) > 1
        assert one["shards"] == two["shards"] and one["skipped"] == two["skipped"]
        assert one["skipped_examples"] == two["skipped_examples"]
        for shard in one["shards"]:
            assert (tmp_path / "one" / source.name / shard["file"]).read_bytes() == (
                tmp_path / "two" / source.name / shard["file"]
            ).read_bytes()
    assert runs["one"][0]["skipped"] == {"exact duplicate of an earlier document": 50, "malformed JSON line": 1}
    assert runs["one"][1]["documents_kept"] == 120
    assert runs["one"][2]["documents_kept"] == 200 and not runs["one"][2]["skipped"]
    assert len(corpora.split_source(sources[4], 2000)) > 5
    assert runs["one"][4]["documents_kept"] == 150
    assert len(corpora.split_source(sources[5], 2000, gzip_spans=2)) == 2 and runs["one"][5]["documents_kept"] == 200
    assert runs["one"][4]["skipped"] == {"JSON array cut short or malformed, rest of file skipped": 1}
    units = corpora.split_source(sources[3], 2000)
    grouped = [piece.files for piece, span in units if span is None]
    assert len(grouped) < 25 and sum(map(len, grouped)) == 40 and len(units) - len(grouped) > 3  # 40 grouped, 1 cut
    assert runs["two"][3]["skipped_examples"] == [  # each named by its file, however the files were grouped
        f"{folder / 'part_12.jsonl'}: exact duplicate of an earlier document",
        f"{folder / 'part_05.jsonl'}: shorter than --min-chars after cleaning",
    ]


@needs_compiler
def test_shards_are_the_same_bytes_with_sentencepiece_encoding(tmp_path, tokenizer, monkeypatch, capsys):
    texts = random_docs(300) + ["  spaces, English words, 数字 0123 and emoji 😀  "] * 2 + many_docs(20)
    sources = [
        Source("c", "skypile", [write_corpus(tmp_path / "c.jsonl", texts)]),
        Source("d", "medical_dialogue", [write_dialogue_csv(tmp_path / "d.csv", random_docs(50, seed=5), None)]),
    ]
    fast = process(sources, tmp_path / "fast", tokenizer, workers=2, unit_bytes=4000)
    assert "encoding with fast_bpe" in capsys.readouterr().out

    def no_fast_encoder(encoder):
        encoder.fast, encoder.fast_unavailable = None, "switched off by the test"

    monkeypatch.setattr(chatglm_tokenizer.fast_bpe, "attach", no_fast_encoder)
    slow = process(sources, tmp_path / "slow", tokenizer, workers=2, unit_bytes=4000)
    assert "encoding with SentencePiece (switched off by the test)" in capsys.readouterr().out
    for source, a, b in zip(sources, fast, slow):
        assert a["tokens"] == b["tokens"] > 1000 and a["shards"] == b["shards"]
        assert (
            shard_tokens(tmp_path / "fast" / source.name, a).tobytes()
            == shard_tokens(tmp_path / "slow" / source.name, b).tobytes()
        )


def test_spawned_workers_load_their_own_encoder(tmp_path, tokenizer):
    """Forked workers (Linux) start with the parent's encoder; spawned ones (macOS, Windows) load theirs.
    The output is the same bytes either way."""
    path = write_corpus(tmp_path / "c.jsonl", random_docs(300))
    for method in ("fork", "spawn"):
        code = (
            f"import multiprocessing, sys; multiprocessing.set_start_method({method!r}); "
            "import data_process; data_process.main(sys.argv[1:])"
        )
        command = [
            "--source",
            f"skypile_c={path}",
            "--out",
            str(tmp_path / method),
            "--tokenizer",
            str(tokenizer.vocab_file),
        ]
        command += ["--workers", "2", "--unit-mb", "0.002"]
        subprocess.run([sys.executable, "-c", code, *command], cwd=ROOT, check=True, capture_output=True)
    fork, spawn = (
        json.loads((tmp_path / method / "skypile_c" / "manifest.json").read_text()) for method in ("fork", "spawn")
    )
    assert fork["documents_kept"] == spawn["documents_kept"] == 300 and fork["shards"] == spawn["shards"]
    assert (
        shard_tokens(tmp_path / "fork" / "skypile_c", fork).tobytes()
        == shard_tokens(tmp_path / "spawn" / "skypile_c", spawn).tobytes()
    )


def test_shards_hold_whole_documents_and_sort_in_order(tmp_path, tokenizer):
    source = Source("s", "skypile", [write_corpus(tmp_path / "s.jsonl", many_docs(60))])
    manifest = process([source], tmp_path / "out", tokenizer, shard_tokens=500)[0]
    names = [s["file"] for s in manifest["shards"]]
    assert len(names) > 3 and names == sorted(names) and names[0] == "s_0000.bin"
    assert sorted(p.name for p in (tmp_path / "out" / "s").glob("*.bin")) == names
    for shard in manifest["shards"]:
        tokens = np.fromfile(tmp_path / "out" / "s" / shard["file"], np.uint16)
        assert tokens[-1] == tokenizer.eos_id and (tokens == tokenizer.eos_id).sum() == shard["documents"]
        assert len(tokens) == shard["tokens"]
    assert all(s["tokens"] >= 500 for s in manifest["shards"][:-1])
    assert decoded_documents(tmp_path / "out" / "s", manifest, tokenizer) == cleaned(many_docs(60))


def test_rerun_skips_up_to_date_sources_and_redoes_changed_ones(tmp_path, tokenizer, capsys):
    path = write_corpus(tmp_path / "s.jsonl", many_docs(20))
    source = Source("s", "skypile", [path])
    first = process([source], tmp_path / "out", tokenizer)[0]
    shard = tmp_path / "out" / "s" / "s_0000.bin"
    stamp = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert process([source], tmp_path / "out", tokenizer)[0] == first
    assert "s: up to date, skipped" in capsys.readouterr().out and shard.stat().st_mtime_ns == stamp

    assert process([source], tmp_path / "out", tokenizer, min_chars=5)[0]["settings"]["min_chars"] == 5
    assert shard.stat().st_mtime_ns != stamp
    write_corpus(path, many_docs(21))
    assert process([source], tmp_path / "out", tokenizer, min_chars=5)[0]["documents_kept"] == 21
    stamp = shard.stat().st_mtime_ns
    process([source], tmp_path / "out", tokenizer, min_chars=5, force=True)
    assert shard.stat().st_mtime_ns != stamp
    shard.unlink()  # a missing shard is not up to date either
    assert process([source], tmp_path / "out", tokenizer, min_chars=5)[0]["documents_kept"] == 21
    assert shard.is_file()


def test_rerun_sees_any_change_to_a_folder_of_files(tmp_path, tokenizer, capsys):
    """The manifest keeps one digest of the files, not their list: a file touched (same size), added,
    removed or renamed still makes the source redone."""
    folder = tmp_path / "articles"
    folder.mkdir()
    for i in range(3):
        write_corpus(folder / f"a{i}.jsonl", many_docs(4, f"第{i}篇"))

    def run():
        capsys.readouterr()
        manifest = process([corpora.parse_source(f"s={folder}", "skypile")], tmp_path / "out", tokenizer)[0]
        return manifest, "up to date" in capsys.readouterr().out

    first, skipped = run()
    assert first["inputs"]["files"] == 3 and not skipped
    assert first["inputs"]["bytes"] == sum(path.stat().st_size for path in folder.iterdir())
    assert run() == (first, True)
    manifest_file = tmp_path / "out" / "s" / "manifest.json"
    listed = [  # a manifest of the earlier layout, which listed every input file, is still up to date
        {"path": str(path), "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
        for path in sorted(folder.iterdir())
    ]
    manifest_file.write_text(json.dumps({**first, "inputs": listed}), encoding="utf-8")
    assert run() == ({**first, "inputs": listed}, True)
    listed[0]["mtime_ns"] += 1
    manifest_file.write_text(json.dumps({**first, "inputs": listed}), encoding="utf-8")
    assert run() == (first, False)
    changes = [
        lambda: os.utime(folder / "a1.jsonl", ns=(1, 1)),
        lambda: write_corpus(folder / "a3.jsonl", many_docs(2, "新")),
        lambda: (folder / "a3.jsonl").rename(folder / "a4.jsonl"),
        lambda: (folder / "a4.jsonl").unlink(),
    ]
    seen = [first["inputs"]["sha256"]]
    for change in changes:
        change()
        manifest, skipped = run()
        assert not skipped and manifest["inputs"]["sha256"] != seen[-1]
        seen.append(manifest["inputs"]["sha256"])
        assert run() == (manifest, True)
    assert len(set(seen)) == 4 and seen[-1] == seen[1]  # the files of the first change again: the same digest


def test_files_under_out_are_left_out_however_they_are_reached(tmp_path):
    """A source's folder may link to a folder inside --out or to one of its files (--out inside the
    folder itself: test_one_run_at_a_time_...): neither is input. Files beside them, and links to
    files elsewhere, are."""
    out, corpus, elsewhere = tmp_path / "out", tmp_path / "corpus", tmp_path / "elsewhere"
    for folder in (out / "s", corpus, elsewhere):
        folder.mkdir(parents=True)
    for path in (out / "s" / "manifest.json", corpus / "a.jsonl", elsewhere / "b.jsonl"):
        path.write_text("{}\n")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "to_out").symlink_to(out / "s")
    (corpus / "sub" / "to_file").symlink_to(out / "s" / "manifest.json")
    (corpus / "sub" / "to_b").symlink_to(elsewhere / "b.jsonl")
    files = corpora.parse_source(f"s={corpus}", "skypile").files
    assert [path.relative_to(corpus) for path in files] == [
        Path(name) for name in ("a.jsonl", "sub/to_b", "sub/to_file", "sub/to_out/manifest.json")
    ]
    kept = dp.files_outside(files, out.resolve())
    assert kept == [corpus / "a.jsonl", corpus / "sub" / "to_b"]


def test_an_up_to_date_source_still_deduplicates_the_next_one(tmp_path, tokenizer):
    a = Source("a", "skypile", [write_corpus(tmp_path / "a.jsonl", many_docs(10))])
    b_path = write_corpus(tmp_path / "b.jsonl", many_docs(4) + many_docs(3, "新"))
    b = Source("b", "skypile", [b_path])
    assert process([a, b], tmp_path / "out", tokenizer)[1]["documents_kept"] == 3
    write_corpus(b_path, many_docs(4) + many_docs(5, "新"))
    again = process([a, b], tmp_path / "out", tokenizer)[1]
    assert again["documents_kept"] == 5 and again["skipped"] == {"exact duplicate of an earlier document": 4}
    alone = process([b], tmp_path / "out", tokenizer)[0]  # without a in the run, b is redone without a
    assert alone["documents_kept"] == 9 and alone["dedup_against"] == []


def test_a_failed_run_leaves_the_earlier_output_intact(tmp_path, tokenizer, monkeypatch):
    path = write_corpus(tmp_path / "s.jsonl", many_docs(200))
    source = Source("s", "skypile", [path])
    process([source], tmp_path / "out", tokenizer, shard_tokens=2000)
    folder = tmp_path / "out" / "s"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    write_corpus(path, many_docs(300))
    real_copy, calls = dp.copy_unit, []

    def copy_then_fail(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_copy(*args)

    monkeypatch.setattr(dp, "copy_unit", copy_then_fail)
    with pytest.raises(OSError, match="simulated"):
        process([source], tmp_path / "out", tokenizer, shard_tokens=2000, unit_bytes=3000)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no *.tmp, no parts, old files

    monkeypatch.setattr(dp, "copy_unit", real_copy)
    manifest = process([source], tmp_path / "out", tokenizer, shard_tokens=2000)[0]
    assert manifest["documents_kept"] == 300
    assert sorted(p.name for p in folder.glob("*.bin")) == [s["file"] for s in manifest["shards"]]


@pytest.mark.parametrize("killed_at", ["the commit", "a rename after it"])
def test_a_run_killed_while_installing_leaves_the_old_output_or_the_new(tmp_path, tokenizer, monkeypatch, killed_at):
    path = write_corpus(tmp_path / "s.jsonl", many_docs(200))
    source = Source("s", "skypile", [path])
    folder = tmp_path / "out" / "s"
    old = process([source], tmp_path / "out", tokenizer, shard_tokens=2000)[0]
    write_corpus(path, many_docs(120, "新"))
    real_finish, real_replace = dp.finish_install, os.replace
    if killed_at == "the commit":  # killed just after manifest.json.new landed: nothing old is touched yet
        finishes = []
        monkeypatch.setattr(
            dp, "finish_install", lambda f: real_finish(f) if finishes.append(1) or len(finishes) == 1 else exit(9)
        )
    else:  # killed between two renames of the new shards: no manifest.json until the next run
        renames = []

        def replace_then_die(src, dst):
            renames.append(1)
            if len(renames) == 3:
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(dp.os, "replace", replace_then_die)
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        process([source], tmp_path / "out", tokenizer, shard_tokens=2000)
    monkeypatch.setattr(dp, "finish_install", real_finish)
    monkeypatch.setattr(dp.os, "replace", real_replace)
    if killed_at == "the commit":
        assert decoded_documents(folder, dp.read_manifest(folder), tokenizer) == cleaned(many_docs(200))
    else:
        assert not (folder / "manifest.json").exists()  # unfinished: readers refuse it rather than mix two outputs
    new = process([source], tmp_path / "out", tokenizer, shard_tokens=2000)[0]  # finishes the install, then: up to date
    assert new["inputs"] != old["inputs"] and new == dp.read_manifest(folder)
    assert decoded_documents(folder, new, tokenizer) == cleaned(many_docs(120, "新"))
    expected = sorted([s["file"] for s in new["shards"]] + list(new["dedup_files"]) + ["manifest.json"])
    assert sorted(p.name for p in folder.iterdir()) == expected


def test_one_run_at_a_time_writes_an_out_folder_and_its_own_output_is_never_input(tmp_path, tokenizer):
    import fcntl

    out = tmp_path / "corpus" / "out"  # inside the input folder
    out.mkdir(parents=True)
    write_corpus(tmp_path / "corpus" / "s.jsonl", many_docs(20))
    stale = out / ".minhash-abc.tmp"  # a killed --minhash run's band keys
    stale.mkdir(parents=True)
    (stale / "part_00.u64").write_bytes(b"\0" * 64)
    source = corpora.parse_source(f"s={tmp_path / 'corpus'}", "skypile")
    with open(out / dp.OUT_LOCK, "a+") as other:  # another run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="is being written by another data_process run"):
            process([source], out, tokenizer)
    assert stale.is_dir() and not (out / "s").exists()
    first = process([source], out, tokenizer)[0]
    assert not stale.exists()
    again = corpora.parse_source(f"s={tmp_path / 'corpus'}", "skypile")  # now lists the shards and manifest too
    assert len(again.files) > 2
    second = process([again], out, tokenizer)[0]
    assert second == first  # up to date: its own output is not an input
    assert first["documents_kept"] == 20 and first["inputs"]["files"] == 1


def test_leftovers_of_a_killed_run_are_never_read_and_are_cleared(tmp_path, tokenizer):
    folder = tmp_path / "out" / "s"
    (folder / "parts.tmp").mkdir(parents=True)
    (folder / "parts.tmp" / "unit_000000.bin").write_bytes(b"\x01\x00" * 10)
    (folder / "s_0000.bin.tmp").write_bytes(b"\x05\x00" * 10)
    (folder / "s_0007.bin").write_bytes(b"\x05\x00" * 10)  # a stale shard of an older, larger run
    source = Source("s", "skypile", [write_corpus(tmp_path / "s.jsonl", many_docs(5))])
    manifest = process([source], tmp_path / "out", tokenizer)[0]
    assert sorted(p.name for p in folder.iterdir()) == ["dedup_hashes.u64", "manifest.json", "s_0000.bin"]
    assert decoded_documents(folder, manifest, tokenizer) == cleaned(many_docs(5))


def test_seen_hashes_agrees_with_a_set():
    seen, reference = dp.SeenHashes(), set()
    rng = np.random.default_rng(0)
    for _ in range(40):
        batch = rng.integers(0, 3000, rng.integers(0, 200), dtype=np.uint64)
        expected = []
        for value in batch.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert seen.add(batch).tolist() == expected
    assert sum(len(run) for run in seen.runs) == len(reference) and len(seen.runs) < 12


# ---------------------------------------------------------------- the command line


def cli(tmp_path, *args):
    return dp.main(["--out", str(tmp_path / "out"), *args])


def test_errors_come_before_any_work(tmp_path, tokenizer, monkeypatch):
    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(3))
    tok = ["--tokenizer", tokenizer.vocab_file]
    cases = [
        (["--source", f"mystery={corpus}", *tok], "cannot tell the format"),
        (["--source", f"s={corpus}", "--format", "nope", *tok], "unknown format 'nope'"),
        (["--source", f"skypile={tmp_path / 'missing.jsonl'}", *tok], "does not exist"),
        (["--source", f"ceval={corpus}", *tok], "not pretraining text"),
        (["--source", f"skypile={corpus}", "--tokenizer", str(tmp_path / "no_tokenizer")], "no tokenizer model at"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli(tmp_path, *args)
        assert message in str(exit_info.value)
    huge = types.SimpleNamespace(vocab_size=70000, eos_id=2, fingerprint="0" * 64)
    monkeypatch.setattr(dp, "load_encoder", lambda path: huge)
    with pytest.raises(SystemExit, match="do not fit uint16"):
        cli(tmp_path, "--source", f"skypile={corpus}", *tok)
    assert not (tmp_path / "out").exists()


def test_a_source_that_yields_nothing_is_an_error_after_the_others_are_done(tmp_path, tokenizer, capsys):
    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(3))
    cloned = tmp_path / "cMedQA2"  # as cloned: only the zips
    cloned.mkdir()
    (cloned / "question.zip").write_bytes(b"PK\x03\x04zip")
    (cloned / "answer.zip").write_bytes(b"PK\x03\x04zip")
    rejected = write_corpus(tmp_path / "r.jsonl", ["短"] * 5)  # every document under --min-chars
    with pytest.raises(SystemExit) as exit_info:
        cli(
            tmp_path,
            "--source",
            f"wiki={tmp_path}/nothing/*.json",
            "--source",
            f"cmedqa2={cloned}",
            "--source",
            f"skypile={corpus}",
            "--source",
            f"c4_zh={rejected}",
            "--tokenizer",
            tokenizer.vocab_file,
            "--workers",
            "1",
        )
    message = str(exit_info.value)
    assert message.startswith("data_process: 3 of 4 source(s) yielded no document")
    assert f"'wiki': nothing matches '{tmp_path}/nothing/*.json'" in message
    assert "'cmedqa2' yielded no document (0 read from 2 file(s)" in message and "question.csv" in message
    assert "file of a kind this format does not read': 2" in message  # counted once per file
    assert "'c4_zh' yielded no document (5 read" in message and "shorter than --min-chars" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [dp.OUT_LOCK, "c4_zh", "cmedqa2", "skypile"]
    for name in ("c4_zh", "cmedqa2"):  # no output, so a re-run does not take them for done
        assert list((tmp_path / "out" / name).iterdir()) == []
    manifest = json.loads((tmp_path / "out" / "skypile" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["documents_kept"] == 3 and not (tmp_path / "out" / "wiki").exists()
    assert os.path.getsize(tmp_path / "out" / "skypile" / "skypile_0000.bin") == 2 * manifest["tokens"]


PRETRAIN_SAMPLES = SAMPLE_SOURCES["pretrain"]


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="data/sample/ not present")
def test_every_sample_corpus_round_trips_through_the_shards(tmp_path, tokenizer):
    sources = [corpora.parse_source(f"{name}={SAMPLE / name}") for name in PRETRAIN_SAMPLES]
    manifests = process(sources, tmp_path / "out", tokenizer, workers=2)
    seen = set()
    for source, manifest in zip(sources, manifests):
        documents = [dp.clean_text(t) for t in corpora.iter_texts(source, corpora.Problems())]
        expected = []
        for doc in documents:
            if len(doc) >= dp.MIN_CHARS and doc not in seen:
                seen.add(doc)
                expected.append(doc)
        assert manifest["documents_read"] == len(documents) and manifest["documents_kept"] == len(expected) > 0
        assert decoded_documents(tmp_path / "out" / source.name, manifest, tokenizer) == expected
    assert manifests[PRETRAIN_SAMPLES.index("cmedqa2")]["skipped"]["answer to an unknown question_id"] == 1
    dialogue = decoded_documents(
        tmp_path / "out" / "medical_dialogue", manifests[PRETRAIN_SAMPLES.index("medical_dialogue")], tokenizer
    )
    assert all("\ufffd" not in doc for doc in dialogue)  # GB18030 decoded, not replaced


def test_minhash_on_disk_partitions_decides_like_one_set_in_memory(tmp_path, tokenizer, monkeypatch):
    """Near duplicates within and across sources, and again when the first source is up to date and its
    logged band keys are read back, match a plain Python set of every earlier document's band keys."""
    monkeypatch.setattr(dp, "MINHASH_PARTITION_BITS", 2)  # 4 partitions: keys of one document spread over them
    monkeypatch.setattr(dp, "MINHASH_PARTITIONS", 4)
    bases = random_docs(30, seed=3)
    edited = [text[:10] + "改" + text[11:] for text in bases]  # one character changed: Jaccard ~0.9
    first = write_corpus(tmp_path / "a.jsonl", bases[:20] + edited[:5])
    second = write_corpus(tmp_path / "b.jsonl", edited[5:25] + bases[20:] + random_docs(10, seed=4))

    seen, expected = set(), {}
    for name, texts in (("a", bases[:20] + edited[:5]), ("b", edited[5:25] + bases[20:] + random_docs(10, seed=4))):
        expected[name] = []
        for text in cleaned(texts):
            keys = set(dp.minhash_bands(text).tolist())
            if not keys & seen:
                expected[name].append(text)
            seen |= keys
    assert 0 < len(expected["b"]) < 40 and len(expected["a"]) < 25  # there are near duplicates to find

    sources = [Source("a", "skypile", [first]), Source("b", "skypile", [second])]
    manifests = process(sources, tmp_path / "out", tokenizer, minhash=True, workers=2, unit_bytes=2000)
    for source, manifest in zip(sources, manifests):
        assert decoded_documents(tmp_path / "out" / source.name, manifest, tokenizer) == expected[source.name]
    assert not list((tmp_path / "out").glob(".minhash-*"))  # the run's band keys are gone with the run

    os.utime(second, ns=(1, 1))  # b must be redone; a is up to date and only its logged band keys are read
    again = process(sources, tmp_path / "out", tokenizer, minhash=True)
    assert again[0] == manifests[0]
    assert decoded_documents(tmp_path / "out" / "b", again[1], tokenizer) == expected["b"]


# ---------------------------------------------------------------- bad input never becomes wrong results


def test_manifest_records_the_largest_token_id_per_shard_and_overall(tmp_path, tokenizer):
    source = Source("s", "skypile", [write_corpus(tmp_path / "s.jsonl", many_docs(60) + ["Ω∑≈ 罕见字：龘靐齉"])])
    manifest = process([source], tmp_path / "out", tokenizer, shard_tokens=500)[0]
    shard_max = [int(np.fromfile(tmp_path / "out" / "s" / s["file"], np.uint16).max()) for s in manifest["shards"]]
    assert len(shard_max) > 3 and len(set(shard_max)) > 1
    assert [s["max_token_id"] for s in manifest["shards"]] == shard_max
    assert manifest["max_token_id"] == max(shard_max) and manifest["vocab_size"] == tokenizer.vocab_size
    on_disk = json.loads((tmp_path / "out" / "s" / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk["max_token_id"] == max(shard_max)
    del on_disk["max_token_id"]  # a manifest of an earlier version: redone, so that it gets the field
    (tmp_path / "out" / "s" / "manifest.json").write_text(json.dumps(on_disk), encoding="utf-8")
    assert process([source], tmp_path / "out", tokenizer, shard_tokens=500)[0]["max_token_id"] == max(shard_max)


@pytest.mark.parametrize("corrupt", [b'{"name": "s", "tok', b"\xff\xfe\x00garbage", b"[]", b"5", b"null"])
def test_a_corrupt_manifest_means_redo_with_a_note(tmp_path, tokenizer, capsys, corrupt):
    source = Source("s", "skypile", [write_corpus(tmp_path / "s.jsonl", many_docs(20))])
    first = process([source], tmp_path / "out", tokenizer)[0]
    (tmp_path / "out" / "s" / "manifest.json").write_bytes(corrupt)
    capsys.readouterr()
    again = process([source], tmp_path / "out", tokenizer)[0]
    out = capsys.readouterr().out
    assert again["shards"] == first["shards"] and "up to date" not in out
    if corrupt[:1] not in b"[5n":  # not JSON at all: the note names the file
        assert f"note: {tmp_path / 'out' / 's' / 'manifest.json'} is unreadable" in out
    assert json.loads((tmp_path / "out" / "s" / "manifest.json").read_text(encoding="utf-8")) == again


def test_a_source_named_dot_dot_never_deletes_outside_its_folder(tmp_path, tokenizer):
    out = tmp_path / "data" / "out"
    out.mkdir(parents=True)
    keep = [tmp_path / "data" / "precious.bin", tmp_path / "data" / "notes.tmp", out / "other.bin"]
    for path in keep:
        path.write_bytes(b"mine")
    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(5))
    for name in ("..", ".", ".hidden", "a/.."):
        with pytest.raises(SystemExit, match="plain name"):
            dp.main(
                [
                    "--out",
                    str(out),
                    "--source",
                    f"{name}={corpus}",
                    "--format",
                    "skypile",
                    "--tokenizer",
                    tokenizer.vocab_file,
                ]
            )
        with pytest.raises(ValueError, match="not a plain folder name"):
            process([Source(name, "skypile", [corpus])], out, tokenizer)
    twice = [Source(name, "skypile", [corpus]) for name in ("a", "b", "a")]  # one output folder for two sources
    with pytest.raises(ValueError, match="source name 'a' given twice"):
        process(twice, out, tokenizer)
    assert not (out / "a").exists()
    assert all(path.read_bytes() == b"mine" for path in keep)
    (out / "s").symlink_to(tmp_path / "data")  # OUT/NAME linking elsewhere: its *.bin are not the run's
    with pytest.raises(SystemExit, match="is a link"):
        dp.main(
            ["--out", str(out), "--source", f"s={corpus}", "--format", "skypile", "--tokenizer", tokenizer.vocab_file]
        )
    assert all(path.read_bytes() == b"mine" for path in keep)
    with pytest.raises(RuntimeError, match="outside"):
        dp.remove_owned(tmp_path / "data" / "precious.bin", out / "t")
    assert keep[0].read_bytes() == b"mine"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shard-tokens", "0"], "--shard-tokens must be >= 1"),
        (["--shard-tokens", "-5"], "--shard-tokens must be >= 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "100000"], "is more than"),
        (["--min-chars", "-1"], "--min-chars must be >= 0"),
        (["--unit-mb", "0"], "--unit-mb must be a positive size"),
        (["--unit-mb", "nan"], "--unit-mb must be a positive size"),
        (["--unit-mb", "inf"], "--unit-mb must be a positive size"),
    ],
)
def test_numeric_arguments_are_checked_before_any_work(tmp_path, tokenizer, capsys, args, message):
    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(3))
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, "--source", f"skypile={corpus}", "--tokenizer", tokenizer.vocab_file, *args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="shard_tokens must be >= 1"):  # the API refuses it as well
        process([Source("s", "skypile", [corpus])], tmp_path / "out", tokenizer, shard_tokens=0)


def test_out_that_is_a_file_or_read_only_is_one_line(tmp_path, tokenizer, monkeypatch):
    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(3))
    (tmp_path / "file").write_text("not a folder")
    for out, message in [
        (tmp_path / "file", "is a file: give a folder"),
        (tmp_path / "file" / "sub", "is a file, not"),
    ]:
        with pytest.raises(SystemExit, match=message):
            dp.main(["--out", str(out), "--source", f"skypile={corpus}", "--tokenizer", tokenizer.vocab_file])
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)  # root ignores chmod: a read-only disk
    with pytest.raises(SystemExit, match="cannot write in .* \\(read-only\\?\\)"):
        dp.main(["--out", str(tmp_path / "ro"), "--source", f"skypile={corpus}", "--tokenizer", tokenizer.vocab_file])


@pytest.mark.parametrize("where", ["shards", "manifest"])
def test_a_full_disk_says_so_and_leaves_no_temporary_files(tmp_path, tokenizer, monkeypatch, where):
    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(200))
    args = [
        "--out",
        str(tmp_path / "out"),
        "--source",
        f"skypile={corpus}",
        "--tokenizer",
        tokenizer.vocab_file,
        "--workers",
        "1",
        "--shard-tokens",
        "2000",
    ]
    dp.main(args)
    folder = tmp_path / "out" / "skypile"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_corpus(corpus, many_docs(300))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def manifest_half_written(path, text):  # the real atomic writer, whose write stops half way on a full disk
        def write(tmp):
            Path(tmp).write_text(text[: len(text) // 2], encoding="utf-8")
            full()

        atomic.atomic_write(path, write)

    if where == "shards":
        monkeypatch.setattr(dp.ShardWriter, "write", full)
    else:
        monkeypatch.setattr(dp, "atomic_write_text", manifest_half_written)
    with pytest.raises(SystemExit) as exit_info:
        dp.main(args)
    message = str(exit_info.value)
    assert message.startswith("data_process: source 'skypile': ") and "No space left on device" in message
    assert "\n" not in message and "temporary files were removed" in message
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    # the earlier output is untouched, the new manifest (the commit) having failed before any old file went
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    dp.main(args)
    assert json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["documents_kept"] == 300


def test_train_tokenizer_command_line_checks(tmp_path, capsys):
    import train_tokenizer

    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(3))
    for args, message in [
        (["--vocab-size", "0"], "--vocab-size must be >= 259"),
        (["--vocab-size", "1"], "--vocab-size must be >= 259"),
        (["--vocab-size", "258"], "--vocab-size must be >= 259"),
        (["--max-lines", "-1"], "--max-lines must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train_tokenizer.main(["--source", f"skypile={corpus}", "--out", str(tmp_path / "tok"), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    for args, message in [
        (["--source", f"skypile={corpus}", "--out", str(tmp_path / "file")], "is a file"),
        (["--source", f"../x={corpus}", "--out", str(tmp_path / "tok")], "plain name"),
        (["--source", f"skypile={tmp_path / 'missing'}", "--out", str(tmp_path / "tok")], "does not exist"),
    ]:
        with pytest.raises(SystemExit, match=message):
            train_tokenizer.main(args)
    assert not (tmp_path / "tok").exists()


def test_files_a_format_does_not_read_are_counted_once_each_with_any_unit_size(tmp_path, tokenizer):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_corpus(folder / "a.jsonl", many_docs(20))
    (folder / "notes.txt").write_text("一段不该读的笔记。\n\n" * 3000, encoding="utf-8")  # ~100 KB of text
    (folder / "table.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    manifest = process(
        [corpora.parse_source(f"skypile={folder}")], tmp_path / "out", tokenizer, workers=2, unit_bytes=4096
    )[0]
    assert manifest["documents_kept"] == 20
    assert manifest["skipped"] == {"file of a kind this format does not read": 2}
