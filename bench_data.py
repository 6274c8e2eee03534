"""How fast is data_process.py next to SentencePiece itself, and does its memory stay flat as input grows?

    python bench_data.py [--workers 2] [--mb 32] [--join 6] [--tokenizer chatglm_tokenizer/]

Builds a synthetic JSON-lines corpus from the sample's pretraining text (data/sample/), MB MiB (1x) and
10 x MB MiB (10x). A synthetic document joins JOIN sample documents: the sample's are short (~190
characters), real ones are not (SkyPile: 1000+ characters a page), and the per-document costs (parse,
hash, dedup) weigh with the number of documents. Every document gets its own first line, so dedup keeps
them all. Then prints, from one run:
  raw    SentencePiece encode_batch on the 1x documents, one thread: the ceiling per core
  1x/10x data_process end to end (read + parse + clean + hash + encode + write shards) with N workers,
         each in a fresh process: tokens/s, ratio to raw x workers (target >= 0.6), peak RSS of the
         parent and of the largest worker (flat from 1x to 10x = memory does not grow with the input);
         Linux (reads /proc/self/status)
"""

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import corpora
import data_process
from chatglm_tokenizer import DEFAULT_DIR, load_tokenizer

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "data" / "sample"
SAMPLE_SOURCES = ["wiki", "baike", "c4_zh", "wudao", "medical_pretrain", "skypile", "guidelines", "cmekg", "cmedqa2",
                  "chatmed_tcm", "medical_dialogue", "medical_finetune", "text"]
# The real ChatGLM2 tokenizer: in the package, or (CI layout) in ../shared beside the checkout.
TOKENIZERS = [DEFAULT_DIR, ROOT.parent / "shared" / "chatglm_tokenizer"]


def sample_documents() -> list[str]:
    problems = corpora.Problems()
    return [text for name in SAMPLE_SOURCES
            for text in corpora.iter_texts(corpora.parse_source(f"{name}={SAMPLE / name}"), problems)]


def write_corpus(path: Path, documents: list[str], join: int, target_bytes: int) -> list[str]:
    """Documents of `join` sample documents each, numbered so no two are equal, until the file holds
    target_bytes."""
    written, size, copy = [], 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            for start in range(0, len(documents), join):
                text = f"第{copy}份资料\n" + "\n".join(documents[start:start + join])
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                written.append(text)
            copy += 1
    return written


def raw_tokens_per_second(tokenizer, documents: list[str]) -> float:
    start = time.perf_counter()
    ids = tokenizer.encode_batch(documents, num_threads=1)
    return sum(map(len, ids)) / (time.perf_counter() - start)


def end_to_end(corpus: Path, out: Path, tokenizer_path, workers: int, reply):
    """In a fresh process: one data_process run, timed; peak RSS of this process and of its workers."""
    # A spawned process makes spawn its children's default too; data_process run from a shell starts its
    # workers the platform's way (fork on Linux), without re-importing everything in each of them.
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    source = corpora.parse_source(f"skypile={corpus}")
    start = time.perf_counter()
    manifest = data_process.process_source(source, out, tokenizer_path, workers, force=True)
    seconds = time.perf_counter() - start
    reply.send((manifest["tokens"], seconds, own_peak_rss_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))


def own_peak_rss_kib() -> int:
    """VmHWM (Linux): unlike ru_maxrss it starts afresh at exec, so it does not include the peak of the
    process that spawned this one."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def measure(corpus: Path, out: Path, tokenizer_path, workers: int):
    receive, reply = multiprocessing.Pipe(duplex=False)
    # spawn: a clean process, so its peak RSS is the run's alone; not a Pool, whose daemon workers
    # could not start data_process's own pool
    process = multiprocessing.get_context("spawn").Process(target=end_to_end,
                                                           args=(corpus, out, tokenizer_path, workers, reply))
    process.start()
    result = receive.recv()
    process.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mb", type=float, default=32, help="size of the 1x corpus in MiB")
    parser.add_argument("--join", type=int, default=6, help="sample documents per synthetic document")
    parser.add_argument("--tokenizer", default=None, help="default: the ChatGLM2 tokenizer where it is found")
    args = parser.parse_args()
    tokenizer_path = args.tokenizer or next((p for p in TOKENIZERS if (Path(p) / "tokenizer.model").is_file()),
                                            DEFAULT_DIR)
    tokenizer = load_tokenizer(tokenizer_path)
    documents = sample_documents()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one_x = write_corpus(tmp / "corpus_1x.jsonl", documents, args.join, int(args.mb * (1 << 20)))
        write_corpus(tmp / "corpus_10x.jsonl", documents, args.join, int(10 * args.mb * (1 << 20)))
        raw = raw_tokens_per_second(tokenizer, one_x)
        print(f"tokenizer {tokenizer_path} (vocab {tokenizer.vocab_size}); documents of {args.join} sample "
              f"documents, {sum(map(len, one_x)) / len(one_x):,.0f} characters on average; {args.workers} workers; "
              f"{multiprocessing.cpu_count()} cores")
        print(f"{'':6} {'input':>9} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'ratio':>6} "
              f"{'RSS parent':>11} {'RSS worker':>11}")
        print(f"{'raw':6} {'1x':>9} {'':>12} {'':>8} {raw:>12,.0f} {'':>6} {'':>11} {'':>11}   "
              "SentencePiece encode_batch, 1 thread")
        for scale in ("1x", "10x"):
            corpus = tmp / f"corpus_{scale}.jsonl"
            tokens, seconds, rss_parent, rss_worker = measure(corpus, tmp / f"out_{scale}", tokenizer_path,
                                                              args.workers)
            rate = tokens / seconds
            print(f"{scale:6} {corpus.stat().st_size / (1 << 20):>7.1f}Mi {tokens:>12,} {seconds:>8.1f} "
                  f"{rate:>12,.0f} {rate / (raw * args.workers):>6.2f} {rss_parent / 1024:>9.0f}Mi "
                  f"{rss_worker / 1024:>9.0f}Mi")


if __name__ == "__main__":
    main()
