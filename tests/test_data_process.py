"""data_process.py: cleaning, shards that decode back to the documents, dedup, manifests, determinism,
idempotent re-runs, crash safety, and the errors raised before any work."""

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest

import corpora
import data_process as dp
from corpora import Source

DOCS = ["高血压患者应定期监测血压，遵医嘱服药。", "糖尿病需要控制饮食、规律运动，定期复查血糖。",
        "Mixed text: English, digits 0123456789, 3.14%, emoji 😀, tabs\tand  spaces.",
        "感冒后嗓子痛：多喝温水、注意休息。\n\n\n\n必要时在医生指导下用药（如对乙酰氨基酚）。"]


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
    raw = "  第一行\x00内容\u3000，标点！（注）  \r\n\r\n\r\n\n第二行\t制表\u200b  多   空格 \x1b \r第三行\u2028第四行\n\n"
    assert dp.clean_text(raw) == "第一行内容\u3000，标点！（注）\n\n第二行\t制表 多 空格\n第三行\n第四行"
    assert dp.clean_text(" \n\x07\n ") == ""


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
    assert (manifest["dtype"], manifest["eos_id"], manifest["vocab_size"]) == ("uint16", tokenizer.eos_id,
                                                                               tokenizer.vocab_size)
    assert manifest["tokenizer"]["sha256"] == tokenizer.fingerprint
    assert manifest["inputs"] == [{"path": str(source.files[0]), "bytes": source.files[0].stat().st_size,
                                   "mtime_ns": source.files[0].stat().st_mtime_ns}]


def test_bad_records_are_counted_in_the_manifest_with_file_and_line(tmp_path, tokenizer):
    path = write_corpus(tmp_path / "s.jsonl", many_docs(5), bad_lines=[(2, '{"text": "cut'), (4, '{"txt": "x"}')])
    manifest = process([Source("skypile", "skypile", [path])], tmp_path / "out", tokenizer)[0]
    assert manifest["documents_kept"] == 5
    assert manifest["skipped"] == {"malformed JSON line": 1, "missing field 'text'": 1}
    assert f"{path}:3: malformed JSON line" in " ".join(manifest["skipped_examples"])
    assert any(e.startswith(f"{path}:5: missing field 'text'") for e in manifest["skipped_examples"])


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


def test_output_is_the_same_bytes_for_any_workers_and_unit_size(tmp_path, tokenizer):
    path = write_corpus(tmp_path / "big.jsonl", random_docs(400) + random_docs(50), bad_lines=[(100, "{oops")])
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(random_docs(120, seed=1)), encoding="utf-8")
    sources = [Source("big", "skypile", [path]), Source("notes", "text", [text])]
    runs = {}
    for name, workers, unit_bytes in [("one", 1, 1 << 30), ("two", 2, 2000)]:
        manifests = process(sources, tmp_path / name, tokenizer, workers=workers, unit_bytes=unit_bytes,
                            shard_tokens=3000, minhash=True)
        runs[name] = manifests
    assert len(corpora.split_source(sources[0], 2000)) > 20 and len(corpora.split_source(sources[1], 2000)) > 5
    for source, one, two in zip(sources, runs["one"], runs["two"]):
        assert len(one["shards"]) > 1
        assert one["shards"] == two["shards"] and one["skipped"] == two["skipped"]
        assert one["skipped_examples"] == two["skipped_examples"]
        for shard in one["shards"]:
            assert (tmp_path / "one" / source.name / shard["file"]).read_bytes() == \
                   (tmp_path / "two" / source.name / shard["file"]).read_bytes()
    assert runs["one"][0]["skipped"] == {"exact duplicate of an earlier document": 50, "malformed JSON line": 1}
    assert runs["one"][1]["documents_kept"] == 120


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
    cases = [(["--source", f"mystery={corpus}", *tok], "cannot tell the format"),
             (["--source", f"s={corpus}", "--format", "nope", *tok], "unknown format 'nope'"),
             (["--source", f"skypile={tmp_path / 'missing.jsonl'}", *tok], "does not exist"),
             (["--source", f"ceval={corpus}", *tok], "not pretraining text"),
             (["--source", f"skypile={corpus}", "--tokenizer", str(tmp_path / "no_tokenizer")],
              "no tokenizer model at")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli(tmp_path, *args)
        assert message in str(exit_info.value)
    huge = types.SimpleNamespace(vocab_size=70000, eos_id=2, fingerprint="0" * 64)
    monkeypatch.setattr(dp, "load_encoder", lambda path: huge)
    with pytest.raises(SystemExit, match="do not fit uint16"):
        cli(tmp_path, "--source", f"skypile={corpus}", *tok)
    assert not (tmp_path / "out").exists()


def test_an_empty_glob_is_reported_and_the_run_goes_on(tmp_path, tokenizer, capsys):
    corpus = write_corpus(tmp_path / "s.jsonl", many_docs(3))
    cli(tmp_path, "--source", f"wiki={tmp_path}/nothing/*.json", "--source", f"skypile={corpus}",
        "--tokenizer", tokenizer.vocab_file, "--workers", "1")
    out = capsys.readouterr().out
    assert "wiki: nothing matches" in out and "1 source(s) matched no files: wiki" in out
    manifest = json.loads((tmp_path / "out" / "skypile" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["documents_kept"] == 3 and not (tmp_path / "out" / "wiki").exists()
    assert os.path.getsize(tmp_path / "out" / "skypile" / "skypile_0000.bin") == 2 * manifest["tokens"]


SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
PRETRAIN_SAMPLES = ["wiki", "baike", "c4_zh", "wudao", "medical_pretrain", "skypile", "guidelines", "cmekg", "cmedqa2",
                    "chatmed_tcm", "medical_dialogue", "medical_finetune", "text"]


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
    dialogue = decoded_documents(tmp_path / "out" / "medical_dialogue", manifests[PRETRAIN_SAMPLES.index("medical_dialogue")], tokenizer)
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
