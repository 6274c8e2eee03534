"""SentencePiece's BPE ids at twice its speed or more: fast_bpe.c, built with the system C compiler on first use.

    from chatglm_tokenizer import load_encoder
    ids = load_encoder()          # ids.fast: this encoder, or None and ids.fast_unavailable says why
    ids.encode_arrays(texts)      # the same ids either way

load_encoder and load_tokenizer attach it when the model is one fast_bpe.c handles (ChatGLM2's and
train_tokenizer.py's: BPE, identity normalization, byte fallback) and it gives SentencePiece's ids on
probe texts; otherwise SentencePiece encodes. The library is built once per version of fast_bpe.c into
chatglm_tokenizer/build/, or the user's cache where the checkout cannot be written (about a second; an
older version's is removed then); without a compiler (`cc`, or $CC) SentencePiece encodes.
A model is read from SentencePiece's own serialized proto (a few fields of the protobuf wire format,
parsed here: the protobuf package is not a dependency).
"""

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np

from atomic import atomic_write

SOURCE = Path(__file__).with_name("fast_bpe.c")
BUILD = Path(__file__).with_name("build")
# No -march=native: a checkout shared by several machines (NFS on a cluster) runs one build on all of them.
COMPILE = ["-O2", "-shared", "-fPIC"]
ID_LIMIT = (1 << 21) - 1  # fast_bpe.c packs a merge into 64 bits, 21 per id
NORMAL, UNKNOWN, USER_DEFINED, UNUSED, BYTE = 1, 2, 4, 5, 6  # SentencePiece's piece types (3: control)
BPE = 2  # TrainerSpec.model_type
PARALLEL_BYTES = 1 << 20  # a batch smaller than this is encoded on one thread
OUT_FULL = -2  # fast_bpe_encode's answer when the ids do not fit the room given
MAX_TEXT_BYTES = (2**31 - 1 - 3) // 3  # fast_bpe.c's limit (32-bit positions): a longer text goes to SentencePiece
PROBES = (
    "",
    " ",
    "  两个空格  和结尾的空格 ",
    "高血压患者应低盐饮食，每日食盐摄入量不超过5克。",
    "Hello world, it's 2024! naïve café 3.14159",
    "emoji 😀👍🏽 ∑∫√ ＡＢＣ１２３ 日本語のテキスト、한국어",
    "\t\n\r\x00\x7f\u3000\u2581 \ufffd\uffff",
)


@functools.cache
def code_version() -> str:
    """Names what BUILD holds for this code (library and tables), so a change to either file replaces them."""
    return hashlib.sha256(SOURCE.read_bytes() + Path(__file__).read_bytes() + " ".join(COMPILE).encode()).hexdigest()[
        :12
    ]


def compiler() -> str | None:
    """The C compiler: $CC, else cc; None when there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def build_folders() -> list[Path]:
    """Where the library and tables are looked for, and built in the first that can be written: the
    checkout's build/, else the user's cache ($XDG_CACHE_HOME or ~/.cache), for a checkout that cannot be
    written (a read-only container image, a shared install)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return [BUILD] + ([] if cache.startswith("~") else [Path(cache) / "mini-chinese-gpt" / "fast_bpe"])


def writable_folder() -> Path:
    """The first of build_folders that can be written (made if need be); OSError says why none can."""
    failures = []
    for folder in build_folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
            return folder
        except OSError as err:
            failures.append(f"{folder}: {err.strerror or err}")
    raise OSError("no folder to build in (" + "; ".join(failures) + ")")


def install(name: str, write) -> Path:
    """write(tmp) as `name` in the first build folder that can be written, atomically, then remove what
    an older version of this code left there (the same kind of file, named by another code_version)."""
    folder = writable_folder()
    atomic_write(folder / name, write, concurrent=True)
    kind, suffix = name.split("-")[0], Path(name).suffix
    for older in folder.glob(f"{kind}-*{suffix}"):  # a process that loaded an older library keeps it while it runs
        if not older.name.startswith(f"{kind}-{code_version()}"):
            older.unlink(missing_ok=True)
    return folder / name


def build_library() -> Path:
    """The shared library for this fast_bpe.c (built now unless it already is); OSError says why not."""
    name = f"fast_bpe-{code_version()}.so"
    for folder in build_folders():
        if (folder / name).is_file():
            return folder / name
    if compiler() is None:
        raise OSError(f"no C compiler ({os.environ.get('CC', 'cc')}) to build {SOURCE.name}")

    def compile_into(tmp):
        done = subprocess.run([compiler(), *COMPILE, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"{compiler()} could not build {SOURCE.name}: {' '.join(done.stderr.split())[-300:]}")

    return install(name, compile_into)


_library = None


def load_library() -> ctypes.CDLL:
    global _library
    if _library is None:
        lib = ctypes.CDLL(str(build_library()))  # a CDLL call releases the GIL: threads encode in parallel
        pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        lib.fbpe_new.restype = pointer
        lib.fbpe_new.argtypes = [i32, pointer, pointer, i32, pointer, pointer, pointer, pointer, i32]
        lib.fbpe_new.argtypes += [i32, pointer, pointer, i32, pointer, i32]
        lib.fbpe_free.argtypes = [pointer]
        lib.fbpe_encode.restype = i64
        lib.fbpe_encode.argtypes = [pointer, ctypes.c_char_p, pointer, i64, pointer, i64, pointer]
        _library = lib
    return _library


# ---------------------------------------------------------------- the model, from its serialized proto


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def proto_fields(data: bytes) -> list[tuple[int, object]]:
    """(field number, value) of a protobuf message: an int for a varint, bytes otherwise."""
    fields, at = [], 0
    while at < len(data):
        key, at = _varint(data, at)
        wire = key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 2:
            size, at = _varint(data, at)
            value, at = data[at : at + size], at + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, at = data[at : at + size], at + size
        else:
            raise ValueError(f"protobuf wire type {wire} is not in a SentencePiece model")
        fields.append((key >> 3, value))
    return fields


def read_model(serialized: bytes) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """(pieces as (piece, score, type), trainer spec, normalizer spec) with SentencePiece's defaults
    for the fields fast_bpe.c depends on."""
    pieces = []
    trainer = {"model_type": 1, "treat_whitespace_as_suffix": 0, "byte_fallback": 0}
    normalizer = {
        "precompiled_charsmap": b"",
        "add_dummy_prefix": 1,
        "remove_extra_whitespaces": 1,
        "escape_whitespaces": 1,
    }
    trainer_fields = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback"}
    normalizer_fields = {
        2: "precompiled_charsmap",
        3: "add_dummy_prefix",
        4: "remove_extra_whitespaces",
        5: "escape_whitespaces",
    }
    for number, value in proto_fields(serialized):
        if number == 1:
            piece, score, kind = "", 0.0, NORMAL
            for field, item in proto_fields(value):
                if field == 1:
                    piece = item.decode("utf-8")
                elif field == 2:
                    score = struct.unpack("<f", item)[0]
                elif field == 3:
                    kind = item
            pieces.append((piece, score, kind))
        elif number in (2, 3):
            spec, names = (trainer, trainer_fields) if number == 2 else (normalizer, normalizer_fields)
            for field, item in proto_fields(value):
                if field in names:
                    spec[names[field]] = item
    return pieces, trainer, normalizer


def unsupported(pieces, trainer, normalizer) -> str | None:
    """Why fast_bpe.c would not give this model's ids, or None."""
    if trainer["model_type"] != BPE:
        return "not a BPE model"
    if trainer["treat_whitespace_as_suffix"]:
        return "treat_whitespace_as_suffix"
    if normalizer["precompiled_charsmap"]:
        return "a normalization rule (fast_bpe.c reads identity models)"
    if normalizer["remove_extra_whitespaces"] or not normalizer["escape_whitespaces"]:
        return "whitespace handling other than train_tokenizer.py's"
    kinds = {kind for _, _, kind in pieces}
    if kinds & {USER_DEFINED, UNUSED}:
        return "user-defined or unused pieces"
    normal = {piece for piece, _, kind in pieces if kind == NORMAL}
    if any(len(piece) < 2 or piece in normal for piece, _, kind in pieces if kind != NORMAL):
        return "a control, unknown or byte piece that text could spell"
    if [kind for _, _, kind in pieces].count(UNKNOWN) != 1:
        return "not exactly one <unk>"
    if len(pieces) + len({ch for piece in normal for ch in piece}) >= ID_LIMIT:
        return "too many pieces"
    return None


def model_tables(serialized: bytes) -> dict:
    """What fast_bpe.c needs of a model, as arrays ("why" instead when it cannot encode it), cached
    in the build folder per model and version of this code: building them takes 0.3 s, loading them 5 ms."""
    name = f"tables-{code_version()}-{hashlib.sha256(serialized).hexdigest()[:16]}.npz"
    for folder in build_folders():
        with contextlib.suppress(OSError, ValueError, EOFError, zipfile.BadZipFile):
            with np.load(folder / name, allow_pickle=False) as saved:
                return dict(saved)
    pieces, trainer, normalizer = read_model(serialized)
    why = unsupported(pieces, trainer, normalizer)
    tables = {"why": np.array(why)} if why else build_tables(pieces, trainer, normalizer)

    def save(tmp):
        with open(tmp, "wb") as f:  # a file, not a name: np.savez would add ".npz" to the temporary name
            np.savez(f, **tables)

    with contextlib.suppress(OSError):  # nowhere to keep them: built again next time
        install(name, save)
    return tables


def build_tables(pieces, trainer, normalizer) -> dict:
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
    symbols = dict(ids)  # a character inside pieces that is not a piece itself gets an id of its own
    for piece in ids:
        for char in piece:
            if char not in symbols:
                symbols[char] = len(pieces) + len(symbols) - len(ids)
    chars = [(ord(symbol), i) for symbol, i in symbols.items() if len(symbol) == 1]
    merges = [  # every split of every piece into two symbols, so a pair's lookup is the string's
        (symbols[piece[:k]], symbols[piece[k:]], i)
        for piece, i in ids.items()
        for k in range(1, len(piece))
        if piece[:k] in symbols and piece[k:] in symbols
    ]
    inner = sorted({(symbols[a], symbols[b]) for piece in ids for a, b in zip(piece, piece[1:])})
    bytes_ = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == BYTE}
    words = [piece.replace("\u2581", " ") for piece in ids]
    return {
        "chars": np.array(chars, np.int32).reshape(-1, 2),
        "merges": np.array(merges, np.int32).reshape(-1, 3),
        "inner": np.array(inner, np.int32).reshape(-1, 2),
        "scores": np.array([score for _, score, _ in pieces], np.float32),
        "unk": np.array(next(i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN)),
        "byte_ids": np.array(
            [bytes_[f"<0x{b:02X}>"] for b in range(256)] if trainer["byte_fallback"] else [], np.int32
        ),
        "dummy_prefix": np.array(int(bool(normalizer["add_dummy_prefix"]))),
        # texts both encoders must agree on before this one is used: PROBES and runs of the model's pieces
        "probes": np.array([*PROBES, *("".join(words[start::7][:400]) for start in range(7))]),
    }


class FastBPE:
    """The encoder for one model (see fast_bpe.c); `encode` gives SentencePiece's ids."""

    def __init__(self, tables: dict, sentencepiece):
        self.tables, self.sentencepiece, self.lib = tables, sentencepiece, load_library()
        chars, merges, inner = tables["chars"], tables["merges"], tables["inner"]
        columns = [np.ascontiguousarray(table[:, k]) for table, k in ((chars, 0), (chars, 1), (merges, 0))]
        columns += [
            np.ascontiguousarray(table[:, k]) for table, k in ((merges, 1), (merges, 2), (inner, 0), (inner, 1))
        ]
        points, char_ids, lefts, rights, merged, inner_lefts, inner_rights = map(_address, columns)
        byte_ids = tables["byte_ids"]
        self.model = self.lib.fbpe_new(
            len(chars),
            points,
            char_ids,
            len(merges),
            lefts,
            rights,
            merged,
            _address(tables["scores"]),
            len(tables["scores"]),
            len(inner),
            inner_lefts,
            inner_rights,
            int(tables["unk"]),
            _address(byte_ids) if len(byte_ids) else None,
            int(tables["dummy_prefix"]),
        )
        if not self.model:
            raise MemoryError("fast_bpe: no memory for the model's tables")

    def __getstate__(self):  # a pickled or copied tokenizer (DataLoader workers, deepcopy) builds its own
        return {"tables": self.tables, "sentencepiece": self.sentencepiece}

    def __setstate__(self, state):
        self.__init__(state["tables"], state["sentencepiece"])

    def __del__(self):
        if getattr(self, "model", None):
            self.lib.fbpe_free(self.model)
            self.model = None

    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """UTF-8 bytes (or str) -> (all ids back to back as int32, ids per text as int64)."""
        data = [text.encode("utf-8") if isinstance(text, str) else text for text in texts]
        if data and max(map(len, data)) > MAX_TEXT_BYTES:
            ids = self.sentencepiece.encode(data, out_type="numpy")
            return np.concatenate(ids), np.array([len(text) for text in ids], np.int64)
        offsets = np.zeros(len(data) + 1, np.int64)
        np.cumsum([len(text) for text in data], out=offsets[1:])
        lengths = np.empty(len(data), np.int64)
        joined = b"".join(data)
        # Room for an id per input byte: text never gives more ids than that unless its normalized
        # form grows (spaces and bad bytes become 3-byte characters) and falls back to bytes; then
        # again with the bound that always holds.
        for room in (len(joined) + 3 * len(data), 3 * len(joined) + 3 * len(data)):
            out = np.empty(room, np.int32)
            args = (_address(offsets), len(data), _address(out), room, _address(lengths))
            total = self.lib.fbpe_encode(self.model, joined, *args)
            if total != OUT_FULL:
                break
        if total < 0:
            raise MemoryError("fast_bpe: no memory to encode a batch")
        return out[:total].copy(), lengths

    def encode_parallel(self, texts, num_threads) -> tuple[np.ndarray, np.ndarray]:
        """encode() over num_threads threads (-1: one per core) for a batch worth it."""
        texts = list(texts)
        threads = (os.cpu_count() or 1) if num_threads < 1 else num_threads
        if threads == 1 or len(texts) < 2 or sum(map(len, texts)) < PARALLEL_BYTES:
            return self.encode(texts)
        bounds = np.linspace(0, len(texts), min(threads, len(texts)) + 1).astype(int)
        with concurrent.futures.ThreadPoolExecutor(len(bounds) - 1) as pool:
            parts = list(pool.map(self.encode, [texts[a:b] for a, b in zip(bounds, bounds[1:])]))
        return np.concatenate([ids for ids, _ in parts]), np.concatenate([lengths for _, lengths in parts])


def _address(array: np.ndarray):
    return array.ctypes.data_as(ctypes.c_void_p)


def attach(encoder) -> None:
    """Give a SentencePieceIds `fast` (a FastBPE for its model) or `fast_unavailable` (why not)."""
    try:
        tables = model_tables(encoder.sp.serialized_model_proto())
        if "why" in tables:
            raise ValueError(f"the model has {tables['why']}")
        fast = FastBPE(tables, encoder.sp)
        texts = tables["probes"].tolist()
        ids, lengths = fast.encode(texts)
        expected = encoder.sp.encode(texts, out_type=int)
        if ids.tolist() != [i for text in expected for i in text] or lengths.tolist() != list(map(len, expected)):
            raise ValueError("its ids differ from SentencePiece's on a probe text")
    except (OSError, ValueError, MemoryError) as err:
        encoder.fast, encoder.fast_unavailable = None, f"fast BPE encoder not used: {err}"
        return
    encoder.fast, encoder.fast_unavailable = fast, None
