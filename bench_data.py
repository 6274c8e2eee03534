"""How fast is data_process.py next to SentencePiece itself, where does its time go, and does its memory
stay flat as the input grows?

    python bench_data.py [--workers 2] [--mb 32] [--join 6] [--layouts skypile,medical_dialogue]
                         [--stages skypile,medical_dialogue,wiki,pubmed] [--minhash] [--tokenizer DIR]

Builds corpora in real dataset layouts from the sample's pretraining text (data/sample/): SkyPile JSON
lines, Toyhom's GB18030 CSV (department,title,ask,answer), a Wikipedia JSON array and MEDLINE XML.gz.
A synthetic document joins JOIN sample documents drawn at random (the sample's are short, ~190
characters; real ones are not, and per-document costs weigh with the number of documents) and starts
with its own line, so dedup keeps them all and MinHash nearly all. Then prints, from one run:
  raw     SentencePiece encode_batch on the 1x documents with 1 thread, and with WORKERS threads: the
          ceiling data_process is measured against (what the machine gives WORKERS threads right now)
  stages  per layout, one process: the share of reading (bytes off disk, gunzip), parsing (JSON/CSV/XML
          container), the reader (record -> text), cleaning + hashing, encoding and writing (ids ->
          uint16 part file), and that pipeline's tokens/s next to encoding alone
  1x/10x  per layout in --layouts, `python data_process.py` end to end as a user runs it (interpreter
          start, imports, workers, shards, manifest: wall clock of the command) with WORKERS workers
          (and --minhash if given): tokens/s, ratio to raw x WORKERS threads, peak RSS of the parent and
          of the largest worker (flat from 1x to 10x = memory does not grow with the input). Linux
          (/proc/self/status).
"""

import argparse
import csv
import gzip
import io
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

import corpora
import data_process
from chatglm_tokenizer import DEFAULT_DIR, load_encoder

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "data" / "sample"
SAMPLE_SOURCES = json.loads((SAMPLE / "sources.json").read_text(encoding="utf-8"))["pretrain"]
# The real ChatGLM2 tokenizer: in the package, or (CI layout) in ../shared beside the checkout.
TOKENIZERS = [DEFAULT_DIR, ROOT.parent / "shared" / "chatglm_tokenizer"]
# data_process run as a user runs it, reporting its own peak RSS and its reaped workers' on the way out.
RUN_WITH_RSS = """import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    parent = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print("RSS", parent, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
"""


def sample_documents() -> list[str]:
    problems = corpora.Problems()
    return [text for name in SAMPLE_SOURCES
            for text in corpora.iter_texts(corpora.parse_source(f"{name}={SAMPLE / name}"), problems)]


def synthetic_documents(documents: list[str], join: int):
    """Documents of `join` sample documents each, drawn at random (seeded) and numbered, so no two are
    equal and few are near duplicates of each other (MinHash keeps them), without end."""
    rng = random.Random(0)
    for number in itertools.count():
        yield f"第{number}份资料\n" + "\n".join(rng.sample(documents, join))


def jsonl_record(text: str, index: int) -> bytes:
    return (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")


def csv_row(text: str, index: int) -> bytes:
    title, _, body = text.partition("\n")
    half = len(body) // 2
    row = io.StringIO()
    csv.writer(row, lineterminator="\n").writerow(["内科", title, body[:half], body[half:]])
    return row.getvalue().encode("gb18030")


def array_item(text: str, index: int) -> bytes:
    item = json.dumps({"completion": text, "source": "wikipedia.zh2307"}, ensure_ascii=False)
    return (",\n" if index else "[").encode() + item.encode("utf-8")


def medline_article(text: str, index: int) -> bytes:
    title, _, abstract = text.partition("\n")
    return (f"<PubmedArticle><MedlineCitation><PMID>{index + 1}</PMID><Article><ArticleTitle>{escape(title)}"
            f"</ArticleTitle><Abstract><AbstractText>{escape(abstract)}</AbstractText></Abstract></Article>"
            "</MedlineCitation></PubmedArticle>\n").encode()


# layout -> (file name, header, one record's bytes, footer): what data_process reads for that format
LAYOUTS = {
    "skypile": ("corpus.jsonl", b"", jsonl_record, b""),
    "medical_dialogue": ("corpus.csv", "department,title,ask,answer\n".encode("gb18030"), csv_row, b""),
    "wiki": ("corpus.json", b"", array_item, b"]\n"),
    "pubmed": ("corpus.xml.gz", b"<PubmedArticleSet>\n", medline_article, b"</PubmedArticleSet>\n"),
}


def write_layout(folder: Path, layout: str, documents: list[str], join: int, target_bytes: int) -> Path:
    """The layout's file, about target_bytes before compression."""
    name, header, record, footer = LAYOUTS[layout]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "wb") as out:
        f = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) if name.endswith(".gz") else out
        f.write(header)
        written = len(header)
        for index, text in enumerate(synthetic_documents(documents, join)):
            data = record(text, index)
            f.write(data)
            written += len(data)
            if written >= target_bytes:
                break
        f.write(footer)
        if f is not out:
            f.close()
    return path


def raw_tokens_per_second(tokenizer, documents: list[str], threads: int) -> float:
    start = time.perf_counter()
    ids = tokenizer.encode_batch(documents, num_threads=threads)
    return sum(map(len, ids)) / (time.perf_counter() - start)


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def stage_shares(path: Path, layout: str, tokenizer) -> dict:
    """Seconds per stage of data_process's worker, one stage at a time over the whole file, one thread."""
    fmt = corpora.FORMATS[layout]
    source = corpora.Source(layout, layout, [path], str(path))

    def read():
        with corpora.open_binary(path) as f:
            while f.read(1 << 20):
                pass

    def parse():
        return sum(1 for _ in corpora.iter_records(path, corpora.Problems(), None, fmt.record_tag))

    _, seconds_read = timed(read)
    _, seconds_container = timed(parse)
    texts, seconds_texts = timed(lambda: list(corpora.iter_texts(source, corpora.Problems())))
    cleaned, seconds_clean = timed(lambda: [(data_process.clean_text(t), data_process.text_hash(t))[0] for t in texts])
    batches = [cleaned[i:i + 256] for i in range(0, len(cleaned), 256)]
    ids, seconds_encode = timed(lambda: [tokenizer.encode_batch(batch, num_threads=1) for batch in batches])
    eos = np.array([tokenizer.eos_id], data_process.DTYPE)

    def write():
        with tempfile.TemporaryFile() as out:
            for batch in ids:
                pieces = [piece for doc in batch for piece in (np.array(doc, data_process.DTYPE), eos)]
                np.concatenate(pieces).tofile(out)

    _, seconds_write = timed(write)
    return {"read": seconds_read, "parse": seconds_container - seconds_read,
            "reader": seconds_texts - seconds_container,
            "clean+hash": seconds_clean, "encode": seconds_encode, "write": seconds_write,
            "tokens": sum(len(doc) + 1 for batch in ids for doc in batch)}


def end_to_end(corpus: Path, layout: str, out: Path, tokenizer_path, workers: int, minhash: bool):
    """One `python data_process.py` run: tokens, wall seconds, peak RSS (KiB) of the parent and of the
    largest worker."""
    command = [sys.executable, "-c", RUN_WITH_RSS, str(ROOT / "data_process.py"), "--source", f"{layout}={corpus}",
               "--out", str(out), "--tokenizer", str(tokenizer_path), "--workers", str(workers), "--force"]
    command += ["--minhash"] if minhash else []
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"bench_data: data_process failed:\n{result.stderr[-2000:]}")
    rss = next(line.split() for line in result.stderr.splitlines() if line.startswith("RSS "))
    manifest = json.loads((out / layout / "manifest.json").read_text(encoding="utf-8"))
    return manifest["tokens"], seconds, int(rss[1]), int(rss[2])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mb", type=float, default=32, help="size of the 1x corpus in MiB (10x: ten times that)")
    parser.add_argument("--join", type=int, default=6, help="sample documents per synthetic document")
    parser.add_argument("--layouts", default="skypile,medical_dialogue", help="layouts run end to end at 1x and 10x")
    parser.add_argument("--stages", default=",".join(LAYOUTS), help="layouts whose stage shares are measured")
    parser.add_argument("--minhash", action="store_true", help="end-to-end runs with --minhash")
    parser.add_argument("--tokenizer", default=None, help="default: the ChatGLM2 tokenizer where it is found")
    args = parser.parse_args()
    tokenizer_path = args.tokenizer or next((p for p in TOKENIZERS if (Path(p) / "tokenizer.model").is_file()),
                                            DEFAULT_DIR)
    tokenizer = load_encoder(tokenizer_path)
    documents = sample_documents()
    one_x = [text for text, _ in zip(synthetic_documents(documents, args.join), range(30_000))]
    raw_one = raw_tokens_per_second(tokenizer, one_x, 1)
    raw_all = raw_tokens_per_second(tokenizer, one_x, args.workers)
    print(f"tokenizer {tokenizer_path} (vocab {tokenizer.vocab_size}); documents of {args.join} sample documents, "
          f"{sum(map(len, one_x)) / len(one_x):,.0f} characters on average; {os.cpu_count()} cores")
    print(f"raw SentencePiece encode_batch: {raw_one:,.0f} tokens/s on 1 thread, {raw_all:,.0f} on {args.workers} "
          f"({raw_all / raw_one:.2f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stages = [s for s in args.stages.split(",") if s]
        if stages:
            print(f"\nwhere one worker's time goes ({args.mb:g} MiB per layout, one thread; shares of the sum)")
            print(f"{'layout':17} {'read':>6} {'parse':>6} {'reader':>7} {'clean':>6} {'encode':>7} {'write':>6}"
                  f" {'pipeline tok/s':>15} {'encode tok/s':>13}")
        for layout in stages:
            path = write_layout(tmp / "stages" / layout, layout, documents, args.join, int(args.mb * (1 << 20)))
            seconds = stage_shares(path, layout, tokenizer)
            tokens = seconds.pop("tokens")
            total = sum(seconds.values())
            print(f"{layout:17} " + " ".join(f"{seconds[k] / total:>{w}.0%}" for k, w in
                                              (("read", 6), ("parse", 6), ("reader", 7), ("clean+hash", 6),
                                               ("encode", 7), ("write", 6)))
                  + f" {tokens / total:>15,.0f} {tokens / seconds['encode']:>13,.0f}")

        print(f"\ndata_process.py end to end{' --minhash' if args.minhash else ''}, {args.workers} workers (ratio: to "
              f"raw SentencePiece on {args.workers} threads)")
        print(f"{'layout':17} {'input':>6} {'MiB':>7} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'ratio':>6} "
              f"{'RSS parent':>11} {'RSS worker':>11}")
        for layout in [s for s in args.layouts.split(",") if s]:
            for scale in (1, 10):
                corpus = write_layout(tmp / f"{layout}_{scale}x", layout, documents, args.join,
                                      int(scale * args.mb * (1 << 20)))
                tokens, seconds, rss_parent, rss_worker = end_to_end(corpus, layout, tmp / f"out_{layout}_{scale}x",
                                                                     tokenizer_path, args.workers, args.minhash)
                rate = tokens / seconds
                print(f"{layout:17} {f'{scale}x':>6} {corpus.stat().st_size / (1 << 20):>7.1f} {tokens:>12,} "
                      f"{seconds:>8.1f} {rate:>12,.0f} {rate / raw_all:>6.2f} {rss_parent / 1024:>9.0f}Mi "
                      f"{rss_worker / 1024:>9.0f}Mi")
                corpus.unlink()


if __name__ == "__main__":
    main()
