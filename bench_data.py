"""How fast is data_process.py next to SentencePiece itself, where does its time go, does its memory
stay flat as the input grows, and how does --minhash compare with datatrove's MinHash?

    python bench_data.py [--workers 2] [--mb 32] [--join 6] [--layouts skypile,medical_dialogue]
                         [--stages skypile,medical_dialogue,wiki,pubmed,s2orc] [--repeat 1] [--against DIR]
                         [--minhash] [--tokenizer DIR]
    python bench_data.py --datatrove [--mb 8] [--workers 2]    # needs: pip install datatrove xxhash spacy jieba

Builds corpora in real dataset layouts from the sample's pretraining text (data/sample/): SkyPile JSON
lines, Toyhom's GB18030 CSV (department,title,ask,answer), a Wikipedia JSON array, MEDLINE XML.gz, Semantic
Scholar's S2ORC JSON lines (content.text with annotation offsets, 30 references a paper), and (when named:
--layouts pmc, --stages ...,pmc) a PubMed Central folder of small JATS articles, one file each (~22 KB).
A synthetic document joins JOIN sample documents drawn at random (the sample's are short, ~190
characters; real ones are not, and per-document costs weigh with the number of documents) and starts
with its own line, so dedup keeps them all and MinHash nearly all. Then prints, from one run:
  raw     SentencePiece on the documents with 1 thread and with WORKERS threads, ids as numpy arrays
          and as Python lists, then the tokenizer's encode_arrays (what data_process asks for: fast_bpe.c
          where it is built, the same ids): tokens per wall second and per CPU second
  stages  per layout, one process: CPU seconds of reading (bytes off disk, gunzip), parsing (JSON/CSV/XML
          container), the reader (record -> text), cleaning (+ UTF-8), hashing, encoding and writing
          (ids -> uint16 part file), and that pipeline's tokens per CPU second next to encoding alone.
          CPU time, not wall time: other processes on a shared host do not count
  1x/10x  per layout in --layouts, `python data_process.py` end to end as a user runs it (interpreter
          start, imports with their bytecode cached, workers, shards, manifest: wall clock of the command;
          PYTHONDONTWRITEBYTECODE is dropped from its environment) with WORKERS workers
          (and --minhash if given), each run between two raw measurements on WORKERS threads (ids as
          arrays): tokens/s, ratio to the mean of those two (so both see the same load), CPU ratio
          (tokens per CPU second of the command, parent and workers, over raw's), the parent's CPU
          seconds, peak RSS of the parent and of the largest worker (flat from 1x to 10x = memory does
          not grow with the input; Linux /proc/self/status). --against DIR runs another checkout's
          data_process.py the same way, alternating with this one, --repeat times each.
  --datatrove  near duplicates on a SkyPile-layout corpus with planted near copies (a tenth of the
          documents: a recent document with 1%, 3% or 6% of its characters replaced, Jaccard about
          0.9, 0.75, 0.6 on 5-character shingles): data_process --minhash against datatrove's four
          MinHash stages (signatures, buckets, clusters, filter: JSONL in, JSONL out) with character
          5-grams and 16 x 8 hashes like ours, and with its own Chinese words (jieba via spaCy): seconds,
          CPU seconds, largest peak RSS of one process, documents dropped, how many of each planted
          level, how many not planted, and how many of them --minhash drops too.
"""

import argparse
import contextlib
import csv
import gzip
import io
import itertools
import json
import os
import random
import re
import shutil
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
# data_process run as a user runs it, reporting its peak RSS, its reaped workers' and both CPU times on the way out.
RUN_MEASURED = """import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    parent = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print("MEASURED", parent, children.ru_maxrss, own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime,
          file=sys.stderr)
"""
RAW_DOCUMENTS = 6000  # documents per raw measurement around an end-to-end run (a few seconds on 2 threads)


def sample_documents() -> list[str]:
    problems = corpora.Problems()
    return [
        text
        for name in SAMPLE_SOURCES
        for text in corpora.iter_texts(corpora.parse_source(f"{name}={SAMPLE / name}"), problems)
    ]


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
    return (
        f"<PubmedArticle><MedlineCitation><PMID>{index + 1}</PMID><Article><ArticleTitle>{escape(title)}"
        f"</ArticleTitle><Abstract><AbstractText>{escape(abstract)}</AbstractText></Abstract></Article>"
        "</MedlineCitation></PubmedArticle>\n"
    ).encode()


S2ORC_REFERENCES = 30  # bibliography entries per paper: a short real paper's


def s2orc_record(text: str, index: int) -> bytes:
    """A Semantic Scholar datasets S2ORC line: content.text with its annotation layers as JSON strings of
    offsets (title, abstract, a heading every third paragraph, paragraphs, the bibliography)."""
    title, abstract, *paragraphs = text.split("\n")
    pieces, layers, offset = [], {"title": [], "abstract": [], "sectionheader": [], "paragraph": [], "bibentry": []}, 0
    blocks = [("title", title), ("abstract", abstract)]
    for number, paragraph in enumerate(paragraphs):
        blocks += [("sectionheader", f"第{number // 3 + 1}节")] if number % 3 == 0 else []
        blocks.append(("paragraph", paragraph))
    blocks += [
        ("bibentry", f"Author {k}. A cited paper, number {k}. A Journal. 2020;{k}:1-9.")
        for k in range(S2ORC_REFERENCES)
    ]
    for layer, block in blocks:
        layers[layer].append({"start": offset, "end": offset + len(block)})
        pieces.append(block + "\n")
        offset += len(block) + 1
    annotations = {layer: json.dumps(spans) for layer, spans in layers.items()}
    record = {"corpusid": index, "content": {"text": "".join(pieces), "annotations": annotations}}
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def jats_article(text: str) -> bytes:
    """A PMC OA article file: PMC_SECTIONS synthetic documents as the sections of its body."""
    body = []
    for section in text.split("\n\n"):
        heading, *paragraphs = section.split("\n")
        body += [f"<sec><title>{escape(heading)}</title>", *(f"<p>{escape(p)}</p>" for p in paragraphs), "</sec>"]
    title = text.partition("\n")[0]
    body = "".join(body)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<article><front><article-meta><title-group><article-title>'
        f"{escape(title)}</article-title></title-group></article-meta></front><body>{body}</body></article>\n"
    ).encode()


PMC_SECTIONS = 6  # synthetic documents per article: ~22 KB of XML, a short real article


# layout -> (file name, header, one record's bytes, footer): what data_process reads for that format
LAYOUTS = {
    "skypile": ("corpus.jsonl", b"", jsonl_record, b""),
    "medical_dialogue": ("corpus.csv", "department,title,ask,answer\n".encode("gb18030"), csv_row, b""),
    "wiki": ("corpus.json", b"", array_item, b"]\n"),
    "pubmed": ("corpus.xml.gz", b"<PubmedArticleSet>\n", medline_article, b"</PubmedArticleSet>\n"),
    "s2orc": ("corpus.jsonl", b"", s2orc_record, b""),
}


FOLDER_LAYOUTS = {"pmc"}  # a folder of one-article files


def write_layout(folder: Path, layout: str, documents: list[str], join: int, target_bytes: int) -> Path:
    """The layout's file (a folder of files for FOLDER_LAYOUTS), about target_bytes before compression."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "pmc":
        articles, written = folder / "pmc_oa", 0
        articles.mkdir()
        texts = synthetic_documents(documents, join)
        for index in itertools.count():
            data = jats_article("\n\n".join(itertools.islice(texts, PMC_SECTIONS)))
            (articles / f"PMC{index + 1:07d}.xml").write_bytes(data)
            written += len(data)
            if written >= target_bytes:
                return articles
    name, header, record, footer = LAYOUTS[layout]
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


def raw_rates(encode, documents: list[str], threads: int) -> tuple[float, float]:
    """One encode call over the documents: tokens per wall second and per CPU second (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(map(len, encode(documents, num_threads=threads)))
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def cpu_timed(function):
    start = time.process_time()
    result = function()
    return result, time.process_time() - start


def stage_seconds(path: Path, layout: str, tokenizer) -> dict:
    """CPU seconds per stage of data_process's worker (encode_unit), one stage at a time over the whole
    file (or folder of files), one thread."""
    fmt = corpora.FORMATS[layout]
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    source = corpora.Source(layout, layout, files, str(path))

    def read():
        for file in files:
            with corpora.open_binary(file) as f:
                while f.read(1 << 20):
                    pass

    def parse():
        problems = corpora.Problems()
        return sum(1 for file in files for _ in corpora.iter_records(file, problems, None, fmt))

    _, seconds_read = cpu_timed(read)
    _, seconds_container = cpu_timed(parse)
    texts, seconds_texts = cpu_timed(lambda: list(corpora.iter_texts(source, corpora.Problems())))
    cleaned, seconds_clean = cpu_timed(lambda: [data_process.clean_text(t).encode() for t in texts])
    _, seconds_hash = cpu_timed(lambda: [data_process.text_hash(data) for data in cleaned])
    batches, batch, size = [], [], 0
    for data in cleaned:
        batch.append(data)
        size += len(data)
        if size >= data_process.BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    ids, seconds_encode = cpu_timed(lambda: [tokenizer.encode_arrays(batch, num_threads=1) for batch in batches])
    eos = np.array([tokenizer.eos_id], np.int32)

    def write():
        with tempfile.TemporaryFile() as out:
            for batch in ids:
                np.concatenate([piece for doc in batch for piece in (doc, eos)]).astype(data_process.DTYPE).tofile(out)

    _, seconds_write = cpu_timed(write)
    return {
        "read": seconds_read,
        "parse": seconds_container - seconds_read,
        "reader": seconds_texts - seconds_container,
        "clean": seconds_clean,
        "hash": seconds_hash,
        "encode": seconds_encode,
        "write": seconds_write,
        "tokens": sum(len(doc) + 1 for batch in ids for doc in batch),
    }


# As a user's shell runs Python: imported modules' bytecode cached in __pycache__. A sandbox or CI that sets
# PYTHONDONTWRITEBYTECODE would otherwise compile corpora.py and the rest on every run (~70 ms of start-up).
USER_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def cache_bytecode(script: Path):
    """Import the checkout's data_process once, so its modules' bytecode is cached before the timed runs
    (a user's first run pays the compile once; every later one starts from the cache)."""
    subprocess.run([sys.executable, "-c", "import data_process"], cwd=script.parent, env=USER_ENV, check=True)


def end_to_end(script: Path, corpus: Path, layout: str, out: Path, tokenizer_path, workers: int, minhash: bool):
    """One `python data_process.py` run (script: this checkout's or another's): tokens, wall seconds,
    parent and workers' CPU seconds, peak RSS (KiB) of the parent and of the largest worker."""
    command = [
        sys.executable,
        "-c",
        RUN_MEASURED,
        str(script),
        "--source",
        f"{layout}={corpus}",
        "--out",
        str(out),
        "--tokenizer",
        str(tokenizer_path),
        "--workers",
        str(workers),
        "--force",
    ]
    command += ["--minhash"] if minhash else []
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=script.parent, env=USER_ENV, check=False)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"bench_data: {script} failed:\n{result.stderr[-2000:]}")
    _, rss_parent, rss_worker, cpu_parent, cpu_workers = next(
        line.split() for line in result.stderr.splitlines() if line.startswith("MEASURED ")
    )
    manifest = json.loads((out / layout / "manifest.json").read_text(encoding="utf-8"))
    return {
        "tokens": manifest["tokens"],
        "seconds": seconds,
        "cpu_parent": float(cpu_parent),
        "cpu": float(cpu_parent) + float(cpu_workers),
        "rss_parent": int(rss_parent),
        "rss_worker": int(rss_worker),
        "manifest": manifest,
    }


def sentencepiece_arrays(tokenizer):
    """SentencePiece itself (ids as numpy arrays), whatever encoder the tokenizer's own methods use: the
    yardstick the end-to-end ratios are taken against."""
    return lambda texts, num_threads: tokenizer.sp.encode(list(texts), out_type="numpy", num_threads=num_threads)


def print_raw(tokenizer, documents: list[str], workers: int):
    print(f"raw encoding of {len(documents):,} documents (tokens per wall second / per CPU second)")
    encoders = [("SentencePiece, ids as arrays", sentencepiece_arrays(tokenizer))]
    encoders += [
        ("SentencePiece, ids as lists", lambda texts, num_threads: tokenizer.sp.encode(texts, num_threads=num_threads))
    ]
    if tokenizer.fast is not None:
        encoders += [("fast_bpe, ids as arrays (what data_process uses)", tokenizer.encode_arrays)]
    else:
        print(f"  ({tokenizer.fast_unavailable})")
    for name, encode in encoders:
        one, many = raw_rates(encode, documents, 1), raw_rates(encode, documents, workers)
        print(
            f"  {name:49} 1 thread {one[0]:>11,.0f} / {one[1]:>11,.0f}   {workers} threads {many[0]:>11,.0f} / "
            f"{many[1]:>11,.0f} ({many[0] / one[0]:.2f}x)"
        )


def print_stages(layouts: list[str], tmp: Path, documents: list[str], args, tokenizer):
    print(f"\nwhere one worker's time goes ({args.mb:g} MiB per layout, one thread, CPU seconds; shares of the sum)")
    names = ("read", "parse", "reader", "clean", "hash", "encode", "write")
    print(
        f"{'layout':17} " + " ".join(f"{name:>6}" for name in names) + f" {'pipeline tok/CPU-s':>19} "
        f"{'encode alone':>13}"
    )
    for layout in layouts:
        path = write_layout(tmp / "stages" / layout, layout, documents, args.join, int(args.mb * (1 << 20)))
        seconds = stage_seconds(path, layout, tokenizer)
        tokens = seconds.pop("tokens")
        total = sum(seconds.values())
        print(
            f"{layout:17} "
            + " ".join(f"{seconds[name] / total:>6.0%}" for name in names)
            + f" {tokens / total:>19,.0f} {tokens / seconds['encode']:>13,.0f}"
        )


def print_end_to_end(tmp: Path, documents: list[str], raw_documents: list[str], args, tokenizer, tokenizer_path):
    scripts = [("this", ROOT / "data_process.py")]
    if args.against:
        scripts.append(("against", Path(args.against).resolve() / "data_process.py"))
    for _, script in scripts:
        cache_bytecode(script)
    print(
        f"\ndata_process.py end to end{' --minhash' if args.minhash else ''}, {args.workers} workers; ratio: to raw "
        f"SentencePiece on {args.workers} threads (arrays) measured just before and after; CPU ratio: tokens per "
        f"CPU second over raw's"
    )
    print(
        f"{'code':8} {'layout':17} {'input':>5} {'MiB':>6} {'tokens':>11} {'seconds':>7} {'tokens/s':>10} "
        f"{'raw tok/s':>10} {'ratio':>5} {'CPU ratio':>9} {'parent CPU':>10} {'RSS parent':>10} {'RSS worker':>10}"
    )
    for layout in args.layouts:
        for scale in (1, 10):
            corpus = write_layout(
                tmp / f"{layout}_{scale}x", layout, documents, args.join, int(scale * args.mb * (1 << 20))
            )
            for _, (code, script) in itertools.product(range(args.repeat), scripts):
                before = raw_rates(sentencepiece_arrays(tokenizer), raw_documents, args.workers)
                run = end_to_end(
                    script, corpus, layout, tmp / f"out_{code}", tokenizer_path, args.workers, args.minhash
                )
                after = raw_rates(sentencepiece_arrays(tokenizer), raw_documents, args.workers)
                raw, raw_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
                rate = run["tokens"] / run["seconds"]
                size = sum(p.stat().st_size for p in corpus.iterdir()) if corpus.is_dir() else corpus.stat().st_size
                print(
                    f"{code:8} {layout:17} {f'{scale}x':>5} {size / (1 << 20):>6.0f} "
                    f"{run['tokens']:>11,} {run['seconds']:>7.1f} {rate:>10,.0f} {raw:>10,.0f} {rate / raw:>5.2f} "
                    f"{run['tokens'] / run['cpu'] / raw_cpu:>9.2f} {run['cpu_parent']:>9.1f}s "
                    f"{run['rss_parent'] / 1024:>8.0f}Mi {run['rss_worker'] / 1024:>8.0f}Mi",
                    flush=True,
                )
            if corpus.is_dir():
                shutil.rmtree(corpus)
            else:
                corpus.unlink()


# ---------------------------------------------------------------- --minhash next to datatrove's MinHash

NEAR_COPY_EDITS = (0.01, 0.03, 0.06)  # share of characters replaced in a planted near copy


def planted_documents(documents: list[str], join: int):
    """synthetic_documents, where every tenth is a near copy of the one five before it (its own first
    line, NEAR_COPY_EDITS[k] of its other characters replaced at random), without end. Yields (text,
    level): level k for a near copy, None otherwise."""
    rng = random.Random(1)
    alphabet = sorted(set("".join(documents)) - set("\n "))
    recent = []
    for number, text in enumerate(synthetic_documents(documents, join)):
        if number % 10 == 9:
            level = (number // 10) % len(NEAR_COPY_EDITS)
            body = list(recent[-5].partition("\n")[2])
            for i in rng.sample(range(len(body)), int(len(body) * NEAR_COPY_EDITS[level])):
                body[i] = rng.choice(alphabet)
            text = f"第{number}份资料\n" + "".join(body)
            yield text, level
        else:
            yield text, None
        recent = (recent + [text])[-5:]


class CharacterTokenizer:
    """datatrove word tokenizer that makes every character a word, so its 5-grams are our shingles."""

    language = "zh"

    def word_tokenize(self, text):
        return [char for char in text if not char.isspace()]

    def sent_tokenize(self, text):
        return [text]

    def span_tokenize(self, text):
        return [(i, i + 1) for i in range(len(text))]


def datatrove_minhash(corpus: str, work: str, workers: int, words: str):
    """datatrove's MinHash dedup, all four stages, a folder of JSONL files in, JSONL out; words:
    "characters" or "jieba"."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    tokenizer = type("Characters", (CharacterTokenizer, WordTokenizer), {})() if words == "characters" else "zh"
    config = MinhashConfig(
        n_grams=MINHASH["shingle_chars"],
        num_buckets=MINHASH["bands"],
        hashes_per_bucket=MINHASH["permutations"] // MINHASH["bands"],
    )
    work = Path(work)
    reader = JsonlReader(corpus)
    stages = [
        ([reader, MinhashDedupSignature(str(work / "signatures"), config=config, language=tokenizer)], workers),
        ([MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)], config.num_buckets),
        ([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)], 1),
        (
            [reader, MinhashDedupFilter(str(work / "remove")), JsonlWriter(str(work / "kept"), compression=None)],
            workers,
        ),
    ]
    for index, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=min(workers, tasks),
            logging_dir=str(work / f"logs_{index}"),
            start_method="fork",
        ).run()  # fork: its workers are reaped children, so their CPU counts


RUN_DATATROVE = RUN_MEASURED.replace(
    'runpy.run_path(sys.argv[0], run_name="__main__")',
    "import bench_data; bench_data.datatrove_minhash(*sys.argv[:2], int(sys.argv[2]), sys.argv[3])",
)
MINHASH = data_process.MINHASH
DOCUMENT_NUMBER = re.compile(r"^第(\d+)份资料")


def kept_numbers_in_shards(run: dict, folder: Path, tokenizer) -> set[int]:
    """The numbers of the documents in data_process's shards (each starts with its own numbered line)."""
    kept = set()
    for shard in run["manifest"]["shards"]:
        tokens = np.fromfile(folder / shard["file"], data_process.DTYPE)
        starts = np.concatenate([[0], np.flatnonzero(tokens == tokenizer.eos_id)[:-1] + 1])
        heads = tokenizer.sp.decode([tokens[start : start + 12].tolist() for start in starts])
        kept.update(int(DOCUMENT_NUMBER.match(head).group(1)) for head in heads)
    return kept


def compare_with_datatrove(tmp: Path, documents: list[str], args, tokenizer, tokenizer_path):
    print(
        f"\nnear duplicates: data_process --minhash vs datatrove MinHash, {args.workers} workers; planted near copies "
        f"with {', '.join(f'{edit:.0%}' for edit in NEAR_COPY_EDITS)} of their characters replaced"
    )
    print(
        f"{'method':34} {'input':>5} {'docs':>7} {'seconds':>7} {'CPU s':>6} {'RSS max':>8} {'dropped':>7} "
        + " ".join(f"{f'{edit:.0%} copies':>11}" for edit in NEAR_COPY_EDITS)
        + f" {'unplanted':>9} {'also ours':>9}"
    )
    for scale in (1, 10):
        corpus = tmp / f"near_{scale}x"  # datatrove parallelises over files: as many as there are workers, 4 times
        corpus.mkdir()
        levels, written, target = {}, 0, int(scale * args.mb * (1 << 20))
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(corpus / f"part_{i:03d}.jsonl", "wb")) for i in range(4 * args.workers)]
            for number, (text, level) in enumerate(planted_documents(documents, args.join)):
                data = jsonl_record(text, number)
                files[min(written * len(files) // target, len(files) - 1)].write(data)
                levels[number], written = level, written + len(data)
                if written >= target:
                    break
        planted = {level: {n for n, lv in levels.items() if lv == level} for level in range(len(NEAR_COPY_EDITS))}
        dropped_by = {}
        for method in (
            "data_process (no --minhash)",
            "data_process --minhash",
            "datatrove, character 5-grams",
            "datatrove, jieba words",
        ):
            if method.startswith("data_process"):
                out = tmp / f"near_out_{scale}x"
                run = end_to_end(
                    ROOT / "data_process.py",
                    corpus,
                    "skypile",
                    out,
                    tokenizer_path,
                    args.workers,
                    method.endswith("--minhash"),
                )
                seconds, cpu, rss = run["seconds"], run["cpu"], max(run["rss_parent"], run["rss_worker"])
                dropped = set(levels) - kept_numbers_in_shards(run, out / "skypile", tokenizer)
            else:
                work = tmp / f"datatrove_{scale}x_{len(dropped_by)}"
                command = [
                    sys.executable,
                    "-c",
                    RUN_DATATROVE,
                    str(corpus),
                    str(work),
                    str(args.workers),
                    "characters" if "character" in method else "jieba",
                ]
                start = time.perf_counter()
                result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
                seconds = time.perf_counter() - start
                if result.returncode:
                    sys.exit(f"bench_data: datatrove failed:\n{result.stderr[-3000:]}")
                measured = next(line.split() for line in result.stderr.splitlines() if line.startswith("MEASURED "))
                cpu, rss = float(measured[3]) + float(measured[4]), max(int(measured[1]), int(measured[2]))
                kept = set()
                for path in (work / "kept").glob("*.jsonl"):
                    with open(path, encoding="utf-8") as f:
                        kept.update(int(DOCUMENT_NUMBER.match(json.loads(line)["text"]).group(1)) for line in f)
                dropped = set(levels) - kept
            dropped_by[method] = dropped
            ours = dropped_by.get("data_process --minhash", dropped)
            print(
                f"{method:34} {f'{scale}x':>5} {len(levels):>7,} {seconds:>7.1f} {cpu:>6.1f} {rss / 1024:>6.0f}Mi "
                f"{len(dropped):>7,} "
                + " ".join(
                    f"{len(dropped & planted[k]):>5,}/{len(planted[k]):<5,}" for k in range(len(NEAR_COPY_EDITS))
                )
                + f" {len(dropped - set().union(*planted.values())):>9,} {len(dropped & ours):>9,}",
                flush=True,
            )


def layout_list(text, known=(*LAYOUTS, *FOLDER_LAYOUTS)):
    """--layouts / --stages: comma-separated names of layouts, checked before minutes of work."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layout {', '.join(unknown)}: choose from {', '.join(known)}")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mb", type=float, default=32, help="size of the 1x corpus in MiB (10x: ten times that)")
    parser.add_argument("--join", type=int, default=6, help="sample documents per synthetic document")
    parser.add_argument(
        "--layouts",
        type=layout_list,
        default="skypile,medical_dialogue",
        help="layouts run end to end at 1x and 10x",
    )
    parser.add_argument(
        "--stages",
        type=layout_list,
        default=",".join(LAYOUTS),
        help="layouts whose stage shares are measured",
    )
    parser.add_argument("--repeat", type=int, default=1, help="end-to-end runs of each code per layout and size")
    parser.add_argument(
        "--against",
        default=None,
        metavar="DIR",
        help="another checkout whose data_process.py runs alternately with this one's",
    )
    parser.add_argument("--minhash", action="store_true", help="end-to-end runs with --minhash")
    parser.add_argument("--datatrove", action="store_true", help="only the --minhash vs datatrove comparison")
    parser.add_argument("--tokenizer", default=None, help="default: the ChatGLM2 tokenizer where it is found")
    args = parser.parse_args()
    tokenizer_path = args.tokenizer or next(
        (p for p in TOKENIZERS if (Path(p) / "tokenizer.model").is_file()), DEFAULT_DIR
    )
    tokenizer = load_encoder(tokenizer_path)
    documents = sample_documents()
    raw_documents = [text for text, _ in zip(synthetic_documents(documents, args.join), range(RAW_DOCUMENTS))]
    print(
        f"tokenizer {tokenizer_path} (vocab {tokenizer.vocab_size}); documents of {args.join} sample documents, "
        f"{sum(map(len, raw_documents)) / len(raw_documents):,.0f} characters on average; {os.cpu_count()} cores, "
        "load average " + " ".join(f"{load:.1f}" for load in os.getloadavg())
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.datatrove:
            compare_with_datatrove(Path(tmp), documents, args, tokenizer, tokenizer_path)
            return
        print_raw(tokenizer, raw_documents, args.workers)
        print_stages(args.stages, Path(tmp), documents, args, tokenizer)
        print_end_to_end(Path(tmp), documents, raw_documents, args, tokenizer, tokenizer_path)
    print("load average " + " ".join(f"{load:.1f}" for load in os.getloadavg()))


if __name__ == "__main__":
    main()
