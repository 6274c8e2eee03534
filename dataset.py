"""Pretraining windows over uint16 token shards, mixed across sources with per-phase weights.

A source is a folder written by data_process.py: every shard its manifest.json lists is
memory-mapped (all of them; never just the first). Each shard keeps its tail as that source's validation
slice. A batch is a pure function of (seed, phase, step): every rank draws the same global batch and
takes its own rows, so DDP, gradient accumulation and resume all see exactly the rows a single process would, with no
DistributedSampler and no iterator state to save (sequential mode saves its cursors).
"""

from pathlib import Path

import numpy as np
import torch

from corpora import json_loads


def global_rows(micro_step, rank, world, batch_size):
    """Rows of the step's global batch that a (micro_step, rank) pair trains on."""
    start = (micro_step * world + rank) * batch_size
    return slice(start, start + batch_size)


class DataError(ValueError):
    """Token data that cannot be trained on: the message names the folder or file and what to do."""


def read_manifest(directory):
    """A token folder's manifest.json, checked: every shard a plain file name inside the folder (a manifest
    is data: it may not point training at ../../anything)."""
    manifest_path = directory / "manifest.json"
    # data_process.py writes the manifest last: without it the folder is incomplete (or not ours)
    if not manifest_path.is_file():
        raise DataError(
            f"{directory}: no manifest.json, so no complete data_process.py output: run it (again) for this source"
        )
    try:
        manifest = json_loads(manifest_path.read_text(encoding="utf-8"))
        shards = manifest["shards"]
        files = [(str(shard["file"]), int(shard["tokens"])) for shard in shards]
        tokenizer_sha256 = manifest["tokenizer"]["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{manifest_path} is not a data_process.py manifest ({type(err).__name__}: {err}): "
            "re-run data_process.py for this source"
        ) from None
    for name, _ in files:
        if Path(name).name != name or name in (".", "..") or not name:
            raise DataError(f"{manifest_path}: shard {name!r} is not a file name inside {directory}: refused")
    return manifest, files, tokenizer_sha256


class TokenSource:
    """All shards of one source. Windows are seq_len + 1 tokens (inputs and shifted targets) and never
    cross a shard boundary; the last `val_fraction` of each shard (at least one window) is held out.
    vocab_size: refuse ids the model cannot embed (from the manifest's max_token_id, or a scan of the
    shards when an older manifest lacks it)."""

    def __init__(self, directory, seq_len, val_fraction=0.01, vocab_size=None):
        directory = Path(directory)
        self.name = directory.name
        self.window = seq_len + 1
        manifest, files, self.tokenizer_sha256 = read_manifest(directory)
        self.shards, train_windows, self.val_slices, self.too_small = [], [], [], []
        max_ids = []
        for (name, n_tokens), shard in zip(files, manifest["shards"]):
            path = directory / name
            if not path.is_file() or path.stat().st_size != 2 * n_tokens:
                raise DataError(
                    f"{path}: missing, or not the {n_tokens:,} tokens manifest.json records: re-run "
                    "data_process.py for this source"
                )
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            if vocab_size is not None:
                max_ids.append(int(shard["max_token_id"]) if "max_token_id" in shard else int(tokens.max(initial=0)))
            n_val = max(self.window, int(len(tokens) * val_fraction))
            if len(tokens) < self.window + n_val:  # not enough for a train window and a val window
                self.too_small.append(path.name)
                n_val = 0
                if len(tokens) < self.window:
                    continue
            self.shards.append(tokens)
            train_windows.append(len(tokens) - n_val - self.window + 1)
            self.val_slices.append((len(self.shards) - 1, len(tokens) - n_val, len(tokens)))
        if vocab_size is not None and max_ids and max(max_ids) >= vocab_size:
            raise DataError(
                f"{directory}: token id {max(max_ids)} is beyond the model's vocabulary ({vocab_size} ids): "
                "these shards were made with a larger tokenizer; re-run data_process.py with the "
                "model's --tokenizer, or raise vocab_size"
            )
        if not self.shards:
            raise DataError(f"{directory}: no .bin shard holds a window of {self.window} tokens")
        self.cumulative = np.cumsum(train_windows)  # window index -> shard by searchsorted

    @property
    def n_tokens(self):
        return sum(len(s) for s in self.shards)

    @property
    def n_train_windows(self):
        return int(self.cumulative[-1])

    def train_window(self, index):
        shard = int(np.searchsorted(self.cumulative, index, side="right"))
        offset = int(index - (self.cumulative[shard - 1] if shard else 0))
        return self.shards[shard][offset : offset + self.window]

    def val_windows(self, max_windows):
        """Non-overlapping windows of the held-out slices, evenly spread, at most max_windows."""
        starts = [(s, p) for s, lo, hi in self.val_slices for p in range(lo, hi - self.window + 1, self.window)]
        if len(starts) > max_windows:
            starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_windows).astype(int)]
        return [self.shards[s][p : p + self.window] for s, p in starts]


def to_batch(windows):
    """uint16 windows -> (X, Y) int64 tensors, Y shifted by one."""
    rows = torch.from_numpy(np.stack(windows).astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class PretrainData:
    """A weighted mixture of sources for one training phase.

    mixture: {"wiki": 0.3, "baike": 0.3, "medical": 0.4}: folder names under data_dir; weights are
    normalised. sampling "random": each row picks a source by weight and a uniformly random window;
    "sequential": the source is picked the same way but its windows are read in order (epochs wrap),
    which needs the cursors in the checkpoint (state_dict).
    """

    def __init__(
        self,
        data_dir,
        mixture,
        seq_len,
        seed=1337,
        phase=0,
        val_fraction=0.01,
        sampling="random",
        tokenizer_fingerprint=None,
        vocab_size=None,
    ):
        if not mixture:
            raise DataError("empty data mixture")
        missing = [n for n in mixture if not (Path(data_dir) / n).is_dir()]
        if missing:
            raise DataError(f"no token folder for {missing} under {data_dir}: run data_process.py for them first")
        if sampling not in ("random", "sequential"):
            raise DataError(f"sampling must be 'random' or 'sequential', not {sampling!r}")
        self.names = list(mixture)
        weights = np.array([float(mixture[n]) for n in self.names])
        if (weights < 0).any() or weights.sum() <= 0:
            raise DataError(f"mixture weights must be >= 0 with a positive sum: {mixture}")
        self.weights = weights / weights.sum()
        self.sources = [TokenSource(Path(data_dir) / n, seq_len, val_fraction, vocab_size) for n in self.names]
        for src in self.sources:
            if tokenizer_fingerprint and src.tokenizer_sha256 != tokenizer_fingerprint:
                raise DataError(
                    f"{Path(data_dir) / src.name}: tokens made by tokenizer sha256 {src.tokenizer_sha256[:12]}…, "
                    f"but training uses {tokenizer_fingerprint[:12]}…: re-run data_process.py with this --tokenizer"
                )
        self.seed, self.phase, self.sampling, self.vocab_size = seed, phase, sampling, vocab_size
        self.cursors = np.zeros(len(self.sources), dtype=np.int64)  # sequential mode only
        self.next_step = None

    def describe(self):
        return ", ".join(
            f"{n} {w:.0%} ({s.n_tokens:,} tokens)" for n, w, s in zip(self.names, self.weights, self.sources)
        )

    def plan(self, step, n_rows):
        """(source, window index) for each of the step's global rows."""
        rng = np.random.default_rng([self.seed, self.phase, step])
        source = rng.choice(len(self.sources), size=n_rows, p=self.weights)
        sizes = np.array([s.n_train_windows for s in self.sources])
        if self.sampling == "random":
            return source, (rng.random(n_rows) * sizes[source]).astype(np.int64)
        if self.next_step is not None and step != self.next_step:
            raise RuntimeError(f"sequential sampling must be read step by step: expected {self.next_step}, got {step}")
        index = np.empty(n_rows, dtype=np.int64)
        for k in range(len(self.sources)):
            rows = np.flatnonzero(source == k)
            index[rows] = (self.cursors[k] + np.arange(len(rows))) % sizes[k]
            self.cursors[k] += len(rows)
        self.next_step = step + 1
        return source, index

    def train_batches(self, step, micro_steps, batch_size, rank=0, world=1):
        """This rank's micro-batches of step `step`: a list of (X, Y), each (batch_size, seq_len)."""
        source, index = self.plan(step, micro_steps * world * batch_size)
        batches = []
        for m in range(micro_steps):
            rows = global_rows(m, rank, world, batch_size)
            batches.append(to_batch([self.sources[s].train_window(i) for s, i in zip(source[rows], index[rows])]))
            if self.vocab_size is not None and int(batches[-1][0].max()) >= self.vocab_size:  # a manifest that lied
                bad = next(
                    self.names[s]
                    for s, i in zip(source[rows], index[rows])
                    if int(self.sources[s].train_window(i).max()) >= self.vocab_size
                )
                raise DataError(
                    f"{bad}: a token id beyond the model's vocabulary ({self.vocab_size}) at step {step}, "
                    "although manifest.json says otherwise: re-run data_process.py for this source"
                )
        return batches

    def val_batches(self, batch_size, max_windows=64, rank=0, world=1):
        """{source: [(X, Y), ...]} of held-out windows; each rank gets every world-th window."""
        out = {}
        for name, src in zip(self.names, self.sources):
            windows = src.val_windows(max_windows)[rank::world]
            out[name] = [to_batch(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
        return out

    def state_dict(self):
        return {"sampling": self.sampling, "cursors": self.cursors.tolist(), "next_step": self.next_step}

    def load_state_dict(self, state):
        if state and state.get("sampling") == self.sampling == "sequential":
            self.cursors = np.array(state["cursors"], dtype=np.int64)
            self.next_step = state["next_step"]
