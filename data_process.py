"""Pretraining corpora -> uint16 token shards + one manifest per source; streaming, parallel, restartable.

    python data_process.py --source wiki=data/raw/wiki --source medical_pretrain='data/raw/medical/*.json' \\
        --out data/processed --workers 8 [--minhash] [--tokenizer out/tokenizer]

Output for every --source NAME=PATH_OR_GLOB (formats: corpora.py):
    OUT/NAME/NAME_0000.bin, NAME_0001.bin ...  np.uint16 token ids; every document is followed by eos and
                                               lies whole in one shard
    OUT/NAME/manifest.json                      counts, skipped records and parts of records left out
                                               by reason (+ first examples with file:line), inputs,
                                               tokenizer hash and vocab_size, settings, shards, the
                                               largest token id (per shard and overall)
    OUT/NAME/dedup_hashes.u64 (+ dedup_bands.u64 with --minhash)
                                               hashes of the documents this source added to the run's
                                               dedup sets, so a later run that skips this source still
                                               deduplicates the others against it

How it works:
  1. corpora.split_source cuts every source into work units: byte ranges (at record boundaries) of large
     JSON-lines / JSON-array / CSV / text / XML files (a gzipped XML file into as many as there are
     workers), and runs of whole files, about 16 per worker and at most --unit-mb each.
  2. Workers, one unit at a time: read records, clean, drop short documents, hash, encode in batches and
     append the tokens to a part file (ids as numpy arrays, no Python object per token, from
     chatglm_tokenizer/fast_bpe.c: SentencePiece's ids at about twice its speed, or from SentencePiece
     where it cannot be built; the run's first line says which). Nothing holds a corpus in memory.
  3. The parent takes the units' results in unit order, so the output is the same bytes for any
     --workers. It drops documents whose text hash it has already seen in this run (every source of one
     invocation; the first occurrence wins) and copies the rest into shards. With --minhash (MinHash +
     LSH over character shingles) the copy waits until the source's near duplicates are known: band keys
     are filed on disk by partition and decided one partition at a time (BandKeys), so no signatures of
     the whole corpus are ever held in memory.
  4. Shards are written as *.tmp, fsynced and renamed only when all of a source is done; stale shards of
     an earlier run are removed just before; manifest.json comes last. A killed run leaves either the
     earlier output or the new one, never a half-written shard under a final name.
Re-running skips a source whose manifest still matches: inputs (sizes, mtimes), tokenizer hash, settings,
and the sources it was deduplicated against. --force re-does it; an unreadable manifest means redo.
A source that yields no document is an error (after the other sources are done), never an empty success.
Every file the run deletes lies in OUT/NAME, whose NAME is a plain folder name.
"""

import os

if __name__ == "__main__":
    # numpy's OpenBLAS starts a thread per core at import that spins for ~0.1 CPU second, taken from the
    # workers on a small machine; nothing here multiplies matrices (the worker processes are the parallelism)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import multiprocessing
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import corpora
from atomic import atomic_write_text
from chatglm_tokenizer import DEFAULT_DIR, load_encoder

DTYPE = np.uint16  # ChatGLM2's 64794 ids fit; checked against every tokenizer before any work
MIN_CHARS = 10  # documents shorter than this after cleaning are dropped
SHARD_TOKENS = 1 << 28  # a shard is closed after the document that brings it to this many tokens (512 MiB)
UNIT_MB = 64  # big files are split into work units (corpora.split_source) of at most about this size ...
MIN_UNIT_BYTES = 1 << 20  # ... and of at least this, aiming at UNITS_PER_WORKER units per worker: output is the
UNITS_PER_WORKER = 16  # same for any size; many units keep the last ones short, so no worker idles long at the end
BATCH_BYTES = 1 << 21  # UTF-8 bytes of text per encode call inside a worker (its ids take about as much): parsing
# and cleaning between calls push SentencePiece's tables out of cache; 2 MiB calls gave 11% more tokens per CPU
# second than 256 KiB ones in encode_unit (interleaved runs, 16 MiB of SkyPile layout)
COPY_TOKENS = 1 << 20  # tokens the parent moves from a part file to the shards at a time (2 MiB)
MAX_WORKERS = 4 * (os.cpu_count() or 1)  # more processes than this only cost memory
MINHASH = {"permutations": 128, "bands": 16, "shingle_chars": 5}  # 16 bands x 8 rows: Jaccard ~0.7 and up
MINHASH_PARTITION_BITS = 8  # band keys are filed on disk by their top bits: 256 partitions, one in memory at a time
MINHASH_PARTITIONS = 1 << MINHASH_PARTITION_BITS
CLEANING = (
    "control characters removed except \\n and \\t; line breaks -> \\n; runs of spaces -> one; lines "
    "trimmed; at most one blank line; Chinese punctuation untouched"
)


# ---------------------------------------------------------------- cleaning, hashing

LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff\u200b]")  # C0/C1 but \t \n, BOM, ZWSP
SPACES = re.compile(r"[ \u00a0\u2000-\u200a\u202f\u205f]+")  # not \t, not the ideographic space U+3000
# Any character the two patterns above act on, as one character class: searching for it runs at
# ~750 MB/s, while the substitutions themselves are 3x slower, so most documents skip them.
UNUSUAL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00a0\u2000-\u200b\u2028\u2029\u202f\u205f\ufeff]")
BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """What CLEANING says; the text of a document as it is hashed, deduplicated and encoded."""
    if UNUSUAL.search(text):
        text = SPACES.sub(" ", CONTROLS.sub("", LINE_BREAKS.sub("\n", text)))
    elif "  " in text:
        text = SPACES.sub(" ", text)
    text = "\n".join(map(str.strip, text.split("\n")))
    if "\n\n\n" in text:
        text = BLANK_LINES.sub("\n\n", text)
    return text.strip("\n")


def text_hash(data: bytes) -> int:
    """A document's identity for exact dedup: blake2b-64 of its cleaned text's UTF-8 bytes."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


_rng = np.random.default_rng(20240601)  # fixed: band keys must agree across processes and runs
MINHASH_A = _rng.integers(1, 1 << 63, MINHASH["permutations"], dtype=np.uint64) | np.uint64(1)
MINHASH_B = _rng.integers(0, 1 << 63, MINHASH["permutations"], dtype=np.uint64)
SHINGLE_BASE = np.uint64(1_000_003)


def minhash_bands(text: str) -> np.ndarray:
    """One uint64 key per LSH band of the text's MinHash signature over character shingles. Two texts
    with Jaccard similarity s share at least one band key with probability 1 - (1 - s^rows)^bands
    (16 x 8: 0.06 at s=0.5, 0.61 at 0.7, 0.9999 at 0.9). Plain numpy (no salted hash(), no Python loop
    per shingle): the same keys in every process."""
    k = MINHASH["shingle_chars"]
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = max(len(codes) - k + 1, 1)
    shingles = np.zeros(count, np.uint64)
    for j in range(min(k, len(codes))):  # polynomial hash of every k-character window, wrapping mod 2^64
        shingles = shingles * SHINGLE_BASE + codes[j : j + count]
    shingles = np.unique(shingles)
    signature = np.full(MINHASH["permutations"], np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, len(shingles), 4096):  # (a*x + b) mod 2^64 per permutation, in bounded memory
        block = shingles[start : start + 4096]
        signature = np.minimum(signature, (MINHASH_A[:, None] * block + MINHASH_B[:, None]).min(axis=1))
    bands = signature.reshape(MINHASH["bands"], -1)
    return np.array([text_hash(f"{i}:{band.tobytes().hex()}".encode()) for i, band in enumerate(bands)], np.uint64)


class SeenHashes:
    """A growing set of uint64 hashes at 8 bytes each (a Python set costs 60+): sorted runs, merged as
    they pile up, so lookups and inserts are vectorised and a run of 100M documents fits in 1 GB."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def add(self, values) -> np.ndarray:
        """Insert values; True where one is new: not in the set and not earlier in `values`."""
        values = np.asarray(values, np.uint64)
        unique, first = np.unique(values, return_index=True)
        fresh = np.ones(len(unique), bool)
        for run in self.runs:
            found = np.minimum(np.searchsorted(run, unique), len(run) - 1)
            fresh &= run[found] != unique
        new = np.zeros(len(values), bool)
        new[first[fresh]] = True
        if fresh.any():
            self.runs.append(unique[fresh])
        while len(self.runs) > 1 and 2 * len(self.runs[-1]) >= len(self.runs[-2]):
            self.runs.append(np.sort(np.concatenate([self.runs.pop(), self.runs.pop()])))
        return new


def contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    found = np.minimum(np.searchsorted(sorted_values, values), max(len(sorted_values) - 1, 0))
    return sorted_values[found] == values if len(sorted_values) else np.zeros(len(values), bool)


class BandKeys:
    """The run's LSH band keys on disk, filed by their top bits into MINHASH_PARTITIONS partitions, so
    that deciding which documents are near duplicates holds one partition in memory at a time and
    never the signatures of the whole corpus (SkyPile-150B: 233M documents x 16 keys x 8 bytes = 30 GB).
    Per partition: seen_P.u64, the sorted unique keys of the sources done; staged_P.u64, (key, document)
    pairs of the source in progress."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, kind: str, partition: int) -> Path:
        return self.folder / f"{kind}_{partition:03d}.u64"

    def file(self, kind: str, keys: np.ndarray, rows: np.ndarray):
        """Append each row to the `kind` file of its key's partition."""
        partition = (keys >> np.uint64(64 - MINHASH_PARTITION_BITS)).astype(np.int64)
        order = np.argsort(partition, kind="stable")
        bounds = np.searchsorted(partition[order], np.arange(MINHASH_PARTITIONS + 1))
        rows = rows[order]
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self.path(kind, p), "ab") as f:
                rows[bounds[p] : bounds[p + 1]].tofile(f)

    def seen(self, partition: int) -> np.ndarray:
        path = self.path("seen", partition)
        return np.fromfile(path, np.uint64) if path.exists() else np.empty(0, np.uint64)

    def stage(self, keys: np.ndarray, first_document: int):
        """keys: (documents, bands) of the source's documents first_document, first_document + 1, ..."""
        documents = np.arange(first_document, first_document + len(keys), dtype=np.uint64).repeat(keys.shape[1])
        self.file("staged", keys.ravel(), np.column_stack([keys.ravel(), documents]))

    def near_duplicates(self, documents: int, log: "HashLog") -> np.ndarray:
        """Which of the source's staged documents share a band key with an earlier document: of an earlier
        source, or earlier in this one (a dropped near duplicate's keys count too: a chain of similar
        documents keeps only its first). The source's new keys join the seen ones and go to log."""
        near = np.zeros(documents, bool)
        for partition in range(MINHASH_PARTITIONS):
            staged = self.path("staged", partition)
            if not staged.exists():
                continue
            pairs = np.fromfile(staged, np.uint64).reshape(-1, 2)
            staged.unlink()
            keys, owners = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].T
            first = np.ones(len(keys), bool)
            first[1:] = keys[1:] != keys[:-1]
            seen = self.seen(partition)
            known = contains(seen, keys)
            near[owners[~first | known]] = True
            fresh = keys[first & ~known]
            log.write(fresh)
            np.union1d(seen, fresh).tofile(self.path("seen", partition))
        return near

    def remember(self, log_path: Path):
        """An up-to-date source's logged keys join the seen ones, read a slice at a time."""
        if not log_path.stat().st_size:
            return
        keys = np.memmap(log_path, "<u8", mode="r")
        for start in range(0, len(keys), COPY_TOKENS):
            chunk = np.array(keys[start : start + COPY_TOKENS], np.uint64)
            self.file("incoming", chunk, chunk)
        for partition in range(MINHASH_PARTITIONS):
            incoming = self.path("incoming", partition)
            if incoming.exists():
                np.union1d(self.seen(partition), np.fromfile(incoming, np.uint64)).tofile(self.path("seen", partition))
                incoming.unlink()


@dataclass
class Dedup:
    """The run's memory of documents: exact text hashes (in RAM, 8 bytes a document), LSH band keys (on
    disk, with --minhash), and which sources filled them."""

    exact: SeenHashes = field(default_factory=SeenHashes)
    bands: BandKeys | None = None
    sources: list = field(default_factory=list)  # [{"name", "dedup_sha256"}] in processing order


# ---------------------------------------------------------------- workers: one work unit each


@dataclass
class UnitResult:
    part: Path  # uint16 tokens of the unit's documents, each followed by eos
    lengths: np.ndarray  # tokens per document (eos included)
    hashes: np.ndarray  # uint64 hash of each document's cleaned text
    file_numbers: np.ndarray | None  # each document's file, an index into unit_labels(unit); None: one label
    bands: np.ndarray | None  # (documents, bands) LSH keys, with --minhash
    documents_read: int
    problems: corpora.Problems
    read_to_end: bool  # a CSV unit read on to the end of its file (corpora.Span): the file's later units are void


_tokenizer = None  # the encoder of this process: inherited by forked workers, loaded by _init_worker in others


def _init_worker(tokenizer_path):
    global _tokenizer
    _tokenizer = load_encoder(tokenizer_path)


def unit_labels(unit: corpora.Source) -> list[str]:
    """Where a unit's problems without a line of their own (documents too short after cleaning,
    duplicates) are said to be: each of its files, which it reads one by one, or the source's location
    for a format that reads its files together. The same however the files were grouped into units."""
    if corpora.FORMATS[unit.format].whole_source:
        return [unit.location]
    return [str(path) for path in unit.files]


def count_per_file(problems: corpora.Problems, reason: str, labels: list[str], file_numbers, dropped: np.ndarray):
    """One count per file for the documents of a unit the parent drops (dropped: their indices in the unit;
    file_numbers: UnitResult.file_numbers)."""
    if file_numbers is None:
        problems.add(reason, labels[0], count=len(dropped))
        return
    numbers, counts = np.unique(file_numbers[dropped], return_counts=True)
    for number, count in zip(numbers, counts):
        problems.add(reason, labels[number], count=int(count))


def encode_unit(task) -> UnitResult:
    """Read, clean, filter, hash and encode one work unit into its part file."""
    source, span, part, min_chars, minhash = task
    labels = unit_labels(source)
    pieces = [source] if len(labels) == 1 else [dataclasses.replace(source, files=[path]) for path in source.files]
    problems = corpora.Problems()
    eos = np.array([_tokenizer.eos_id], np.int32)
    lengths, hashes, bands, file_numbers, batch, batch_bytes, read = [], [], [], [], [], 0, 0

    def flush(out):
        ids = _tokenizer.encode_arrays(batch, num_threads=1)  # the processes are the parallelism
        lengths.extend(len(document) + 1 for document in ids)
        if ids:
            np.concatenate([piece for document in ids for piece in (document, eos)]).astype(DTYPE).tofile(out)
        batch.clear()

    with open(part, "wb") as out:
        for number, piece in enumerate(pieces):
            for text in corpora.iter_texts(piece, problems, span):
                read += 1
                text = clean_text(text)
                if len(text) < min_chars:
                    reason = "shorter than --min-chars after cleaning" if text else "empty after cleaning"
                    problems.add(reason, labels[number])
                    continue
                data = text.encode("utf-8")  # hashed, and what SentencePiece reads (it would encode the str itself)
                hashes.append(text_hash(data))
                file_numbers.append(number)
                if minhash:
                    bands.append(minhash_bands(text))
                batch.append(data)
                batch_bytes += len(data)
                if batch_bytes >= BATCH_BYTES:
                    flush(out)
                    batch_bytes = 0
        flush(out)
    band_keys = np.array(bands, np.uint64).reshape(-1, MINHASH["bands"]) if minhash else None
    return UnitResult(
        part,
        np.array(lengths, np.int64),
        np.array(hashes, np.uint64),
        np.array(file_numbers, np.int32) if len(labels) > 1 else None,
        band_keys,
        read,
        problems,
        span is not None and span.read_to_end,
    )


# ---------------------------------------------------------------- the parent: shards


class ShardWriter:
    """Appends whole documents to NAME_0000.bin.tmp, NAME_0001.bin.tmp, ...; a shard is closed (flushed,
    fsynced) after the document that brings it to shard_tokens. Renaming is install_output's job. Each
    shard records its largest token id."""

    def __init__(self, folder: Path, name: str, shard_tokens: int):
        self.folder, self.name, self.shard_tokens = folder, name, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens", "documents"}
        self.file = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray):
        """tokens: the documents' ids back to back; lengths: ids per document."""
        ends = np.cumsum(lengths)
        done_docs = done_tokens = 0
        while done_docs < len(lengths):
            if self.file is None:
                self.shards.append(
                    {"file": f"{self.name}_{len(self.shards):04d}.bin", "tokens": 0, "documents": 0, "max_token_id": 0}
                )
                self.file = open(self.folder / (self.shards[-1]["file"] + ".tmp"), "wb")
            shard = self.shards[-1]
            filling = int(np.searchsorted(ends, done_tokens + self.shard_tokens - shard["tokens"]))
            stop = min(filling + 1, len(lengths))
            piece = tokens[done_tokens : ends[stop - 1]]
            piece.tofile(self.file)
            shard["max_token_id"] = max(shard["max_token_id"], int(piece.max()))  # training checks it against vocab
            shard["tokens"] += int(ends[stop - 1]) - done_tokens
            shard["documents"] += stop - done_docs
            done_docs, done_tokens = stop, int(ends[stop - 1])
            if shard["tokens"] >= self.shard_tokens:
                self.close()

    def close(self):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


class HashLog:
    """Appends uint64 hashes to a .tmp file and keeps their sha256 (the source's dedup fingerprint)."""

    def __init__(self, path: Path):
        self.path, self.file, self.sha = path, open(path.with_name(path.name + ".tmp"), "wb"), hashlib.sha256()
        self.bytes = 0

    def write(self, values: np.ndarray):
        data = np.ascontiguousarray(values, "<u8").tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def exact_dedup(result: UnitResult, dedup: Dedup, log: HashLog, labels: list[str]) -> np.ndarray:
    """True for the unit's documents whose text no earlier document of the run had."""
    new = dedup.exact.add(result.hashes)
    log.write(result.hashes[new])
    if not new.all():
        dropped = np.flatnonzero(~new)
        count_per_file(result.problems, "exact duplicate of an earlier document", labels, result.file_numbers, dropped)
    return new


def copy_unit(result: UnitResult, keep: np.ndarray, writer: ShardWriter) -> int:
    """The unit's kept documents into the shards; the part file is removed. Returns how many were kept."""
    ends = np.cumsum(result.lengths)
    with open(result.part, "rb") as part:
        first = 0
        while first < len(ends):
            base = int(ends[first - 1]) if first else 0
            last = max(int(np.searchsorted(ends, base + COPY_TOKENS, side="right")), first + 1)
            tokens = np.fromfile(part, DTYPE, int(ends[last - 1]) - base)
            lengths, kept = result.lengths[first:last], keep[first:last]
            if not kept.all():
                tokens, lengths = tokens[np.repeat(kept, lengths)], lengths[kept]
            writer.write(tokens, lengths)
            first = last
    remove_owned(result.part, writer.folder)
    return int(keep.sum())


# ---------------------------------------------------------------- one source


@dataclass
class Run:
    """What every source of one invocation shares."""

    tokenizer: dict  # {"path", "sha256", "vocab_size", "eos_id"}
    settings: dict
    workers: int
    unit_bytes: int
    force: bool
    dedup: Dedup = field(default_factory=Dedup)


def inputs_of(source: corpora.Source) -> tuple[dict, list[int]]:
    """What the manifest records of a source's files, and their sizes (one stat a file). The record is
    their count, total size and one SHA-256 over every path, size and modification time, not a list:
    a folder of PubMed Central articles holds millions of files, whose list would make each manifest
    hundreds of MB to write, and to read back on every re-run."""
    files = []
    for path in tqdm(
        source.files, f"{source.name}: reading file sizes", unit=" files", delay=corpora.LISTING_BAR_DELAY, leave=False
    ):
        stat = path.stat()
        files.append((path, stat.st_size, stat.st_mtime_ns))
    return inputs_summary(files), [size for _, size, _ in files]


def inputs_summary(files) -> dict:
    """files: (path, size, mtime_ns) of each input file, in order."""
    digest, count, total = hashlib.sha256(), 0, 0
    for path, size, mtime_ns in files:
        digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
        count, total = count + 1, total + size
    return {"files": count, "bytes": total, "sha256": digest.hexdigest()}


def up_to_date(manifest: dict | None, expected: dict, folder: Path) -> bool:
    """The manifest describes these inputs and settings, and every file it lists is there at its size."""
    try:
        if isinstance(manifest["inputs"], list):  # written when manifests listed every input file: still good
            listed = ((item["path"], item["bytes"], item["mtime_ns"]) for item in manifest["inputs"])
            manifest = {**manifest, "inputs": inputs_summary(listed)}
        if any(manifest[key] != value for key, value in expected.items()):
            return False
        if "max_token_id" not in manifest:  # written before manifests recorded it
            return False
        files = [(s["file"], 2 * s["tokens"]) for s in manifest["shards"]] + list(manifest["dedup_files"].items())
    except (KeyError, TypeError, AttributeError):  # no manifest, or one written by another version
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files)


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None: missing, or unreadable (a note says so; the source is redone)."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        return corpora.json_loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
        print(f"note: {path} is unreadable ({type(err).__name__}: {str(err)[:80]}), so {folder.name} is redone")
        return None


def remember_skipped_source(folder: Path, manifest: dict, dedup: Dedup):
    """An up-to-date source's documents still count as seen for the sources after it."""
    dedup.exact.add(np.fromfile(folder / "dedup_hashes.u64", "<u8"))
    if "dedup_bands.u64" in manifest["dedup_files"]:
        dedup.bands.remember(folder / "dedup_bands.u64")


def remove_owned(path: Path, folder: Path):
    """Unlink a file of the folder this run owns (OUT/NAME); a path whose entry lies anywhere else is
    refused, whatever its name. A link is removed, never what it points to."""
    if not path.parent.resolve().is_relative_to(folder.resolve()):
        raise RuntimeError(f"refusing to delete {path}: outside {folder}, the folder this run writes")
    path.unlink(missing_ok=True)


PENDING_MANIFEST = "manifest.json.new"  # the new output's manifest, written before any old file goes


def install_output(folder: Path, manifest: dict):
    """The new shards and hash logs are complete and fsynced as NAME.tmp. Their manifest is written beside
    the old one first, as manifest.json.new: the commit point. A run killed before it leaves the old output
    whole (the next run clears the .tmp files); one killed after it leaves a commit that finish_install
    carries out, here or at the start of the next run."""
    atomic_write_text(folder / PENDING_MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
    sync_folder(folder)
    finish_install(folder)


def finish_install(folder: Path):
    """Carry out a committed install (a no-op without manifest.json.new): the old manifest and the shards
    the new one does not list go, each new file takes its name, the new manifest takes manifest.json.
    Every step can be repeated, so a kill at any point is finished by the next call."""
    pending = folder / PENDING_MANIFEST
    if not pending.is_file():
        return
    try:
        manifest = corpora.json_loads(pending.read_text(encoding="utf-8"))
        names = [shard["file"] for shard in manifest["shards"]] + list(manifest["dedup_files"])
    except (OSError, ValueError, KeyError, TypeError):  # not this program's (atomic_write_text writes it whole)
        remove_owned(pending, folder)
        return
    remove_owned(folder / "manifest.json", folder)  # from here until the rename below the folder reads as unfinished
    for stale in folder.glob("*.bin"):
        if stale.name not in names:
            remove_owned(stale, folder)
    for name in names:
        if corpora.is_plain_name(name) and (folder / (name + ".tmp")).is_file():
            os.replace(folder / (name + ".tmp"), folder / name)
    os.replace(pending, folder / "manifest.json")
    sync_folder(folder)


def sync_folder(folder: Path):
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames themselves survive a power cut
    finally:
        os.close(directory)


def clear_leftovers(folder: Path):
    """Temporary files of a killed run: never read, removed before the source is redone."""
    parts = folder / "parts.tmp"
    if parts.is_dir() and not parts.is_symlink():
        for part in parts.iterdir():
            remove_owned(part, folder)
        parts.rmdir()
    for leftover in folder.glob("*.tmp"):
        if not leftover.is_dir() or leftover.is_symlink():
            remove_owned(leftover, folder)


class NothingKept(ValueError):
    """A source that yielded no document: an error, never an empty success."""


def process_one(source: corpora.Source, out_dir: Path, run: Run, encode) -> dict:
    folder = Path(out_dir) / source.name  # source.name is a plain name (corpora.parse_source)
    inputs, file_sizes = inputs_of(source)
    expected = {
        "format": source.format,
        "inputs": inputs,
        "tokenizer_sha256": run.tokenizer["sha256"],
        "settings": run.settings,
        "dedup_against": list(run.dedup.sources),
    }
    if folder.is_dir():
        finish_install(folder)  # a run killed after committing its output
    manifest = read_manifest(folder)
    if not run.force and up_to_date(manifest, expected, folder):
        print(f"{source.name}: up to date, skipped ({manifest['tokens']:,} tokens; --force redoes it)")
        remember_skipped_source(folder, manifest, run.dedup)
        run.dedup.sources.append({"name": source.name, "dedup_sha256": manifest["dedup_sha256"]})
        return manifest

    file_bytes = dict(zip(source.files, file_sizes))
    unit_bytes = max(MIN_UNIT_BYTES, inputs["bytes"] // (UNITS_PER_WORKER * run.workers))
    units = corpora.split_source(source, min(run.unit_bytes, unit_bytes), file_sizes, gzip_spans=run.workers)
    folder.mkdir(parents=True, exist_ok=True)
    clear_leftovers(folder)
    parts = folder / "parts.tmp"
    parts.mkdir()
    sizes = [(span.end - span.start) if span else sum(file_bytes[path] for path in unit.files) for unit, span in units]
    tasks = [
        (unit, span, parts / f"unit_{i:06d}.bin", run.settings["min_chars"], run.settings["minhash"] is not None)
        for i, (unit, span) in enumerate(units)
    ]
    writer = ShardWriter(folder, source.name, run.settings["shard_tokens"])
    logs = []
    problems, read, kept = corpora.Problems(), 0, 0
    deferred, staged = [], 0  # --minhash: units wait for the source's near duplicates: (result, keep, first, labels)
    void_file = None  # a file one of whose units read on to its end: its later units were cut inside a row
    try:
        logs.append(HashLog(folder / "dedup_hashes.u64"))
        if run.settings["minhash"]:
            logs.append(HashLog(folder / "dedup_bands.u64"))
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=source.name) as bar:
            for (unit, _), size, result in zip(units, sizes, encode(encode_unit, tasks)):
                bar.update(size)
                if unit.files[0] == void_file:
                    remove_owned(result.part, folder)
                    continue
                if result.read_to_end:
                    void_file = unit.files[0]
                labels = unit_labels(unit)
                keep = exact_dedup(result, run.dedup, logs[0], labels)
                if result.bands is None:
                    kept += copy_unit(result, keep, writer)
                else:
                    run.dedup.bands.stage(result.bands[keep], staged)
                    deferred.append((result, keep, staged, labels))
                    staged += int(keep.sum())
                    result.bands = result.hashes = None
                problems.merge(result.problems)
                read += result.documents_read
        if deferred:
            near = run.dedup.bands.near_duplicates(staged, logs[1])
            for result, keep, first, labels in tqdm(deferred, desc=f"{source.name} near duplicates dropped, copying"):
                exact = np.flatnonzero(keep)
                dropped = near[first : first + len(exact)]
                keep[exact[dropped]] = False
                if dropped.any():
                    reason = "near duplicate (MinHash) of an earlier document"
                    count_per_file(problems, reason, labels, result.file_numbers, exact[dropped])
                kept += copy_unit(result, keep, writer)
        writer.close()
        for log in logs:
            log.close()
        parts.rmdir()
        if not kept:
            print(problems.summary())
            raise NothingKept(
                f"source '{source.name}' yielded no document ({read:,} read from "
                f"{len(source.files)} file(s) at {source.location}; skipped: "
                f"{dict(problems.counts) or 'nothing'}). "
                f"Expected: {corpora.expected_input(source.format)}"
            )
        dedup_sha = hashlib.sha256("".join(log.sha.hexdigest() for log in logs).encode()).hexdigest()
        manifest = {
            "name": source.name,
            **expected,
            "location": source.location,
            "tokenizer": run.tokenizer,
            "dtype": np.dtype(DTYPE).name,
            "eos_id": run.tokenizer["eos_id"],
            "vocab_size": run.tokenizer["vocab_size"],
            "max_token_id": max(s["max_token_id"] for s in writer.shards),
            "documents_read": read,
            "documents_kept": kept,
            "tokens": sum(s["tokens"] for s in writer.shards),
            "skipped": problems.skipped,
            "parts_left_out": problems.parts_left_out,
            "skipped_examples": problems.examples,
            "shards": writer.shards,
            "dedup_files": {log.path.name: log.bytes for log in logs},
            "dedup_sha256": dedup_sha,
        }
        install_output(folder, manifest)
    except BaseException as err:  # an error, a full disk or Ctrl-C: no temporary files left behind
        for file in [writer.file] + [log.file for log in logs]:
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()
        if not (folder / PENDING_MANIFEST).is_file():  # committed: the next run finishes the install instead
            clear_leftovers(folder)
        if isinstance(err, OSError):
            where = f" ({err.filename})" if err.filename else ""
            raise OSError(
                err.errno,
                f"source '{source.name}': {err.strerror or err}{where} while writing {folder}; "
                "its temporary files were removed, re-run to redo it",
            ) from None
        raise
    run.dedup.sources.append({"name": source.name, "dedup_sha256": dedup_sha})
    print(
        f"{source.name}: {read:,} documents read, {kept:,} kept, {manifest['tokens']:,} tokens in "
        f"{len(writer.shards)} shard(s) -> {folder}"
    )
    if problems.counts:
        print(problems.summary())
    return manifest


# ---------------------------------------------------------------- the run


def check_tokenizer(tokenizer, path):
    if tokenizer.vocab_size > np.iinfo(DTYPE).max + 1:
        raise ValueError(
            f"tokenizer {path} has vocab_size {tokenizer.vocab_size}: ids up to "
            f"{tokenizer.vocab_size - 1} do not fit uint16 token files (largest id must be <= 65535)"
        )


def process_sources(
    sources,
    out_dir,
    tokenizer_path=DEFAULT_DIR,
    workers=1,
    min_chars=MIN_CHARS,
    minhash=False,
    shard_tokens=SHARD_TOKENS,
    force=False,
    unit_bytes=UNIT_MB << 20,
) -> list[dict]:
    """Every source into OUT/NAME/, deduplicated across all of them; a manifest per source.
    Everything that can be checked is checked before any work. A source that yields no document (no
    file matched, none of the right kind, every record rejected) gets no output; the others are done,
    then NothingKept names them all."""
    for name, value, low in (
        ("workers", workers, 1),
        ("min_chars", min_chars, 0),
        ("shard_tokens", shard_tokens, 1),
        ("unit_bytes", unit_bytes, 1),
    ):
        if not value >= low:
            raise ValueError(f"{name} must be >= {low}, not {value}")
    if workers > MAX_WORKERS:
        raise ValueError(f"workers {workers} is more than {MAX_WORKERS} (4 per core)")
    corpora.check_out(out_dir, folder=True)
    tokenizer = load_encoder(tokenizer_path)  # FileNotFoundError says how to get one
    check_tokenizer(tokenizer, tokenizer_path)
    print(
        "encoding with fast_bpe.c (SentencePiece's ids, faster)"
        if tokenizer.fast
        else f"encoding with SentencePiece ({tokenizer.fast_unavailable})"
    )
    for source in sources:
        if not corpora.is_plain_name(source.name):  # OUT/NAME is the only folder this run writes and cleans
            raise ValueError(f"source name {source.name!r} is not a plain folder name")
        folder = Path(out_dir) / source.name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ValueError(
                f"{folder} is {'a link' if folder.is_symlink() else 'a file'}: the run writes and "
                "cleans only a real folder OUT/NAME; move it away"
            )
        if source.format not in corpora.PRETRAIN_FORMATS:
            raise ValueError(
                f"source '{source.name}': format '{source.format}' is not pretraining text; "
                f"use one of {', '.join(sorted(corpora.PRETRAIN_FORMATS))}"
            )
    twice = corpora.repeated([source.name for source in sources])
    if twice:
        raise ValueError(f"source name {', '.join(map(repr, twice))} given twice: each names its own output folder")
    out_root = Path(out_dir).resolve()
    sources = [  # a folder or glob that holds --out would read this program's output back as input
        dataclasses.replace(source, files=files_outside(source.files, out_root)) for source in sources
    ]
    run = Run(
        {
            "path": str(tokenizer_path),
            "sha256": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        {
            "min_chars": min_chars,
            "minhash": MINHASH if minhash else None,
            "shard_tokens": shard_tokens,
            "cleaning": CLEANING,
        },
        workers,
        unit_bytes,
        force,
    )
    manifests, failed, bands_folder = [], [], None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lock = claim_out(Path(out_dir))
    if minhash:
        bands_folder = Path(tempfile.mkdtemp(prefix=".minhash-", suffix=".tmp", dir=out_dir))  # this run's alone
        run.dedup.bands = BandKeys(bands_folder)
    try:
        with worker_pool(workers, tokenizer, tokenizer_path) as encode:
            for source in sources:
                if not source.files:
                    failed.append(f"source '{source.name}': nothing matches {source.location!r}")
                    print(failed[-1])
                    continue
                try:
                    manifests.append(process_one(source, Path(out_dir), run, encode))
                except NothingKept as err:
                    failed.append(str(err))
                    print(failed[-1])
    finally:
        if bands_folder is not None:
            shutil.rmtree(bands_folder, ignore_errors=True)
        lock.close()
    if failed:
        raise NothingKept(f"{len(failed)} of {len(sources)} source(s) yielded no document: " + " | ".join(failed))
    return manifests


def files_outside(files: list[Path], folder: Path) -> list[Path]:
    """The files whose real location is not inside folder (a resolved path). Each file's folder is
    resolved once, not each file: resolving looks at every component of a path, and a source may hold
    millions of files; a linked file is resolved itself."""
    inside = {}  # a file's folder as listed -> whether it really lies inside folder
    kept = []
    for path in tqdm(files, desc="leaving out --out", unit=" files", delay=corpora.LISTING_BAR_DELAY, leave=False):
        if os.path.islink(path):
            keep = not Path(os.path.realpath(path)).is_relative_to(folder)
        else:
            parent = os.path.dirname(path)
            if parent not in inside:
                inside[parent] = Path(os.path.realpath(parent)).is_relative_to(folder)
            keep = not inside[parent]
        if keep:
            kept.append(path)
    return kept


OUT_LOCK = ".data_process.lock"


def claim_out(out_dir: Path):
    """An exclusive lock on --out for this run (the open lock file; closing it lets go, and so does the
    kernel when the process dies): two runs writing one folder would delete each other's temporary files.
    Holding it, the MinHash folders of killed runs are removed."""
    lock = open(out_dir / OUT_LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise ValueError(
            f"--out {out_dir} is being written by another data_process run (pid {holder}); "
            "wait for it to finish or give another --out"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    for stale in out_dir.glob(".minhash-*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    return lock


class worker_pool:
    """`encode(function, tasks)`: results in task order; workers=1 runs in this process."""

    def __init__(self, workers, tokenizer, tokenizer_path):
        self.workers, self.tokenizer, self.tokenizer_path, self.pool = workers, tokenizer, tokenizer_path, None

    def __enter__(self):
        global _tokenizer
        _tokenizer = self.tokenizer
        if self.workers <= 1:
            return map
        forked = multiprocessing.get_start_method() == "fork"  # Linux: the workers start with the encoder loaded
        self.pool = multiprocessing.Pool(self.workers, None if forked else _init_worker, (self.tokenizer_path,))
        return lambda function, tasks: self.pool.imap(function, tasks, chunksize=1)

    def __exit__(self, *error):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=PATH_OR_GLOB",
        help="a corpus (repeatable); PATH a file, a folder or a quoted glob; the format comes "
        "from NAME unless --format. Formats: " + ", ".join(sorted(corpora.PRETRAIN_FORMATS)),
    )
    parser.add_argument("--out", required=True, help="output folder: OUT/NAME/ per source")
    parser.add_argument("--format", default=None, help="reader for every --source (default: inferred from NAME)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_DIR), help="tokenizer folder or .model file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--min-chars", type=int, default=MIN_CHARS, help="drop shorter documents (after cleaning)")
    parser.add_argument("--minhash", action="store_true", help="also drop near-duplicates (MinHash + LSH)")
    parser.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (about)")
    parser.add_argument(
        "--unit-mb",
        type=float,
        default=UNIT_MB,
        help="largest work unit in MiB that JSON-lines/CSV/text files are split into (any value gives the same output)",
    )
    parser.add_argument("--force", action="store_true", help="redo sources that are up to date")
    args = parser.parse_args(argv)
    for flag, value, low in (
        ("--workers", args.workers, 1),
        ("--min-chars", args.min_chars, 0),
        ("--shard-tokens", args.shard_tokens, 1),
    ):
        if value < low:
            parser.error(f"{flag} must be >= {low}, not {value}")
    if args.workers > MAX_WORKERS:
        parser.error(f"--workers {args.workers} is more than {MAX_WORKERS} (4 per core)")
    if not (math.isfinite(args.unit_mb) and args.unit_mb * (1 << 20) >= 1):
        parser.error(f"--unit-mb must be a positive size in MiB, not {args.unit_mb}")
    try:
        sources = [corpora.parse_source(spec, args.format) for spec in args.source]
        process_sources(
            sources,
            args.out,
            args.tokenizer,
            args.workers,
            args.min_chars,
            args.minhash,
            args.shard_tokens,
            args.force,
            int(args.unit_mb * (1 << 20)),
        )
    except ValueError as err:
        sys.exit(f"data_process: {err}")
    except OSError as err:  # a missing input, a full or read-only disk
        sys.exit(f"data_process: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""))


if __name__ == "__main__":
    main()
