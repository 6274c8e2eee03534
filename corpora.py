"""The registry of dataset formats: raw files -> documents, dialogues, multiple-choice questions, image
conversations or preference pairs.

    source = parse_source("wiki=data/raw/wiki")             # format inferred from the name
    problems = Problems()
    for text in iter_texts(source, problems): ...          # pretraining documents (raw, not cleaned)
    for turns in iter_dialogues(source, problems): ...     # SFT: [(prompt, answer), ...]
    for q in iter_questions(source, problems): ...         # evaluation: {"question", "options", "answer", ...}
    for d in iter_image_dialogues(source, problems): ...   # vision-language: ImageDialogue(turns, images, ...)
    for pair in iter_preferences(source, problems): ...    # DPO: {"history", "prompt", "chosen", "rejected"}
    print(problems.summary())                              # what was skipped, why, where (file:line)

Three layers, top to bottom:
  1. containers: JSON lines, JSON arrays (streamed with ijson), CSV (real quoting), plain text, XML
     (one element per record, streamed, entity declarations refused), PDF (the text of each page),
     Parquet (pyarrow); transparent .gz; the encoding decided per line (UTF-8, UTF-8 with BOM, GB18030:
     LineDecoder), a record with a line that is neither skipped and counted, never kept garbled.
  2. readers: one short generator per dataset, record -> text / turns / question / preference pair. A reader
     raises BadRecord for a record it cannot use and may `yield Skipped(...)` for a part it leaves out.
  3. iter_texts / iter_dialogues / iter_questions / iter_image_dialogues / iter_preferences: a source's files
     through its reader.
Bad input never stops a long run: it is counted in Problems with its location, and reading goes on.
Nothing here knows about tokens; each reader's docstring names its record layout, and data/sample/
holds a small file of each.
"""

import bisect
import codecs
import collections
import csv
import fnmatch
import functools
import glob
import gzip
import html.entities
import io
import itertools
import json
import os
import re
import unicodedata
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Callable, Iterator
from xml.parsers import expat

import ijson
import numpy as np
from tqdm import tqdm

SNIFF_BYTES = 1 << 16  # how much of a file's first non-ASCII text gives its encoding ...
PRIOR_SCAN_BYTES = 1 << 26  # ... looked for this far into a file whose head is ASCII
STRONG_UTF8_BYTES = 16  # a valid UTF-8 line with this many extra bytes of multi-byte characters is UTF-8
LINE_PIECE = 1 << 20  # a JSON array line longer than this is decoded piece by piece
LINE_BLOCK = 1 << 18  # lines are read and decoded this many bytes at a time (one decode call, not one per line)
MAX_LINE_BYTES = 64 << 20  # a longer line of a line-based file is skipped unread: decoded and parsed, a line
# takes about ten times its size in memory, and no JSON-lines record, CSV row or text line is this long
XML_CHUNK_BYTES = 1 << 16  # XML is parsed in chunks of this many bytes: the records finished in one are held at once
SKIP_BYTES = 1 << 20  # an XML span's reading passes over the bytes before its start this many at a time
MAX_EXAMPLES = 3  # examples kept per problem reason
csv.field_size_limit(1 << 30)  # medical answers can exceed csv's 128 KiB default per field


# ---------------------------------------------------------------- sources and problems


@dataclass
class Source:
    """A named corpus: which reader (format) and which files. `location` is the PATH_OR_GLOB as given."""

    name: str
    format: str
    files: list[Path]
    location: str = ""


@dataclass
class Span:
    """A byte range [start, end) of one file that starts at a record start (see split_source); first_line
    is the number of the line at start (in a JSON array, the index of the item at start: its records are
    numbered so). The records that start in the span are its own. A CSV row that starts in it but runs
    past `end` (the split's quote count was fooled, e.g. by a stray quote in an unquoted field) is read
    whole, and so is the rest of the file; a JSON array or XML file malformed in the span is read no
    further, and the rest of the file is skipped, as reading the whole file does; an XML span whose end
    the bytes placed wrongly reads on (see iter_xml). Either way the reader sets read_to_end, and the
    file's later spans must be dropped. An XML file's last span has it set from the start: it reads to
    the end of the file, whatever its size (a gzipped file's is known modulo 4 GiB)."""

    start: int
    end: int | None  # None: the end of the file
    first_line: int
    read_to_end: bool = False


class Problems:
    """What reading left out, by reason: `counts`, records (or whole files) skipped; `parts`, parts left
    out of records that were read (a reader's Skipped notes: a trailing question without an answer, a
    page without text), so a record is counted once however many of its parts were dropped. `records`:
    how many records were met in the files (given to a reader, or skipped unparsed). Plus the first few
    examples of each reason as "file:line: reason (detail)"; `line` is a line number, "#N" for the N-th
    item of a JSON array, or None when the problem concerns a whole file."""

    def __init__(self):
        self.counts = Counter()
        self.parts = Counter()
        self.records = 0
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, file, line=None, detail: str = "", count: int = 1, part: bool = False):
        """count > 1 records a bulk drop (e.g. all duplicates of one work unit) under one example; part=True a
        part left out of a record that is otherwise read."""
        (self.parts if part else self.counts)[reason] += count
        detail = detail.strip().split("\n", 1)[0]  # one line: yajl's messages draw a caret diagram below theirs
        examples = self._examples.setdefault(reason, [])
        example = (
            (f"{file}:{line}" if line is not None else f"{file}") + f": {reason}" + (f" ({detail})" if detail else "")
        )
        if len(examples) < MAX_EXAMPLES and example not in examples:
            examples.append(example)

    def skip_record(self, reason: str, file, line, detail: str = ""):
        """A record met in a file that no reader gets (undecodable, malformed): counted as read and skipped."""
        self.records += 1
        self.add(reason, file, line, detail)

    @staticmethod
    def _ranked(counter: Counter) -> dict[str, int]:
        """Most first, ties by reason: one order however the records were cut into work units."""
        return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))

    @property
    def skipped(self) -> dict[str, int]:
        return self._ranked(self.counts)

    @property
    def parts_left_out(self) -> dict[str, int]:
        return self._ranked(self.parts)

    @property
    def examples(self) -> list[str]:
        """Each reason's first examples, reasons in the order of skipped, then of parts_left_out."""
        return [example for reason in {**self.skipped, **self.parts_left_out} for example in self._examples[reason]]

    @property
    def total(self) -> int:
        """Records (or files) skipped; parts left out of records are not counted here."""
        return sum(self.counts.values())

    def merge(self, other: "Problems"):
        self.counts.update(other.counts)
        self.parts.update(other.parts)
        self.records += other.records
        for reason, examples in other._examples.items():
            mine = self._examples.setdefault(reason, [])
            mine.extend([e for e in examples if e not in mine][: MAX_EXAMPLES - len(mine)])

    def summary(self) -> str:
        if not self.counts and not self.parts:
            return "no records skipped"
        lines = [f"skipped {self.total:,}:"] if self.counts else []
        lines += [f"  {count:>10,}  {reason}" for reason, count in self.skipped.items()]
        if self.parts:
            lines += [f"parts of records left out {sum(self.parts.values()):,}:"]
            lines += [f"  {count:>10,}  {reason}" for reason, count in self.parts_left_out.items()]
        lines += ["first examples:"] + [f"  {example}" for example in self.examples]
        return "\n".join(lines)


class BadRecord(Exception):
    """Raised by a reader for a record it cannot use; counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Skipped:
    """Yielded by a reader for a part of a record it leaves out (the rest of the record is kept)."""

    reason: str
    detail: str = ""


# ---------------------------------------------------------------- containers

UNDECODABLE = "undecodable bytes (neither UTF-8 nor GB18030), record skipped"
# GB18030 decodes Big5 (and other double-byte encodings) without error but into this Private Use Area, which
# real GB text does not use: a line that reads into it is not GB18030
PRIVATE_USE = re.compile("[\ue000-\uf8ff]")


def detect_encoding(prefix: bytes) -> str:
    """UTF-8 (with or without BOM) or GB18030, from a stretch of a file. UTF-8 wins when it decodes
    with no errors, or with a few stray bad bytes among many valid multi-byte characters: its structure
    is strict, so GB text read as UTF-8 fails about every other character, whereas GB18030 happily
    "decodes" most UTF-8 (as mojibake) and must only win on a clearly better score."""
    if prefix.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    as_utf8 = _lenient(prefix, "utf-8")
    errors = as_utf8.count("\ufffd")
    valid_multibyte = sum(1 for char in as_utf8 if char > "\x7f") - errors
    if errors == 0 or errors * 100 < valid_multibyte:
        return "utf-8"
    return "gb18030" if _lenient(prefix, "gb18030").count("\ufffd") < errors else "utf-8"


def _lenient(data: bytes, encoding: str) -> str:
    return codecs.getincrementaldecoder(encoding)("replace").decode(data, final=False)  # a cut last char is fine


def _strict(data: bytes, encoding: str, final: bool = True) -> str | None:
    try:
        return codecs.getincrementaldecoder(encoding)().decode(data, final)
    except UnicodeDecodeError:
        return None


def _strict_gb18030(data: bytes, final: bool = True) -> str | None:
    """data as GB18030, or None: invalid, or read into the Private Use Area (Big5 and the like)."""
    text = _strict(data, "gb18030", final)
    return None if text is None or PRIVATE_USE.search(text) else text


def open_binary(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def file_encoding(path) -> str:
    """The encoding the file's first non-ASCII text shows (sniffed within its first PRIOR_SCAN_BYTES).
    It only settles lines that are valid in both encodings (see LineDecoder). Cached per file version:
    every work unit of a split file asks."""
    stat = os.stat(path)
    return _file_encoding(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_encoding(path: str, size: int, mtime_ns: int) -> str:
    with open_binary(path) as f:
        head = f.read(SNIFF_BYTES)
        scanned = len(head)
        while head.isascii() and scanned < PRIOR_SCAN_BYTES:  # ASCII tells nothing: sniff from the first
            block = f.read(1 << 20)  # line that holds something else
            if not block:
                break
            scanned += len(block)
            first = re.search(rb"[\x80-\xff]", block)
            if first:
                head = block[block.rfind(b"\n", 0, first.start()) + 1 :]
                head += f.read(max(0, SNIFF_BYTES - len(head)))
    return vote_encoding(head) or detect_encoding(head)


def vote_encoding(head: bytes) -> str | None:
    """UTF-8 or GB18030 by a vote of the non-ASCII lines that decode in one of them (None: no line does).
    GB text is practically never valid UTF-8, while short UTF-8 lines often are valid GB18030, so a line
    valid as UTF-8 votes UTF-8: a UTF-8 file with a few GB18030 lines stays UTF-8, and its UTF-8 lines are
    not read as GB18030 mojibake. (A BOM is valid UTF-8: such a file votes UTF-8.)"""
    lines = head.split(b"\n")
    utf8 = gb = 0
    for index, line in enumerate(lines):
        if line.isascii():
            continue
        whole = index < len(lines) - 1  # the last may be cut inside a character
        if _strict(line, "utf-8", whole) is not None:
            utf8 += 1
        elif _strict_gb18030(line, whole) is not None:
            gb += 1
    if not utf8 and not gb:
        return None
    return "utf-8" if utf8 >= gb else "gb18030"


class LineDecoder:
    """Decides the encoding of every line on its own, so that one odd line cannot garble a file and a
    file whose head is ASCII is still read right:
      valid UTF-8    -> UTF-8, when the file is UTF-8, or the line has STRONG_UTF8_BYTES extra bytes of
                        multi-byte characters (GB text is practically never that long valid UTF-8), or
                        the line is not valid GB18030;
      valid GB18030  -> GB18030, unless the file is UTF-8 and the line mostly reads as UTF-8 (a UTF-8
                        line with a few bad bytes, whose GB18030 reading would be mojibake);
      anything else  -> None: the caller skips the record and counts it.
    No multi-byte character of either encoding holds b"\n", so a line is a safe unit. The file's
    encoding (file_encoding) settles only lines valid in both, and never changes while reading: every
    byte range of a file decodes as it does in the whole file."""

    def __init__(self, encoding: str):  # the file's, from file_encoding
        self.utf8 = encoding.startswith("utf-8")

    def decode(self, raw: bytes) -> str | None:
        if self.utf8:
            try:
                return raw.decode("utf-8")  # the common case, at full speed
            except UnicodeDecodeError:
                pass
        encoding = self.choose(raw)
        return raw.decode(encoding) if encoding else None

    def decode_block(self, block: bytes, marker: str = "\ufffd") -> tuple[str, list[int]]:
        """Whole lines, each decoded as decode() decodes it, a stretch of lines per call where that gives
        the same text: in a UTF-8 file, a block that is all valid UTF-8; in a GB18030 file, the valid
        GB18030 between the lines that are also valid UTF-8 with multi-byte characters (which decode()
        may read as UTF-8: they are decided one by one). Returns the text and the indices of the
        undecodable lines, which read as _with_replacements, with marker for U+FFFD."""
        if self.utf8:
            try:
                return block.decode("utf-8"), []
            except UnicodeDecodeError:
                pass
        else:
            try:
                pieces, done = [], 0
                for line in UTF8_MULTIBYTE_LINE.finditer(b"\n" + block):  # its offsets are one more than block's
                    start, end = line.start(1) - 1, line.end(1) - 1
                    pieces += [block[done:start].decode("gb18030"), self.decode(block[start:end])]
                    done = end
                text = "".join(pieces) + block[done:].decode("gb18030")
                if not PRIVATE_USE.search(text):
                    return text, []
            except UnicodeDecodeError:
                pass
        lines, bad = [], []
        for index, raw in enumerate(io.BytesIO(block)):  # lines end at b"\n" only
            line = self.decode(raw)
            if line is None:
                bad.append(index)
                line = PRIVATE_USE.sub(marker, _with_replacements(raw).replace("\ufffd", marker))
            lines.append(line)
        return "".join(lines), bad

    def choose(self, raw: bytes, final: bool = True) -> str | None:
        """The encoding of a line, or of the first piece of a long one (final=False: it may end inside a
        character)."""
        as_utf8 = _strict(raw, "utf-8", final)
        if as_utf8 is not None and (self.utf8 or len(raw) - len(as_utf8) >= STRONG_UTF8_BYTES):
            return "utf-8"
        if _strict_gb18030(raw, final) is None:
            return "utf-8" if as_utf8 is not None else None
        if as_utf8 is None and self.utf8 and _mostly_utf8(raw):
            return None
        return "gb18030"


# After a newline, a line of valid UTF-8 that holds at least one multi-byte character (RFC 3629's
# well-formed sequences); the pattern starts with the newline so that the search jumps from line to line.
UTF8_MULTIBYTE_LINE = re.compile(
    rb"\n([\x00-\x09\x0b-\x7f]*(?:(?:[\xc2-\xdf]|\xe0[\xa0-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]|\xed[\x80-\x9f]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]|[\xf1-\xf3][\x80-\xbf]{2}|\xf4[\x80-\x8f][\x80-\xbf])[\x80-\xbf][\x00-\x09\x0b-\x7f]*)+)"
    rb"(?=\n|\Z)"
)


def _mostly_utf8(raw: bytes) -> bool:
    """At least 4 valid UTF-8 multi-byte characters per undecodable byte. GB18030 text read as UTF-8
    fails on most characters (at most 3 valid per error, measured on 1-30 character lines)."""
    text = raw.decode("utf-8", "replace")
    errors = text.count("\ufffd")
    non_ascii = len(text) - len(text.encode("ascii", "ignore"))
    return non_ascii - errors >= 4 * errors


def _with_replacements(raw: bytes) -> str:
    """An undecodable line in the encoding it looks most like, U+FFFD for its bad bytes; ASCII bytes stay
    themselves in either encoding."""
    return raw.decode(detect_encoding(raw), "replace")


def line_blocks(path, span: Span | None = None) -> Iterator[bytes | None]:
    """The file (or the span's range) as blocks of whole lines, growing from SNIFF_BYTES to LINE_BLOCK
    bytes (a reader that wants only the first lines reads little); the UTF-8 BOM at the start of a file
    removed. A line of more than MAX_LINE_BYTES is never held whole: None stands for it. Blocks are read
    with read1, so a truncated .gz yields every block before the damage, then raises."""
    start, end = (span.start, span.end) if span else (0, None)
    with open_binary(path) as f:
        f.seek(start)
        position, rest, size = start, bytearray(), SNIFF_BYTES  # bytearray: a long line grows in place
        overlong = False  # inside a line of more than MAX_LINE_BYTES, whose bytes are dropped as they come
        while end is None or position < end:
            data = f.read1(size if end is None else min(size, end - position))
            if not data:
                break
            rest += data.removeprefix(codecs.BOM_UTF8) if position == 0 else data
            position, size = position + len(data), min(2 * size, LINE_BLOCK)
            cut = rest.rfind(b"\n", max(0, len(rest) - len(data))) + 1  # the bytes before this read hold no newline
            if overlong:
                if not cut:
                    rest.clear()
                    continue
                yield None
                del rest[: rest.find(b"\n") + 1]
                overlong, cut = False, rest.rfind(b"\n") + 1
            if cut:
                yield from _overlong_lines_as_none(bytes(rest[:cut]))
                del rest[:cut]
            if len(rest) > MAX_LINE_BYTES:
                overlong = True
                rest.clear()
        if overlong:
            yield None
        elif rest:
            yield from _overlong_lines_as_none(bytes(rest))


def _overlong_lines_as_none(block: bytes) -> Iterator[bytes | None]:
    """The block, with None for each of its lines of more than MAX_LINE_BYTES (only so long a block can
    hold one: a line's first MAX_LINE_BYTES bytes and one more read)."""
    if len(block) <= MAX_LINE_BYTES:
        yield block
        return
    done = start = 0  # done: the end of what was yielded; start: of the line looked at
    while start < len(block):
        end = block.find(b"\n", start) + 1 or len(block)
        if end - start > MAX_LINE_BYTES:
            if done < start:
                yield block[done:start]
            yield None
            done = end
        start = end
    if done < len(block):
        yield block[done:]


OVERLONG_LINE = f"line of more than {MAX_LINE_BYTES >> 20} MiB, record skipped"


def decoded_blocks(path, span: Span | None = None) -> Iterator[tuple[str, dict[int, str], int]]:
    """(text, {index of a line: why its record is skipped}, its line count) per line block, each line
    decoded on its own by LineDecoder's rule (see LineDecoder.decode_block). A line of more than
    MAX_LINE_BYTES reads as one empty line."""
    decoder = LineDecoder(file_encoding(path))
    for block in line_blocks(path, span):
        if block is None:
            yield "\n", {0: OVERLONG_LINE}, 1
            continue
        text, bad = decoder.decode_block(block)
        yield text, dict.fromkeys(bad, UNDECODABLE), block.count(b"\n") + (not block.endswith(b"\n"))


def read_lines(path, problems: Problems, span: Span | None = None) -> Iterator[tuple[int, str, str | None]]:
    """(line number, line with its line ending, problem). A line LineDecoder cannot decode comes with
    problem UNDECODABLE and U+FFFD for its bad bytes (quotes, commas and newlines intact, so a CSV row
    keeps its shape), a line of more than MAX_LINE_BYTES as an empty line with problem OVERLONG_LINE: the
    caller skips the record that holds it and counts it under that reason. With a span, only that byte
    range is read (see split_source)."""
    lineno = span.first_line if span else 1
    try:
        for text, bad, count in decoded_blocks(path, span):
            for index, line in enumerate(io.StringIO(text, newline="\n")):  # lines end at "\n" only
                yield lineno + index, line, bad.get(index)
            lineno += count
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        problems.add("truncated or corrupt gzip file", path, lineno, str(err))


LONE_SURROGATE = "lone surrogate escape in a JSON string (\\ud800-\\udfff without its pair), record skipped"
SURROGATES = re.compile(r"[\ud800-\udfff]")


def holds_surrogate(value) -> bool:
    """Whether a string of a parsed JSON value holds a UTF-16 surrogate. Python's json decodes an escape
    such as \\ud83d that lacks its pair (web text cut inside an emoji) to one; such text cannot be
    written as UTF-8, so one record would stop a whole run where its text is encoded."""
    pending = [value]  # a loop, not recursion: a record may nest as deep as json.loads allows
    while pending:
        item = pending.pop()
        if isinstance(item, str) and SURROGATES.search(item):
            return True
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item
    return False


def json_loads(text):
    """json.loads for text from a file or a request, where every kind of malformed JSON is a JSONDecodeError:
    json.loads raises RecursionError for JSON nested deeper than Python's recursion limit and a plain
    ValueError for an integer of more than 4,300 digits, and either would stop a run with a traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as err:
        raise json.JSONDecodeError(str(err), "", 0) from None


def iter_jsonl(path, problems: Problems, span=None) -> Iterator[tuple[int, object]]:
    for lineno, line, problem in read_lines(path, problems, span):
        if problem:
            problems.skip_record(problem, path, lineno)
            continue
        line = line.strip()
        if not line:
            continue
        try:
            record = json_loads(line)
        except json.JSONDecodeError as err:
            if line == "{" and lineno == 1:  # a pretty-printed single object, e.g. CMeKG's predicate.json
                problems.add("not a record file (one JSON object)", path, None)
                return
            problems.skip_record("malformed JSON line", path, lineno, str(err))
            continue
        if "\\u" in line and holds_surrogate(record):  # decoded text has no surrogates; only an escape makes one
            problems.skip_record(LONE_SURROGATE, path, lineno)
            continue
        yield lineno, record


# A \ud800-\udfff escape with the backslashes before it (an even number escape one another, and the "u" is text),
# as a high-low pair or alone
SURROGATE_ESCAPE = re.compile(
    r"(\\+)(u[dD][89abAB][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})|(\\+)(u[dD][89a-fA-F][0-9a-fA-F]{2})"
)
HIGH_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")
LONE_SURROGATE_MARK = "\uffff"  # U+FFFF, a noncharacter: a lone surrogate escape becomes it, to be found again
UNDECODABLE_MARK = "\ufffe"  # U+FFFE, another: undecodable bytes become it (U+FFFD is common in real text)


def _backslash_run_start(text: str, index: int) -> int:
    """Where the run of backslashes that ends just before text[index] starts."""
    return len(text[:index].rstrip("\\"))


class _Utf8Reader:
    """A JSON array file as UTF-8 for ijson, which reads UTF-8 only. Lines are decoded by LineDecoder's
    rule; a line longer than LINE_PIECE (a whole array on one line) is decoded piece by piece in the
    encoding its first non-ASCII piece shows. Undecodable bytes become U+FFFE and are counted in
    bad_lines: the caller skips every item that holds a U+FFFE once there are any. yajl would read a lone
    surrogate escape (\\ud83d without its pair) as "?": it is passed on as U+FFFF and counted in
    lone_surrogates, and the caller skips every item that holds a U+FFFF once there are any."""

    def __init__(self, raw, encoding: str):
        self.raw, self.lines = raw, LineDecoder(encoding)
        self.rest = b""  # bytes of the line in progress
        self.long = False  # the line in progress is longer than LINE_PIECE: decoded piece by piece ...
        self.decoder = None  # ... by this incremental decoder, once a non-ASCII piece chose its encoding
        self.bad_lines = 0
        self.lone_surrogates = 0
        self.held = ""  # decoded text whose end may be the start of an escape that goes on in the next read
        self.first = True

    def read(self, size=-1):
        if size == 0:  # ijson probes the stream's type with read(0)
            return b""
        while True:
            data = self.raw.read(SNIFF_BYTES)
            if self.first:
                data, self.first = data.removeprefix(codecs.BOM_UTF8), False
            text = self._mark_lone_surrogates(self._decode(data), final=not data)
            if text or not data:  # an empty result before the end would look like the end to ijson
                return text.encode("utf-8")

    def _mark_lone_surrogates(self, text: str, final: bool) -> str:
        text, self.held = self.held + text, ""
        if not final:  # an escape, or a pair's high half, at the end may go on in the next read: hold it back
            last = text.rfind("\\", max(0, len(text) - 12))  # a pair is 12 characters
            if last >= 0:
                cut = _backslash_run_start(text, last)
                if HIGH_SURROGATE_ESCAPE.fullmatch(text, max(0, cut - 6), cut):
                    cut = _backslash_run_start(text, cut - 6)
                text, self.held = text[:cut], text[cut:]
        if "\\ud" in text or "\\uD" in text:
            text = SURROGATE_ESCAPE.sub(self._mark, text)
        return text

    def _mark(self, match) -> str:
        slashes, high, low = (match[1], match[2], match[3]) if match[1] else (match[4], match[5], None)
        if len(slashes) % 2 == 0:  # "\\" and the text "ud83d"; a low half after it stands alone
            if low is None:
                return match[0]
            self.lone_surrogates += 1
            return slashes + high + LONE_SURROGATE_MARK
        if low is not None:
            return match[0]
        self.lone_surrogates += 1
        return slashes[:-1] + LONE_SURROGATE_MARK

    def _decode(self, data: bytes) -> str:
        buffer = self.rest + data
        cut = buffer.rfind(b"\n") + 1 if data else len(buffer)
        complete, self.rest = buffer[:cut], buffer[cut:]
        out = []
        if self.long and (complete or not data):  # the long line ends here (or the file does)
            end = complete.find(b"\n") + 1 or len(complete)
            out.append(self._piece(complete[:end], final=True))
            complete = complete[end:]
        if complete:
            out.append(self._lines(complete))
        if len(self.rest) > LINE_PIECE:
            self.long = True
            out.append(self._piece(self.rest, final=False))
            self.rest = b""
        return "".join(out)

    def _lines(self, block: bytes) -> str:
        text, bad = self.lines.decode_block(block, UNDECODABLE_MARK)
        self.bad_lines += len(bad)
        return text

    def _piece(self, piece: bytes, final: bool) -> str:
        """The next piece of a long line; final: its last."""
        if self.decoder is None and not piece.isascii():
            encoding = self.lines.choose(piece, final)
            self.bad_lines += encoding is None
            self.decoder = codecs.getincrementaldecoder(encoding or detect_encoding(piece))()
        if self.decoder is None:
            text = piece.decode("ascii")
        else:
            state = self.decoder.getstate()  # a failed decode may have changed it (GB18030's does)
            try:
                text = self.decoder.decode(piece, final)
            except UnicodeDecodeError:
                self.bad_lines += 1
                self.decoder.setstate(state)
                self.decoder.errors = "replace"
                text = self.decoder.decode(piece, final).replace("\ufffd", UNDECODABLE_MARK)
        if final:
            self.long, self.decoder = False, None
        return text


IJSON_PYTHON = ijson.get_backend("python")
MAX_JSON_DEPTH = 512  # an array item nested deeper is skipped: no record format nests so deep
TOO_DEEP = object()


def _array_items(reader, backend) -> Iterator[object]:
    """The items of the top-level JSON array, built from ijson's flat events; an item nested deeper than
    MAX_JSON_DEPTH comes as TOO_DEEP. ijson.items names every event by its path ("item.item.item..."), so a
    deeply nested item costs memory quadratic in its depth: a 200 KB file of brackets took 4 GB."""
    depth, open_containers, key, too_deep = 0, [], None, False  # depth 1: the top-level array
    for event, value in backend.basic_parse(reader, use_float=True):
        if event == "map_key":
            key = value  # every value in a map follows its key, so one slot serves every level
            continue
        if event == "end_map" or event == "end_array":
            depth -= 1
            if depth == 1:  # an item ends
                yield TOO_DEEP if too_deep else open_containers[0]
                open_containers, too_deep = [], False
            elif depth > 1 and not too_deep:
                open_containers.pop()
            continue
        starts = event == "start_map" or event == "start_array"
        if starts:
            depth += 1
            if depth == 1:  # the top-level array
                continue
        if too_deep:
            continue
        if depth > MAX_JSON_DEPTH + 1:
            too_deep = True
            continue
        if starts:
            value = {} if event == "start_map" else []
        if open_containers:
            parent = open_containers[-1]
            if type(parent) is dict:
                parent[key] = value
            else:
                parent.append(value)
        elif not starts:  # a scalar item
            yield value
        if starts:
            open_containers.append(value)


class _SpanAsArray:
    """The items of one span of a JSON array file (see _array_spans) as an array of their own."""

    def __init__(self, f, span: Span):
        f.seek(span.start)
        self.f, self.left, self.head, self.tail = f, span.end - span.start, b"[", b"]"

    def read(self, size: int) -> bytes:
        data = self.f.read(min(size, self.left)) if self.left else b""
        self.left = self.left - len(data) if data else 0
        data, self.head = self.head + data, b""
        if not self.left:
            data, self.tail = data + self.tail, b""
        return data


def iter_json_array(path, problems: Problems, span: Span | None = None) -> Iterator[tuple[str, object]]:
    """Items of a top-level JSON array, streamed, numbered from 0 (span: the items of that span, numbered
    from its first); a file cut mid-way yields what parsed, then counts it, and a span that stops so
    reads on to the end of the file (the rest is skipped: see Span). yajl (ijson's C backend) refuses
    integers past 64 bits, valid JSON that JSON lines read: from such an error on, the file is read again
    with ijson's Python backend, past the items already handled."""
    first = count = span.first_line if span else 0
    for backend in (ijson, IJSON_PYTHON):
        try:
            with open_binary(path) as raw:
                reader = _Utf8Reader(_SpanAsArray(raw, span) if span else raw, file_encoding(path))
                for index, item in enumerate(_array_items(reader, backend), first):
                    if index < count:  # handled before the C backend's error
                        continue
                    marked = (reader.bad_lines or reader.lone_surrogates) and item is not TOO_DEEP
                    text = json.dumps(item, ensure_ascii=False) if marked else ""
                    if item is TOO_DEEP:
                        problems.skip_record(
                            f"JSON nested deeper than {MAX_JSON_DEPTH} levels, record skipped", path, f"#{count}"
                        )
                    elif UNDECODABLE_MARK in text:
                        problems.skip_record(UNDECODABLE, path, f"#{count}")
                    elif LONE_SURROGATE_MARK in text:
                        problems.skip_record(LONE_SURROGATE, path, f"#{count}")
                    else:
                        yield f"#{count}", item
                    count += 1
            return
        except (ijson.JSONError, json.JSONDecodeError) as err:
            detail = err.args[0] if err.args else err
            detail = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
            if backend is ijson and "integer overflow" in detail:
                continue
            problems.add("JSON array cut short or malformed, rest of file skipped", path, f"#{count}", detail[:200])
            if span:
                span.read_to_end = True
            return
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            problems.add("truncated or corrupt gzip file", path, f"#{count}", str(err))
            return


def iter_csv(path, problems: Problems, span: Span | None = None) -> Iterator[tuple[int, dict]]:
    """Rows as {header: value}; quoted fields may hold commas and newlines (the line is where a row starts).
    With a span: the rows that start in it (see Span), under the file's header."""
    header = None
    if span is not None and span.start:  # the header is the file's first row, read before the span
        before = _csv_rows(path, Problems(), Span(0, span.start, 1))
        header = next(([name.strip() for name in row] for _, row, _ in before), None)
        if header and repeated(header):  # the unit that starts the file reports it
            return
    for where, row, last in _csv_rows(path, problems, span):
        if header is None:
            header = [name.strip() for name in row]
            twice = repeated(header)
            if twice:  # a row would keep only the last of them, silently
                problems.add(
                    "CSV header names a column twice, file skipped",
                    path,
                    where,
                    f"{', '.join(twice)}: rename one in the header",
                )
                return
        elif len(row) != len(header):
            spans = f"; the row runs over lines {where}-{last} (an unterminated quote?)" if last > where else ""
            problems.add(
                "CSV row with the wrong number of fields",
                path,
                where,
                f"{len(row)} fields, header has {len(header)}{spans}",
            )
        else:
            yield where, dict(zip(header, row))


def repeated(names: list[str]) -> list[str]:
    """The names given more than once (a CSV header's columns, --source names), sorted."""
    return sorted({name for name in names if names.count(name) > 1})


def _csv_rows(path, problems: Problems, span: Span | None) -> Iterator[tuple[int, list, int]]:
    """(first line, fields, last line) of every non-empty row that starts in the span (None: the file);
    rows holding an undecodable or overlong line and malformed rows are counted, not yielded. The csv module reads
    the lines straight from each decoded block (no Python step per line)."""
    first_line = span.first_line if span else 1
    bad_lines = collections.deque()  # (number, problem) of the lines read_lines flags not yet passed, ascending
    row_began = 0  # reader.line_num when the row being read began

    def lines():
        lineno = first_line
        blocks = decoded_blocks(path, span)
        try:
            while True:
                for text, bad, count in blocks:
                    bad_lines.extend((lineno + index, problem) for index, problem in bad.items())
                    lineno += count
                    yield io.StringIO(text, newline="\n")  # lines end at "\n" only
                if span is None or span.read_to_end or reader.line_num == row_began:
                    return  # the end of the file, or of the span between two rows
                span.read_to_end = True  # a row runs past the span's end: read it, and the rest of the file
                blocks = decoded_blocks(path, Span(span.end, None, lineno))
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            problems.add("truncated or corrupt gzip file", path, lineno, str(err))

    reader = csv.reader(itertools.chain.from_iterable(lines()))
    while True:
        row_began = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            row = err
        where, last = first_line + row_began, first_line + reader.line_num - 1
        problem = bad_lines[0][1] if bad_lines and bad_lines[0][0] <= last else None
        while bad_lines and bad_lines[0][0] <= last:
            bad_lines.popleft()
        if problem:
            problems.skip_record(problem, path, where, str(row) if isinstance(row, csv.Error) else "")
        elif isinstance(row, csv.Error) and "new-line character seen in unquoted field" in str(row):
            problems.skip_record(
                "CSV with lone \\r line endings (classic Mac OS), record skipped",
                path,
                where,
                "convert them to \\n, e.g. tr '\\r' '\\n' < FILE > FILE.csv",
            )
        elif isinstance(row, csv.Error):
            problems.skip_record("malformed CSV row", path, where, str(row))
        elif row:
            yield where, row, last


def iter_text_blocks(path, problems: Problems, span=None) -> Iterator[tuple[int, str]]:
    """Plain text: one document per block of lines separated by blank lines (an undecodable line is
    never blank: its bytes read as U+FFFD; an overlong one is part of the block it stands in)."""
    block, first, problem = [], None, None
    for lineno, line, line_problem in _cr_lines(read_lines(path, problems, span)):
        if line.strip() or line_problem:
            if not block:
                first, problem = lineno, None
            block.append(line)
            problem = problem or line_problem
        elif block:
            yield from _whole_block(path, problems, first, block, problem)
            block = []
    if block:
        yield from _whole_block(path, problems, first, block, problem)


def _cr_lines(lines):
    """Lines ended by a lone \r (classic Mac OS files) split there, as \n-ended lines under the same number:
    otherwise such a file is one line, and its blank lines never separate documents."""
    for lineno, line, problem in lines:
        if "\r" not in line or "\r" not in line.replace("\r\n", ""):
            yield lineno, line, problem
            continue
        pieces = line.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for piece in pieces[:-1]:
            yield lineno, piece + "\n", problem
        if pieces[-1]:
            yield lineno, pieces[-1], problem


def _whole_block(path, problems, first, lines, problem):
    if problem:
        problems.skip_record(problem, path, first)
    else:
        yield first, "".join(lines)


class RefusedXML(Exception):
    """XML that declares entities: the way to XXE (external files, URLs) and billion laughs."""


MAX_RECORD_CHARS = 64 << 20  # an XML record or a PDF holding more text is skipped: no article or guideline is so
# long, and a few MB of gzip can expand to gigabytes of one element (a small PDF can list one page 20,000 times)
EXPAT_CODECS = ("utf-8", "utf-16", "utf-16-le", "utf-16-be", "iso8859-1", "ascii")  # the encodings expat reads itself
XML_DECLARED_ENCODING = re.compile(rb"""\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._:-]+)["']""")


def xml_transcoder(first_chunk: bytes):
    """An incremental decoder for a file whose XML declaration names an encoding expat cannot read (GB2312,
    GBK, GB18030, Shift_JIS, Big5, ...: expat stops with "multi-byte encodings are not supported"), else
    None. LookupError for an encoding Python does not know either."""
    declared = XML_DECLARED_ENCODING.match(first_chunk.removeprefix(codecs.BOM_UTF8))
    if not declared:
        return None
    codec = codecs.lookup(declared[1].decode("ascii")).name
    return None if codec in EXPAT_CODECS else codecs.getincrementaldecoder(codec)()


class _SpanEnd(Exception):
    """The next span's first record starts: this span's reading is done."""


def record_start(record_tag: str) -> re.Pattern:
    """The bytes of a start tag of record_tag, as split_source looks for them (no namespace prefix)."""
    return re.compile(rb"<" + re.escape(record_tag.encode("ascii")) + rb"[\s/>]")


def _skip_to_record(f, pattern: re.Pattern, span: Span):
    """For a span of an XML file that starts past byte 0: (head, position, lines, rest), where head is the
    file's bytes before its first record (the prolog and the elements that hold the records), position the
    first match of pattern at or past span.start (None: none), lines the line breaks before it, rest what
    was read past it; f is read on from there. None when the file has no record in its first
    MAX_RECORD_CHARS bytes. A plain file is read from span.start (its line there: span.first_line); a
    gzipped one, which cannot seek, is decompressed from its start, its lines counted on the way."""
    data, offset, lines, head = b"", 0, 0, None  # data: read and not yet passed, from file offset `offset`
    start = span.start
    while True:
        block = f.read(SKIP_BYTES)
        data += block
        if head is None:
            found = pattern.search(data)
            if not found:
                if block and len(data) <= MAX_RECORD_CHARS:
                    continue
                return None
            head = data[: found.start()]
            if not isinstance(f, gzip.GzipFile) and start > len(data):
                f.seek(start)
                data, offset, lines = b"", start, span.first_line - 1
                continue
        found = pattern.search(data, max(0, start - offset))
        if found or not block:
            at = found.start() if found else len(data)
            return head, offset + at if found else None, lines + data.count(b"\n", 0, at), data[at:]
        cut = max(len(data) - len(pattern.pattern), 0)  # the tail might begin a match
        lines, offset, data = lines + data.count(b"\n", 0, cut), offset + cut, data[cut:]


def iter_xml(path, problems: Problems, record_tag: str, unread=None, span=None) -> Iterator[tuple[int, ET.Element]]:
    """(line, element) for every element named record_tag (namespace prefixes dropped from all names),
    streamed: an element is built only between its start and end tag and handed over whole, so memory
    holds one record, never the file; a record of more than MAX_RECORD_CHARS characters is skipped. Inside
    a record, an element for which unread(tag, attributes) is true is not built, nor anything in it (the
    text after it is kept): a reader that never looks at reference lists or tables does not pay for them,
    about half of a real article's XML. A file
    that declares entities is refused: no external file, URL or DTD is ever read, and no entity expands
    (an entity left undefined by an unread DTD becomes its HTML character, or a space). A declared encoding
    that expat lacks is decoded here. A malformed file yields what parsed before the error.
    span (see _xml_spans): the records that start in it. Past the file's head, the reading jumps to the
    first record start at or past span.start, and it stops where the next span's first record starts,
    unless that is not a record start of the whole file's reading (the start tag's bytes inside a comment,
    inside another record, or under other elements than the first record): then it reads on to the end
    of the file and sets span.read_to_end, and the file's later spans must be dropped."""
    done = []  # (line, element) of the records finished since the last chunk
    builder, first_line, depth = None, 0, 0  # the open record (None: being skipped), where it starts, how deep
    passing = 0  # the depth of an unread element being passed over, 0 when none is
    size, found = 0, 0  # characters of the open record; records met in the file
    parser = None
    outer, record_outer = [], None  # the elements open outside records; those around the first record
    shift, moved = 0, 0  # file line = expat's line + shift; file offset = expat's byte index + moved
    pattern = record_start(record_tag)
    # A boundary the whole file's reading must agree with: where the spans' head ends (the first span
    # checks that the file's first start-tag match is its first record), then span.end; None: none left.
    watch = None if span is None or span.read_to_end else 0 if not span.start else span.end
    tail, tail_from = bytearray(), 0  # the bytes fed from near `watch` on, and the file offset of the first

    def agreed(at: int) -> bool:
        """Is the record start at `at` (at or past watch) the first start-tag match from watch on, with the
        same elements around it as around the first record (what the next span's head opens)?"""
        first = pattern.search(tail, max(0, watch - tail_from))
        return first is not None and tail_from + first.start() == at and tuple(outer) == record_outer

    def start(tag, attributes):
        nonlocal builder, first_line, depth, size, passing, record_outer, watch
        tag = tag.rpartition(":")[2]
        if not depth:
            if tag != record_tag:
                outer.append(tag)
                return
            if record_outer is None:
                record_outer = tuple(outer)
            at = parser.CurrentByteIndex + moved
            while watch is not None and at >= watch:  # twice when the first record starts past span.end
                if not agreed(at):
                    watch, span.read_to_end = None, True  # read on to the end of the file
                elif watch:
                    raise _SpanEnd
                else:
                    watch = span.end
            builder, first_line, size = ET.TreeBuilder(), parser.CurrentLineNumber + shift, 0
        depth += 1
        if builder is not None and not passing:
            if depth > 1 and unread is not None and unread(tag, attributes):
                passing = depth
                return
            builder.start(tag, attributes)
            if attributes:
                grow(sum(map(len, attributes.values())))

    def end(tag):
        nonlocal builder, depth, found, passing
        if not depth:
            if outer:
                outer.pop()
            return
        depth -= 1
        if passing:
            if depth < passing:  # the unread element itself ends
                passing = 0
            return
        if builder is not None:
            builder.end(tag.rpartition(":")[2])
        if not depth:
            found += 1
            if builder is None:
                problems.skip_record(
                    f"XML record of more than {MAX_RECORD_CHARS:,} characters, record skipped", path, first_line
                )
            else:
                done.append((first_line, builder.close()))
            builder = None

    def grow(characters):
        nonlocal builder, size
        size += characters
        if size > MAX_RECORD_CHARS:
            builder = None  # the rest of the record is only counted through

    def data(text):
        if builder is not None and not passing:
            builder.data(text)
            grow(len(text))

    def refuse(name, *_):
        raise RefusedXML(name)

    def skipped_entity(name, is_parameter):
        if builder is None or passing:
            return
        if name in html.entities.name2codepoint:  # MEDLINE's and JATS's DTDs define these names as HTML does
            builder.data(chr(html.entities.name2codepoint[name]))
        else:
            builder.data(" ")
            problems.add(
                "undefined XML entity replaced by a space",
                path,
                parser.CurrentLineNumber + shift,
                f"&{name};",
                part=True,
            )

    complete = False
    try:
        with open_binary(path) as f:
            chunk = f.read(XML_CHUNK_BYTES)
            decoder = xml_transcoder(chunk)
            parser = expat.ParserCreate("UTF-8" if decoder else None)
            parser.buffer_text = True  # one data callback per text run, not per line
            parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, data
            parser.EntityDeclHandler = parser.UnparsedEntityDeclHandler = refuse
            parser.ExternalEntityRefHandler = refuse
            parser.SkippedEntityHandler = skipped_entity
            offset = 0  # the file offset of chunk
            if span is not None and span.start:
                f.seek(0)
                jump = _skip_to_record(f, pattern, span)
                if jump is None or jump[1] is None:
                    return  # no record starts in the span
                head, offset, lines, chunk = jump
                parser.Parse(head, False)
                shift, moved = lines - head.count(b"\n"), offset - len(head)
            while chunk:
                if watch is not None and offset + len(chunk) > watch - len(pattern.pattern):
                    if tail_from + len(tail) != offset:  # the tail holds consecutive chunks only
                        tail.clear()
                        tail_from = offset
                    tail += chunk
                    if len(tail) > MAX_RECORD_CHARS:  # no record start near the boundary: read on
                        watch, span.read_to_end = None, True
                parser.Parse(decoder.decode(chunk).encode("utf-8") if decoder else chunk, False)
                offset += len(chunk)
                yield from done
                done.clear()
                chunk = f.read(XML_CHUNK_BYTES)
            parser.Parse(decoder.decode(b"", True).encode("utf-8") if decoder else b"", True)
            complete = True
    except _SpanEnd:
        pass
    except RefusedXML as err:
        problems.add(
            "XML declares entities (XXE / billion laughs risk), file refused",
            path,
            parser.CurrentLineNumber + shift,
            f"entity {err}",
        )
    except expat.ExpatError as err:
        problems.add("malformed XML, rest of file skipped", path, err.lineno + shift, expat.errors.messages[err.code])
        if span is not None:
            span.read_to_end = True
    except LookupError as err:
        problems.add("XML declares an encoding Python does not know, file skipped", path, 1, str(err))
    except UnicodeDecodeError as err:
        problems.add(
            "undecodable bytes for the XML's declared encoding, rest of file skipped",
            path,
            parser.CurrentLineNumber + shift,
            f"{err.encoding}: {err.reason}; convert the file to UTF-8",
        )
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        problems.add(
            "truncated or corrupt gzip file", path, parser.CurrentLineNumber + shift if parser else 1, str(err)
        )
        if span is not None:
            span.read_to_end = True
    yield from done  # the records that closed before the end of the file, or before an error
    if complete and not found and (span is None or not span.start):
        problems.add(f"no <{record_tag}> element in the file (an error page? another format?), file skipped", path)


def iter_pdf(path, problems: Problems) -> Iterator[tuple[None, list[str]]]:
    """One record per PDF: the text of each of its pages (pypdf; "" for a page without a text layer)."""
    import logging

    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about sloppy files are not ours to print
    try:
        with open_binary(path) as f:
            reader = pypdf.PdfReader(f)
            if reader.is_encrypted and not reader.decrypt(""):
                problems.add("encrypted PDF: needs its password", path)
                return
            pages, characters = [], 0
            for page in reader.pages:
                pages.append(page.extract_text() or "")
                characters += len(pages[-1])
                if characters > MAX_RECORD_CHARS:  # a small file can list one page thousands of times
                    problems.add(
                        f"PDF of more than {MAX_RECORD_CHARS:,} characters of text, file skipped",
                        path,
                        None,
                        f"{len(pages)} of {len(reader.pages)} pages read",
                    )
                    return
    except Exception as err:  # noqa: BLE001 - pypdf raises many kinds on damaged files; none may stop a run
        problems.add("unreadable PDF", path, None, f"{type(err).__name__}: {str(err)[:160]}")
        return
    yield None, pages


def iter_parquet(path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """Rows of a Parquet file as {column: value}, a batch of rows at a time; "#N" is the N-th row."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        problems.add("Parquet file skipped: reading it needs pyarrow (pip install pyarrow)", path)
        return
    count = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"#{count}", row
                count += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowIOError / ArrowInvalid
        problems.add("unreadable Parquet data, rest of file skipped", path, f"#{count}", str(err)[:200])


def container(path) -> str | None:
    """'json' (lines or array), 'csv', 'text', 'xml', 'pdf', 'parquet', or None: by extension (under .gz),
    else by the first byte."""
    name = str(path).lower().removesuffix(".gz")
    for kind, extensions in (
        ("json", (".json", ".jsonl", ".ndjson")),
        ("csv", (".csv",)),
        ("text", (".txt", ".text", ".md")),
        ("xml", (".xml", ".nxml")),
        ("pdf", (".pdf",)),
        ("parquet", (".parquet",)),
    ):
        if name.endswith(extensions):
            return kind
    return "json" if _first_byte(path) in (b"{", b"[") else None


def _first_byte(path) -> bytes:
    """The first non-whitespace byte after any BOM (b"" for an empty or unreadable file)."""
    try:
        with open_binary(path) as f:
            prefix = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    except (OSError, EOFError, zlib.error):
        return b""
    return prefix[:1]


def iter_records(path, problems: Problems, span=None, fmt=None) -> Iterator[tuple[object, object]]:
    """(location, record) for any container; span only for JSON lines and arrays, CSV and plain text; for XML, fmt
    (the Format) names the element that is one record and what its reader never looks into."""
    kind = container(path)
    if kind == "xml":
        yield from iter_xml(path, problems, fmt.record_tag, fmt.unread, span)
    elif kind == "pdf":
        yield from iter_pdf(path, problems)
    elif kind == "csv":
        yield from iter_csv(path, problems, span)
    elif kind == "text":
        yield from iter_text_blocks(path, problems, span)
    elif kind == "json" and _first_byte(path) == b"[":
        yield from iter_json_array(path, problems, span)
    elif kind == "json":
        yield from iter_jsonl(path, problems, span)
    elif kind == "parquet":
        yield from iter_parquet(path, problems)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Format:
    kind: str  # "text" | "dialogue" | "question" | "image" | "preference": what the reader yields
    read: Callable  # record -> outputs (questions: (record, path)); whole_source: (files, problems)
    containers: tuple = ("json",)  # file kinds it reads; other files are skipped and counted
    companions: tuple = ()  # file-name globs that ship with the dataset but hold no records: skipped quietly
    whole_source: bool = False  # needs all its files at once (a join), so it cannot be split
    record_tag: str | None = None  # XML: the element that is one record
    unread: Callable | None = None  # XML: (tag, attributes) -> True for elements the reader never looks into


FORMATS: dict[str, Format] = {}


def register(name, kind="text", containers=("json",), companions=(), whole_source=False, record_tag=None, unread=None):
    def add(read):
        FORMATS[name] = Format(kind, read, containers, companions, whole_source, record_tag, unread)
        return read

    return add


def _value(record, name: str, required: bool):
    if not isinstance(record, dict):
        raise BadRecord("record is not an object", type(record).__name__)
    if name not in record and required:
        raise BadRecord(f"missing field '{name}'", "fields: " + ", ".join(map(str, list(record)[:8])))
    return record.get(name)


def text_field(record, name: str, required: bool = True) -> str:
    """record[name] as stripped text; null, NaN and a missing optional field give "". Only strings are
    text: a number, a boolean, a list or an object is a bad record, never its str()."""
    value = _value(record, name, required)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field '{name}' is not text", type(value).__name__)
    return value.strip()


def list_field(record, name: str, required: bool = True) -> list:
    """record[name], a list; null or a missing optional field give []."""
    value = _value(record, name, required)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise BadRecord(f"field '{name}' is not a list", type(value).__name__)
    return value


# ---- pretraining documents


@register("wiki")
def wiki(record):
    """pleisto/wikipedia-cn-20230720-filtered: `completion` (JSON array)."""
    yield text_field(record, "completion")


@register("baike")
def baike(record):
    """BaiduBaike 563w: "title：summary", then "section title：content" per section (null parts left out)."""
    title, summary = text_field(record, "title", False), text_field(record, "summary", False)
    parts = [f"{title}：{summary}" if title and summary else title or summary]
    for section in list_field(record, "sections", False):
        if not isinstance(section, dict):
            raise BadRecord("a section is not an object", type(section).__name__)
        heading, content = text_field(section, "title", False), text_field(section, "content", False)
        if content:
            parts.append(f"{heading}：{content}" if heading else content)
    yield "\n".join(part for part in parts if part)


@register("c4_zh")
def c4_zh(record):
    """C4_zh / mC4 zh: `text` (JSON lines, also .json.gz)."""
    yield text_field(record, "text")


@register("wudao")
def wudao(record):
    """WuDaoCorpora: `title` line + `content` (a JSON array per file)."""
    yield "\n".join(part for part in (text_field(record, "title", False), text_field(record, "content")) if part)


@register("medical_pretrain")
def medical_pretrain(record):
    """shibing624/medical pretrain: `text`."""
    yield text_field(record, "text")


@register("skypile")
def skypile(record):
    """SkyPile-150B: `text`."""
    yield text_field(record, "text")


@register("guidelines")
def guidelines(record):
    """epfl-llm/guidelines: `clean_text`, or `raw_text` where that is empty."""
    yield text_field(record, "clean_text", False) or text_field(record, "raw_text")


@register("cmekg", companions=("predicate.json",))
def cmekg(record):
    """CMeKG RE samples: `text`, then its spo_list triples as sentences, one per (subject, predicate):
    "示例病的临床表现包括低热、乏力。" predicate.json (counts of predicates) is skipped."""
    text = text_field(record, "text", False)
    facts: dict[tuple[str, str], dict[str, None]] = {}  # objects in first-seen order, without repeats
    for triple in list_field(record, "spo_list", False):
        if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(x, str) for x in triple)):
            raise BadRecord("malformed spo_list triple", repr(triple)[:80])
        subject, predicate, obj = (x.strip() for x in triple)
        facts.setdefault((subject, predicate), {})[obj] = None
    sentences = "".join(f"{s}的{p}包括{'、'.join(objs)}。" for (s, p), objs in facts.items())
    yield "\n".join(part for part in (text, sentences) if part)


@register("cmedqa2", containers=("csv",), companions=("*candidates*",), whole_source=True)
def cmedqa2(files, problems):
    """cMedQA2: question.csv (question_id, content) joined with answer.csv (ans_id, question_id, content):
    the question, then each answer, one document per question. Files are told apart by their header.
    The join holds the dataset in memory (about 100 MB); answers to unknown questions are counted."""
    questions: dict[str, tuple] = {}  # question_id -> (content, file, line)
    answers: dict[str, list[tuple]] = {}  # question_id -> [(content, file, line), ...]
    for path in files:
        for where, row in iter_csv(path, problems):
            try:
                key, content = text_field(row, "question_id"), text_field(row, "content")
            except BadRecord as err:
                problems.add(err.reason, path, where, err.detail)
                break  # a file without these columns is not part of cMedQA2: one report, not one per row
            if "ans_id" in row:
                answers.setdefault(key, []).append((content, path, where))
            elif key in questions:
                first = questions[key]
                problems.add(
                    "question_id given twice, the later question skipped",
                    path,
                    where,
                    f"{key}: first at {first[1]}:{first[2]}",
                )
            else:
                questions[key] = (content, path, where)
    for key, (question, path, where) in questions.items():
        replies = [answer for answer, _, _ in answers.pop(key, []) if answer]
        if question and replies:
            yield "\n".join([question] + replies)
        else:
            problems.add("question without answers" if question else "empty question", path, where, key)
    for key, replies in answers.items():
        for _, path, where in replies:
            problems.add("answer to an unknown question_id", path, where, key)


@register("text", containers=("text",))
def plain_text(block):
    """Plain text files (.txt/.md): one document per block of lines separated by blank lines."""
    yield block


# ---- medical literature: S2ORC, PubMed Central, PubMed, guidelines as PDF
# A document is its title, abstract, then section headings and paragraphs in reading order, one per line.
# Figure and table captions and the reference list are left out; the NAME_full formats keep them.


def paragraph_texts(record, name: str) -> list[str]:
    """The `text` of each paragraph object in record[name] (a list; missing or null: none)."""
    paragraphs = record.get(name) or []
    if not isinstance(paragraphs, list) or not all(isinstance(p, dict) for p in paragraphs):
        raise BadRecord(f"field '{name}' is not a list of paragraphs", type(paragraphs).__name__)
    return [text_field(p, "text", False) for p in paragraphs]


def s2orc_classic(record, full: bool) -> list[str]:
    """S2ORC 2019/2020 and s2orc-doc2json: title and abstract at the top or under `metadata` (an abstract
    string marks its breaks with ':::'), paragraphs {section, text} in `body_text` at the top or in
    `pdf_parse` / `latex_parse` / `grobid_parse`; captions in `ref_entries`, the bibliography in `bib_entries`."""
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    parses = [record[key] for key in ("pdf_parse", "latex_parse", "grobid_parse") if isinstance(record.get(key), dict)]
    parse = next((p for p in parses if p.get("body_text")), record)
    lines = [text_field(record, "title", False) or text_field(metadata, "title", False)]
    abstract = (
        record.get("abstract")
        or metadata.get("abstract")
        or next((p["abstract"] for p in [parse, *parses] if p.get("abstract")), None)
    )
    if isinstance(abstract, str):
        content = [part.strip() for part in abstract.split(":::")]
    elif abstract:
        content = paragraph_texts({"abstract": abstract}, "abstract")
    else:
        content = []
    lines += content
    section = ""
    body = parse.get("body_text") or []
    for paragraph, text in zip(body, paragraph_texts(parse, "body_text")):
        heading = text_field(paragraph, "section", False)
        if heading and heading != section:
            lines.append(heading)
        section = heading
        lines.append(text)
        content.append(text)
    if full:
        captions, bibliography = parse.get("ref_entries") or {}, parse.get("bib_entries") or {}
        if not isinstance(captions, dict) or not isinstance(bibliography, dict):
            raise BadRecord("field 'ref_entries' or 'bib_entries' is not an object")
        lines += [text_field(entry, "text", False) for entry in captions.values() if isinstance(entry, dict)]
        lines += [
            text_field(entry, "raw_text", False)
            or ", ".join(filter(None, (text_field(entry, key, False) for key in ("title", "venue", "year"))))
            for entry in bibliography.values()
            if isinstance(entry, dict)
        ]
    if not any(text.strip() for text in content):  # a title and headings are not a document
        raise BadRecord("no abstract and no body_text", text_field(record, "paper_id", False))
    return lines


def annotation_spans(annotations: dict, name: str, size: int) -> list[tuple[int, int]]:
    """One annotation layer of the Semantic Scholar datasets' S2ORC as sorted (start, end) offsets into
    content.text; the release stores each layer as a JSON string (null: no such spans)."""
    layer = annotations.get(name)
    if isinstance(layer, str):
        try:
            layer = json_loads(layer)
        except json.JSONDecodeError:
            raise BadRecord(f"annotation '{name}' is not JSON", layer[:60]) from None
    if layer is None:
        return []
    if not isinstance(layer, list):
        raise BadRecord(f"annotation '{name}' is not a list of spans", repr(layer)[:60])
    spans = []
    for span in layer:
        start, end = (span.get("start"), span.get("end")) if isinstance(span, dict) else (None, None)
        if not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool) or isinstance(end, bool):
            raise BadRecord(f"annotation '{name}' has a span without integer start and end", repr(span)[:60])
        if not 0 <= start <= end <= size:
            raise BadRecord(f"annotation '{name}' points outside the text", f"{start}-{end} of {size} characters")
        spans.append((start, end))
    return sorted(spans)


def s2orc_datasets(content, full: bool) -> list[str]:
    """Semantic Scholar datasets API S2ORC: `content.text` (the whole paper) and `content.annotations`
    {title, abstract, sectionheader, paragraph, figure, figurecaption, table, bibentry, ...: spans}. The
    first title span, the abstract, then headings and paragraphs by offset; headings and paragraphs
    inside figures, tables and bibliography entries, and headings after the last paragraph (figure
    labels), are not body text."""
    if not isinstance(content, dict):
        raise BadRecord("field 'content' is not an object", type(content).__name__)
    text = content.get("text")  # not stripped: the offsets count from its first character
    if not isinstance(text, str) or not text.strip():
        raise BadRecord("field 'content.text' is empty or not text", type(text).__name__)
    annotations = content.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise BadRecord("field 'annotations' is not an object", type(annotations).__name__)
    spans = {
        name: annotation_spans(annotations, name, len(text))
        for name in ("title", "abstract", "sectionheader", "paragraph", "figure", "figurecaption", "table", "bibentry")
    }
    head = spans["title"][:1] + spans["abstract"]
    not_body = sorted(head + spans["figure"] + spans["table"] + spans["bibentry"])
    # A span lies inside one of not_body iff the farthest end among those starting at or before it reaches
    # its end: one binary search per span, not a scan of every figure and reference for every paragraph.
    starts, reach = [start for start, _ in not_body], list(itertools.accumulate((end for _, end in not_body), max))
    candidates = sorted(
        (start, end, name)
        for name in ("sectionheader", "paragraph")
        for start, end in spans[name]
        if not ((index := bisect.bisect_right(starts, start) - 1) >= 0 and reach[index] >= end)
    )
    body = []  # a span listed twice, or one over two paragraphs, would repeat their text: the first of overlaps
    for span in candidates:
        if not body or span[0] >= body[-1][1]:
            body.append(span)
    while body and body[-1][2] == "sectionheader":
        body.pop()
    if not body and not spans["abstract"]:
        raise BadRecord("no abstract and no paragraph annotations")
    if full:
        extra = [(start, end, name) for name in ("figurecaption", "bibentry") for start, end in spans[name]]
        body = sorted(body + extra)
    return [text[start:end].strip() for start, end in head] + [text[start:end].strip() for start, end, _ in body]


def s2orc_document(record, full: bool) -> str:
    if not isinstance(record, dict):
        raise BadRecord("record is not an object", type(record).__name__)
    lines = s2orc_datasets(record["content"], full) if "content" in record else s2orc_classic(record, full)
    return "\n".join(line for line in lines if line)


@register("s2orc", companions=("RELEASE_NOTES", "LICENSE*", "*.md5"))
def s2orc(record):
    """S2ORC JSON lines in either layout: the classic releases (S2ORC 2019/2020, s2orc-doc2json, CORD-19)
    or the Semantic Scholar datasets API's `content` with annotation offsets."""
    yield s2orc_document(record, full=False)


@register("s2orc_full", companions=("RELEASE_NOTES", "LICENSE*", "*.md5"))
def s2orc_full(record):
    """s2orc, keeping figure and table captions and the bibliography."""
    yield s2orc_document(record, full=True)


JATS_FLOATS = frozenset({"fig", "fig-group", "table-wrap", "table-wrap-group", "supplementary-material"})
JATS_LINES = frozenset({"title", "p"})  # elements whose text is one line of the document
JATS_NOT_INLINE = frozenset({"fn"})  # a footnote inside a paragraph would split its sentence
NUMBER = re.compile(r"[-−–]?\d+(?:\.\d+)?")
# What pmc (not pmc_full) never reads, wherever it sits: floats, reference lists, back matter, the floats
# group, sub-articles (reviews, replies: pmc_document reads the article's own front and body) and the journal's
# metadata, and sections of display objects. Not built at all, they cost only expat's own parse.
JATS_UNREAD = JATS_FLOATS | {"ref-list", "back", "floats-group", "sub-article", "journal-meta"}
PMC_COMPANIONS = ("*.filelist.*", "oa_file_list.*", "*.jpg", "*.gif", "*.png", "*.tif", "*.pdf", "*.md5")


def inline_text(element, skip=frozenset()) -> str:
    """The element's text with its children's inline, except children named in skip or JATS_NOT_INLINE;
    whitespace runs (XML indentation) become one space. Of <alternatives> (a formula as TeX and as MathML)
    one is kept, TeX first; a superscript made only of citation links (<sup><xref ref-type="bibr">) is
    left out, and a numeric one after a digit is written as a power (10<sup>6</sup>: 10^6, not 106)."""
    if element.tag == "alternatives" and len(element):
        chosen = next((child for child in element if child.tag == "tex-math"), element[0])
        return inline_text(chosen, skip)
    parts = [element.text or ""]
    for child in element:
        if not (child.tag in skip or child.tag in JATS_NOT_INLINE or citation_marks(child)):
            text = inline_text(child, skip)
            power = child.tag == "sup" and after_digit(parts) and NUMBER.fullmatch(text)
            parts.append("^" + text if power else text)
        parts.append(child.tail or "")
    return " ".join("".join(parts).split())


def after_digit(parts: list[str]) -> bool:
    return next((part for part in reversed(parts) if part), "")[-1:].isdigit()


def citation_marks(element) -> bool:
    """A superscript holding only links to the reference list (and the commas or dashes between them)."""
    return (
        element.tag == "sup"
        and len(element) > 0
        and all(child.tag == "xref" and child.get("ref-type") == "bibr" for child in element)
        and not "".join([element.text or "", *(child.tail or "" for child in element)]).strip(" ,-–")
    )


def jats_lines(element, full: bool, lines: list):
    """Titles and paragraphs under element in document order. Figures and tables (their captions) and
    the reference list (a line per reference) only when full; a float inside a paragraph follows it."""
    for child in element:
        if not full and jats_unread(child.tag, child.attrib):
            continue
        if child.tag == "def-item":  # a glossary entry: "term: definition" on one line
            term = inline_text(child.find("term")) if child.find("term") is not None else ""
            meaning = " ".join(inline_text(d, JATS_FLOATS) for d in child.findall("def"))
            lines.append(f"{term}: {meaning}" if term and meaning else term or meaning)
        elif child.tag == "ref":  # mixed-citation carries its punctuation; element-citation is bare fields
            mixed = child.find("mixed-citation") is not None
            lines.append(inline_text(child) if mixed else " ".join(" ".join(child.itertext()).split()))
        elif child.tag in JATS_LINES:
            lines.append(inline_text(child, JATS_FLOATS))
            if full:
                jats_floats(child, lines)
        elif child.tag == "sec":  # a heading over nothing kept is dropped ("Supplementary Material" over
            section = []  # files, a section of figures left out)
            jats_lines(child, full, section)
            if sum(1 for line in section if line) > 1 or child.find("title") is None:
                lines += section
        else:
            jats_lines(child, full, lines)


def jats_floats(element, lines: list):
    for child in element:
        if child.tag in JATS_FLOATS:
            jats_lines(child, True, lines)
        else:
            jats_floats(child, lines)


def pmc_document(article, full: bool) -> str:
    """JATS `article`: front/article-meta's article-title and abstract(s), then body's sec titles and
    paragraphs (lists, boxes and quotes included); full adds figure/table captions, floats-group and
    back's ref-list."""
    meta = article.find("front/article-meta")
    title = meta.find("title-group/article-title") if meta is not None else None
    lines = [inline_text(title)] if title is not None else []
    parts = (meta.findall("abstract") if meta is not None else []) + [article.find("body")]
    if full:
        parts += [article.find("floats-group"), article.find("back/ref-list")]
    for part in parts:
        if part is not None:
            jats_lines(part, full, lines)
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise BadRecord("no abstract and no body text", lines[0] if lines else "no title")
    return "\n".join(lines)


def jats_unread(tag: str, attributes: dict) -> bool:
    return tag in JATS_UNREAD or attributes.get("sec-type") == "display-objects"


@register("pmc", containers=("xml",), companions=PMC_COMPANIONS, record_tag="article", unread=jats_unread)
def pmc(article):
    """PubMed Central Open Access JATS XML (`.xml` / `.nxml`, one article per file or many in a set)."""
    yield pmc_document(article, full=False)


@register("pmc_full", containers=("xml",), companions=PMC_COMPANIONS, record_tag="article")
def pmc_full(article):
    """pmc, keeping figure and table captions and the reference list."""
    yield pmc_document(article, full=True)


@register("pubmed", containers=("xml",), companions=("*.md5", "README*"), record_tag="PubmedArticle")
def pubmed(record):
    """MEDLINE/PubMed baseline and update files: MedlineCitation/Article's ArticleTitle (and the original
    language's VernacularTitle), then each AbstractText as "LABEL: text". Title-only citations are
    skipped (counted); DeleteCitation and book records are not PubmedArticle and are not read."""
    pmid = "PMID " + (record.findtext("MedlineCitation/PMID") or "?").strip()
    article = record.find("MedlineCitation/Article")
    if article is None:
        raise BadRecord("no MedlineCitation/Article", pmid)
    paragraphs = article.findall("Abstract/AbstractText")
    if not paragraphs:
        raise BadRecord("no abstract (title only)", pmid)
    lines = [
        inline_text(article.find(name))
        for name in ("ArticleTitle", "VernacularTitle")
        if article.find(name) is not None
    ]
    for paragraph in paragraphs:
        label, text = paragraph.get("Label", "").strip(), inline_text(paragraph)
        lines.append(f"{label}: {text}" if label and label != "UNLABELLED" and text else text)
    yield "\n".join(line for line in lines if line)


PDF_EDGE_LINES = 2  # lines at the top and at the bottom of a page where running headers and footers sit
DIGIT_RUNS = re.compile(r"\d+")
LINE_END_HYPHEN = re.compile(r"([A-Za-z]+)([-\u00ad])\n([a-z]+)")  # a hyphen or a soft hyphen, then a line break
HYPHENATED_WORD = re.compile(r"[A-Za-z]+-[a-z]+")  # a compound written with its hyphen inside a line
PDF_CHARACTERS = str.maketrans(
    {"\u00ad": "", **{chr(code): unicodedata.normalize("NFKC", chr(code)) for code in range(0xFB00, 0xFB07)}}
)  # soft hyphens left inside lines go; the ligatures ﬀ ﬁ ﬂ ﬃ ﬄ ﬅ ﬆ become their letters


def running_lines(pages: list[list[str]]) -> set[str]:
    """Headers and footers, as edge_key()s: lines near a page's top or bottom that recur on most pages of a
    document of 3 or more pages, compared without spaces: the same line, or the same but for a number that
    goes up with the page (a page number). A line whose numbers differ otherwise, such as a dose in the last
    row of each page's table, is text."""
    if len(pages) < 3:
        return set()
    seen = collections.defaultdict(list)  # edge key -> [(page index, the line's numbers)]
    for index, lines in enumerate(pages):
        for line in set(lines[:PDF_EDGE_LINES] + lines[-PDF_EDGE_LINES:]):
            numbers = [int(run) if len(run) < 10 else -1 for run in DIGIT_RUNS.findall("".join(line.split()))]
            seen[edge_key(line)].append((index, numbers))
    most = len(pages) / 2
    running = set()
    for key, found in seen.items():
        if len(found) <= most:
            continue
        same = Counter(tuple(numbers) for _, numbers in found).most_common(1)[0][1] > most
        paging = any(
            Counter(numbers[at] - index for index, numbers in found).most_common(1)[0][1] > most
            for at in range(len(found[0][1]))
        )
        if same or paging:
            running.add(key)
    return running


def edge_key(line: str) -> str:
    return DIGIT_RUNS.sub("#", "".join(line.split()))


@register("pdf", containers=("pdf",))
def pdf(pages):
    """Guidelines as PDF (e.g. Medsci's): the text layer of each page, with running headers and footers
    removed and words hyphenated at a line end joined; one document per file. A PDF without any text
    (a scan) is counted as needing OCR, and so is each textless page of one that has text."""
    if not pages:
        raise BadRecord("PDF has no pages")
    if not any(page.strip() for page in pages):
        raise BadRecord("no text layer: needs OCR", f"{len(pages)} page(s)")
    lines = [[line.strip() for line in page.splitlines() if line.strip()] for page in pages]
    running = running_lines(lines)
    kept = []
    for number, page in enumerate(lines, 1):
        if not page:
            yield Skipped("page without a text layer: needs OCR", f"page {number}")
        edge = set(range(PDF_EDGE_LINES)) | set(range(len(page) - PDF_EDGE_LINES, len(page)))
        kept += [line for i, line in enumerate(page) if i not in edge or edge_key(line) not in running]
    yield join_hyphenated("\n".join(kept)).translate(PDF_CHARACTERS)


def join_hyphenated(text: str) -> str:
    """Words hyphenated at a line end joined ("treat-\nment" -> "treatment"), except a compound that the
    document also writes with its hyphen inside a line ("well-known" there: "well-\nknown" stays
    "well-known"): a compound's hyphen at a line end looks like a break's. A soft hyphen is always a break."""
    compounds = {word.lower() for word in HYPHENATED_WORD.findall(text)}

    def join(match):
        left, mark, right = match.groups()
        compound = f"{left}-{right}"
        return compound if mark == "-" and compound.lower() in compounds else left + right

    return LINE_END_HYPHEN.sub(join, text)


# ---- SFT dialogues

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


def dialogue(messages):
    """[(role, text), ...] -> yields Skipped notes, then the turns [(prompt, answer), ...].
    System messages are prepended to the next prompt (one line each); consecutive messages of one role
    are joined with a newline; an answer before any question and a last question without answer are
    left out (and counted)."""
    turns, system, prompt = [], [], None
    for given, text in messages:
        role = ROLES.get(str(given).strip().lower())
        if role == "system":
            system.append(text)
        elif role == "user":
            prompt = text if prompt is None else f"{prompt}\n{text}"
        elif role == "assistant" and prompt is not None:
            turns.append(("\n".join(system + [prompt]), text))
            system, prompt = [], None
        elif role == "assistant" and turns:
            turns[-1] = (turns[-1][0], f"{turns[-1][1]}\n{text}")
        elif role == "assistant":
            yield Skipped("answer before any question")
        else:
            yield Skipped("message with an unknown role", repr(given))
    if prompt is not None:
        yield Skipped("last question without an answer")
    elif system:
        yield Skipped("system message after the last answer")
    yield turns


def instruction_turn(record, answer_field="output"):
    prompt = "\n".join(part for part in (text_field(record, "instruction"), text_field(record, "input", False)) if part)
    return [(prompt, text_field(record, answer_field))]


@register("medical_finetune", "dialogue")
def medical_finetune(record):
    """shibing624/medical finetune: instruction (+ input) -> output."""
    yield instruction_turn(record)


@register("alpaca_zh", "dialogue")
def alpaca_zh(record):
    """alpaca_gpt4_data_zh (JSON array): instruction (+ input) -> output."""
    yield instruction_turn(record)


@register("belle", "dialogue")
def belle(record):
    """BELLE 1M / 0.5M: instruction (+ input) -> output (`target` in one documented variant)."""
    answer_field = "target" if isinstance(record, dict) and "output" not in record and "target" in record else "output"
    yield instruction_turn(record, answer_field)


BELLE_SPEAKER = re.compile(r"^(Human|Assistant)[:：]", re.MULTILINE)


@register("belle_multiturn", "dialogue")
def belle_multiturn(record):
    """BELLE multiturn_chat_0.8M: `instruction` holds the history as "Human:…\\nAssistant:…" lines ending
    in an empty "Assistant:"; `output` answers the last Human turn."""
    parts = BELLE_SPEAKER.split(text_field(record, "instruction"))
    messages = [("user", parts[0].strip())] if parts[0].strip() else []
    messages += [(speaker, text.strip()) for speaker, text in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1] == ("Assistant", ""):
        messages.pop()
    extra = text_field(record, "input", False)
    if extra and messages:
        messages[-1] = (messages[-1][0], f"{messages[-1][1]}\n{extra}")
    yield from dialogue(messages + [("assistant", text_field(record, "output"))])


@register("huatuo", "dialogue")
def huatuo(record):
    """HuatuoGPT-sft-data-v1: `data` alternates "问：…" and "答：…"; prefixes stripped, a trailing
    question without answer dropped (and counted)."""
    utterances = list_field(record, "data")
    if not all(isinstance(u, str) for u in utterances):
        raise BadRecord(
            "field 'data' holds a non-text utterance",
            next(type(u).__name__ for u in utterances if not isinstance(u, str)),
        )
    if len(utterances) % 2:
        yield Skipped("last question without an answer")
    texts = [re.sub(r"^\s*[问答][:：]\s*", "", u).strip() for u in utterances[: len(utterances) // 2 * 2]]
    yield list(zip(texts[0::2], texts[1::2]))


def messages_field(record, name, role_key, text_key):
    messages = list_field(record, name)
    odd = [type(message).__name__ for message in messages if not isinstance(message, dict)]
    if odd:
        raise BadRecord(f"a message of '{name}' is not an object", odd[0])
    return [(text_field(message, role_key), text_field(message, text_key)) for message in messages]


@register("disc_med", "dialogue")
def disc_med(record):
    """DISC-Med-SFT: `conversation` [{role, content}]."""
    yield from dialogue(messages_field(record, "conversation", "role", "content"))


@register("sharegpt", "dialogue")
def sharegpt(record):
    """ShareGPT (JSON array or lines): `conversations` [{from: human|user|gpt|assistant|system, value}];
    minimind's [{role, content}] variant too. System turns go in front of the next prompt."""
    messages = list_field(record, "conversations")
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    keys = ("from", "value") if "from" in first or "value" in first else ("role", "content")
    yield from dialogue(messages_field(record, "conversations", *keys))


@register("chatmed_consult", "dialogue")
def chatmed_consult(record):
    """ChatMed_Consult: query -> response."""
    yield [(text_field(record, "query"), text_field(record, "response"))]


@register("chatmed_tcm", "dialogue")
def chatmed_tcm(record):
    """ChatMed_TCM (ShenNong): query -> response."""
    yield [(text_field(record, "query"), text_field(record, "response"))]


@register("medical_dialogue", "dialogue", containers=("csv",))
def medical_dialogue(record):
    """Toyhom Chinese-medical-dialogue-data (GB18030 CSV): ask -> answer, the title in front of the ask
    when the ask does not already contain it."""
    title, ask = text_field(record, "title", False), text_field(record, "ask")
    prompt = "\n".join(part for part in (title if title not in ask else "", ask) if part)
    yield [(prompt, text_field(record, "answer"))]


# ---- multiple-choice questions


def make_question(question, options, answer, subject, explanation):
    odd = [letter for letter in options if not re.fullmatch("[A-Z]", letter)]
    if odd:
        raise BadRecord("option key is not one capital letter", repr(odd[0])[:40])
    options = {letter: text for letter, text in options.items() if text}
    answer = "" if answer.lower() == "nan" else answer.upper().replace(" ", "").replace(",", "")
    if not question:
        raise BadRecord("empty question")
    if len(options) < 2:
        raise BadRecord("fewer than two options", ", ".join(options))
    if not set(answer) <= set(options):
        raise BadRecord("answer is not one of the options", f"{answer!r} not in {''.join(options)}")
    return {"question": question, "options": options, "answer": answer, "subject": subject, "explanation": explanation}


def letter_options(record, letters="ABCD"):
    """The four option columns of a C-Eval / CMMLU row; a filled column named by another letter would be an
    option silently left out of the question, so the row is refused (CMB / CMExam take any number)."""
    extra = [key for key, value in record.items() if isinstance(key, str) and re.fullmatch("[E-Z]", key) and value]
    if extra:
        raise BadRecord("option columns beyond D (this format has four options, A-D)", ", ".join(extra))
    return {letter: text_field(record, letter) for letter in letters}


@register("ceval", "question", containers=("csv",))
def ceval(record, path):
    """C-Eval {subject}_{split}.csv: id, question, A-D, answer (empty in test), explanation."""
    subject = re.sub(r"_(dev|val|test)$", "", Path(path).name.split(".")[0])
    yield make_question(
        text_field(record, "question"),
        letter_options(record),
        text_field(record, "answer", False),
        subject,
        text_field(record, "explanation", False),
    )


@register("cmmlu", "question", containers=("csv",))
def cmmlu(record, path):
    """CMMLU {split}/{subject}.csv: an unnamed index column, Question, A-D, Answer."""
    yield make_question(
        text_field(record, "Question"),
        letter_options(record),
        text_field(record, "Answer", False),
        Path(path).name.split(".")[0],
        "",
    )


@register("cmb", "question")
def cmb(record, path):
    """CMB-Exam (JSON array): question, option {letter: text} (empty letters dropped), answer ("ABC" for
    multiple answers; absent in test), exam_subject, explanation."""
    options = _value(record, "option", True)
    if not isinstance(options, dict):
        raise BadRecord("field 'option' is not an object", type(options).__name__)
    yield make_question(
        text_field(record, "question"),
        {k.strip(): text_field(options, k) for k in options},
        text_field(record, "answer", False),
        text_field(record, "exam_subject", False),
        text_field(record, "explanation", False),
    )


CMEXAM_NO_VALUE = ("", "不符合", "N/A", "NA", "nan")  # what CMExam's annotation columns hold where none applies
CMEXAM_OPTION = re.compile(r"([A-Z])(?:[\s.．、:：]+(.*))?")


@register("cmexam", "question", containers=("csv",))
def cmexam(record, path):
    """CMExam: Question, Options ("A text" per line), Answer (NaN/empty -> "": callers skip those),
    Explanation; subject = Clinical Department, else Medical Discipline, where present."""
    options = {}
    for line in filter(None, (line.strip() for line in text_field(record, "Options").splitlines())):
        match = CMEXAM_OPTION.fullmatch(line)
        if not match:
            raise BadRecord("Options line is not '<LETTER> <text>'", line[:40])
        if match[1] in options:
            raise BadRecord("Options gives a letter twice", line[:40])
        options[match[1]] = (match[2] or "").strip()
    subject = next(
        (
            value
            for value in (
                text_field(record, "Clinical Department", False),
                text_field(record, "Medical Discipline", False),
            )
            if value not in CMEXAM_NO_VALUE
        ),
        "",
    )
    yield make_question(
        text_field(record, "Question"),
        options,
        text_field(record, "Answer", False),
        subject,
        text_field(record, "Explanation", False),
    )


# ---- image conversations (vision-language training, VQA evaluation)

IMAGE_PLACEHOLDER = "<image>"  # marks where an image goes in a prompt, in every format below
IMAGE_FILES = ("*.jpg", "*.jpeg", "*.png", "*.bmp", "*.gif", "*.webp")  # a dataset folder's images: not records
IMAGE_FOLDERS = {
    "llava": "",
    "minimind_v": "",
    "slake": "imgs",
    "pmc_vqa": "images",
    "vqa_rad": "VQA_RAD Image Folder",
}  # where image paths point, relative to the data file's folder
YES_NO = {"yes", "no", "是", "否"}


@dataclass(frozen=True)
class ImageDialogue:
    """A conversation about images: turns [(prompt, answer)], every "<image>" in a prompt standing for the next
    of `images` (a path under the image folder, or the encoded image's bytes). VQA items also carry
    answer_type ("closed": yes/no or options; "open") and, for multiple choice, options {letter: text}
    and the gold letter `label`. `origin` is (file, location) of the record, set by iter_image_dialogues."""

    turns: list
    images: list
    answer_type: str = ""
    options: dict = field(default_factory=dict)
    label: str = ""
    origin: tuple = ()


def image_dialogue(messages, images, **vqa):
    """[(role, text)] and the images -> yields Skipped notes, then an ImageDialogue; placeholders and images
    must match one to one."""
    turns = []
    for item in dialogue(messages):
        if isinstance(item, Skipped):
            yield item
        else:
            turns = item
    if any(IMAGE_PLACEHOLDER in answer for _, answer in turns):
        raise BadRecord("<image> in an answer")
    placeholders = sum(prompt.count(IMAGE_PLACEHOLDER) for prompt, _ in turns)
    if placeholders != len(images):
        raise BadRecord(
            "<image> placeholders do not match the images", f"{placeholders} placeholder(s), {len(images)} image(s)"
        )
    yield ImageDialogue(turns, list(images), **vqa)


def image_names(value, field_name) -> list:
    """A record's image field as a list: a path, a list of paths, or null/"" (none)."""
    if value is None or value == "":
        return []
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(name, str) and name.strip() for name in names):
        raise BadRecord(f"field '{field_name}' is not an image path or a list of them", repr(value)[:80])
    return [name.strip() for name in names]


def placeholders_first(text):
    """LLaVA's preprocessing: a turn's <image> placeholders are moved to its start, one line each."""
    count = text.count(IMAGE_PLACEHOLDER)
    return f"{IMAGE_PLACEHOLDER}\n" * count + text.replace(IMAGE_PLACEHOLDER, "").strip() if count else text


@register("llava", "image", companions=IMAGE_FILES)
def llava(record):
    """LLaVA's format (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json, ShareGPT4V, the
    Chinese LLaVA caption and instruction sets; JSON array or lines): `id`, `image` (a path under the image
    folder, or a list of them; absent: a text-only conversation), `conversations` [{from: human|gpt, value}]."""
    images = image_names(_value(record, "image", False), "image")
    if "conversations" not in record and "conversatons" in record:  # LLaVA-Med's files spell it so
        record = {**record, "conversations": record["conversatons"]}
    messages = messages_field(record, "conversations", "from", "value")
    messages = [(role, placeholders_first(text)) for role, text in messages]
    yield from image_dialogue(messages, images)


@register("minimind_v", "image", containers=("parquet", "json"), companions=IMAGE_FILES)
def minimind_v(record):
    """minimind-v. Parquet (pretrain_i2t.parquet, sft_i2t.parquet): `conversations`, a JSON string of
    [{role, content}], and `image_bytes`, the encoded image or a list of them. The older JSON lines
    (pretrain_vlm_data.jsonl, sft_vlm_data.jsonl, sft_vlm_data_multi.jsonl): `conversations` [{role, content}]
    and `image`, "a.jpg" or "0.jpg, 1.jpg" under the image folder. A conversation without <image> is text-only
    and its image is not used (minimind-v fills that column with a small black image)."""
    conversations = _value(record, "conversations", True)
    if isinstance(conversations, str):
        try:
            conversations = json_loads(conversations)
        except json.JSONDecodeError as err:
            raise BadRecord("field 'conversations' is not JSON", str(err)) from None
        if holds_surrogate(conversations):
            raise BadRecord(LONE_SURROGATE)
    messages = messages_field({"conversations": conversations}, "conversations", "role", "content")
    if not any(IMAGE_PLACEHOLDER in text for _, text in messages):
        images = []
    elif "image_bytes" in record:
        images = record["image_bytes"] if isinstance(record["image_bytes"], list) else [record["image_bytes"]]
        if not all(isinstance(image, bytes) and image for image in images):
            raise BadRecord("field 'image_bytes' is not image data", type(record["image_bytes"]).__name__)
    else:
        images = [name.strip() for name in text_field(record, "image", False).split(",") if name.strip()]
    yield from image_dialogue(messages, images)


def vqa_item(question, answer, image, answer_type="", options=None, label=""):
    """One VQA question as a one-turn ImageDialogue: "<image>\nquestion" (+ "A. option" lines) -> answer."""
    if not question or not answer:
        raise BadRecord("empty question or answer")
    if IMAGE_PLACEHOLDER in question or IMAGE_PLACEHOLDER in answer:  # one image: the placeholder put in front
        raise BadRecord(
            "<image> placeholders do not match the images", f"{1 + question.count(IMAGE_PLACEHOLDER)} placeholder(s)"
        )
    kind = {"CLOSED": "closed", "OPEN": "open"}.get(answer_type.strip().upper())
    kind = kind or ("closed" if options or answer.strip().lower() in YES_NO else "open")
    choices = "".join(f"\n{letter}. {text}" for letter, text in (options or {}).items())
    prompt = f"{IMAGE_PLACEHOLDER}\n{question}{choices}"
    return ImageDialogue([(prompt, answer)], [image], kind, dict(options or {}), label)


@register("slake", "image", companions=IMAGE_FILES + ("detection.json", "question.json", "KG/*"))
def slake(record):
    """SLAKE (Slake1.0's train.json / validate.json / test.json; BoKelvin/SLAKE's validation.json): a JSON array
    of {qid, img_id, img_name (under imgs/), question, answer, q_lang (en|zh), answer_type (OPEN|CLOSED),
    content_type, modality, location, base_type, triple}. Both languages are kept."""
    yield vqa_item(
        text_field(record, "question"),
        count_or_text(record, "answer"),
        text_field(record, "img_name"),
        text_field(record, "answer_type", False),
    )


PMC_CHOICE = re.compile(r"^\s*([A-D])\s*[:：]\s*")


@register("pmc_vqa", "image", containers=("csv",), companions=IMAGE_FILES)
def pmc_vqa(record):
    """PMC-VQA (images under images/). train.csv / test.csv: Figure_path, Question, Answer (the gold choice's
    text; spelt Anwser in an older release), Choice A-D ("A:CT", " B:MRI "), Answer_label (the gold letter).
    train_2.csv / test_2.csv: no Answer_label, and Answer is the gold letter. Four-option questions: the prompt
    lists "A. CT" lines, the answer is "B. MRI"."""
    options = {letter: PMC_CHOICE.sub("", text_field(record, f"Choice {letter}")).strip() for letter in "ABCD"}
    answer = PMC_CHOICE.sub("", text_field(record, "Answer" if "Answer" in record else "Anwser")).strip()
    if "Answer_label" not in record and answer.upper() in ("A", "B", "C", "D"):  # *_2.csv: Answer is the letter
        label = answer.upper()
    else:
        label = text_field(record, "Answer_label", False).upper() or next(
            (letter for letter, text in options.items() if text == answer), ""
        )
    if not options.get(label):
        raise BadRecord("the answer is none of the choices (by Answer_label, letter or text)", repr(label or answer))
    yield vqa_item(
        text_field(record, "Question"),
        f"{label}. {options[label]}",
        text_field(record, "Figure_path"),
        "CLOSED",
        options,
        label,
    )


@register("vqa_rad", "image", containers=("json", "parquet"), companions=IMAGE_FILES)
def vqa_rad(record):
    """VQA-RAD. OSF: `VQA_RAD Dataset Public.json`, a JSON array of {qid, image_name (in `VQA_RAD Image Folder/`),
    image_organ, question, answer, answer_type (CLOSED|OPEN), question_type, phrase_type, ...}. Hugging Face's
    flaviagiammarino/vqa-rad (Parquet): image {bytes, path}, question, answer; the type is then inferred
    (yes/no answers are closed)."""
    image = _value(record, "image", False)
    if isinstance(image, dict) and isinstance(image.get("bytes"), bytes):
        image = image["bytes"]
    else:
        image = text_field(record, "image_name")
    yield vqa_item(
        text_field(record, "question"), count_or_text(record, "answer"), image, text_field(record, "answer_type", False)
    )


def count_or_text(record, name: str) -> str:
    """A VQA answer: text, or an integer (VQA-RAD's "How many gallstones?" is answered 4, not "4")."""
    value = _value(record, name, True)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return text_field(record, name)


# ---- preference pairs (DPO): {"history": [(prompt, answer), ...], "prompt", "chosen", "rejected"}


def answer_text(record, name: str) -> str:
    """A preference answer: plain text, or one message ({value} / {content}, or a list holding one)."""
    value = _value(record, name, True)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise BadRecord(f"field '{name}' is not text or one message", type(value).__name__)
    return value.strip()


def preference_pair(messages, chosen, rejected):
    """Yields dialogue()'s notes, then the pair: `messages` [(role, text)] end with the question both answers
    answer; earlier turns are its history, system messages go in front of the next question."""
    if not messages or ROLES.get(str(messages[-1][0]).strip().lower()) != "user":
        raise BadRecord("the conversation does not end with the question the answers answer")
    *notes, turns = dialogue(list(messages) + [("assistant", chosen)])
    yield from notes
    *history, (prompt, _) = turns
    yield {"history": history, "prompt": prompt, "chosen": chosen, "rejected": rejected}


@register("medical_reward", "preference")
def medical_reward(record):
    """shibing624/medical `reward` split (and MedicalGPT's dpo_zh files): question, response_chosen,
    response_rejected; optional system (in front of the question) and history [[question, answer], ...]."""
    history = _value(record, "history", False) or []
    if not isinstance(history, list) or not all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(text, str) for text in turn) for turn in history
    ):
        raise BadRecord("field 'history' is not a list of [question, answer] texts")
    messages = [("system", text_field(record, "system", False))] if text_field(record, "system", False) else []
    messages += [(role, text.strip()) for turn in history for role, text in zip(("user", "assistant"), turn)]
    yield from preference_pair(
        messages + [("user", text_field(record, "question"))],
        text_field(record, "response_chosen"),
        text_field(record, "response_rejected"),
    )


@register("dpo_pairs", "preference")
def dpo_pairs(record):
    """TRL's preference layout: prompt, chosen, rejected as text; or conversational, prompt [{role, content}]
    ending with the user's question and chosen / rejected [{role: assistant, content}]."""
    if isinstance(_value(record, "prompt", True), list):
        messages = messages_field(record, "prompt", "role", "content")
    else:
        messages = [("user", text_field(record, "prompt"))]
    yield from preference_pair(messages, answer_text(record, "chosen"), answer_text(record, "rejected"))


@register("dpo_conversations", "preference")
def dpo_conversations(record):
    """MedicalGPT's multi-turn preference data: conversations [{from: system|human|gpt, value}] ending with the
    human turn answered, chosen / rejected {from: gpt, value} (or text)."""
    yield from preference_pair(
        messages_field(record, "conversations", "from", "value"),
        answer_text(record, "chosen"),
        answer_text(record, "rejected"),
    )


# Registry key sets. Every dialogue format also reads as pretraining text (its turns flattened).
SFT_FORMATS = frozenset(name for name, fmt in FORMATS.items() if fmt.kind == "dialogue")
MCQ_FORMATS = frozenset(name for name, fmt in FORMATS.items() if fmt.kind == "question")
PRETRAIN_FORMATS = frozenset(name for name, fmt in FORMATS.items() if fmt.kind == "text") | SFT_FORMATS
IMAGE_FORMATS = frozenset(name for name, fmt in FORMATS.items() if fmt.kind == "image")
PREFERENCE_FORMATS = frozenset(name for name, fmt in FORMATS.items() if fmt.kind == "preference")

# Other names a source may carry (file names, dataset names); matched after lower-casing and '-' -> '_'.
ALIASES = {
    "wiki": ("wikipedia", "wikipedia_cn", "wiki_zh", "wikipedia_cn_20230720_filtered"),
    "baike": ("baidubaike", "baidu_baike", "563w_baidubaike"),
    "c4_zh": ("c4", "mc4", "c4_zh"),
    "wudao": ("wudaocorpora", "wudaocorpus", "wudaocorpus2.0_base_200g"),
    "medical_pretrain": ("medical_book_zh", "train_encyclopedia", "shibing624_medical_pretrain"),
    "skypile": ("skypile_150b",),
    "guidelines": ("open_guidelines", "clinical_guidelines"),
    "cmedqa2": ("cmedqa",),
    "chatmed_tcm": ("shennong_tcm", "chatmed_tcm_v0.2"),
    "medical_dialogue": ("toyhom", "chinese_medical_dialogue", "chinese_medical_dialogue_data"),
    "medical_finetune": ("train_zh_0", "shibing624_medical_finetune"),
    "huatuo": ("huatuogpt", "huatuogpt_sft_data_v1"),
    "disc_med": ("disc", "disc_med_sft", "disc_med_sft_released"),
    "chatmed_consult": ("chatmed_consult_v0.3",),
    "alpaca_zh": ("alpaca", "alpaca_gpt4_zh", "alpaca_gpt4_data_zh"),
    "belle": ("belle_1m", "belle_open_source_1m", "belle_open_source_0.5m"),
    "belle_multiturn": ("multiturn_chat_0.8m", "belle_multiturn_chat"),
    "sharegpt": ("sharegpt_gpt4", "sharegpt_v3", "minimind"),
    "s2orc": ("pdf_parses", "semantic_scholar", "cord19", "cord_19"),
    "pmc": ("pubmed_central", "pmc_oa", "oa_comm", "oa_noncomm", "oa_other"),
    "pubmed": ("medline", "pubmed_baseline"),
    "pdf": ("medsci", "medsci_guidelines", "guidelines_pdf"),
    "ceval": ("c_eval", "ceval_exam"),
    "text": ("txt", "plain", "plaintext", "heldout", "notes"),
    "llava": (
        "llava_pretrain",
        "llava_instruct",
        "llava_zh",
        "blip_laion_cc_sbu_558k",
        "llava_v1_5_mix665k",
        "sharegpt4v",
    ),
    "minimind_v": ("minimind_v_dataset", "pretrain_i2t", "sft_i2t", "pretrain_vlm_data", "sft_vlm_data"),
    "slake": ("slake1.0",),
    "pmc_vqa": ("pmcvqa",),
    "vqa_rad": ("vqarad", "vqa_rad_dataset_public"),
    "medical_reward": ("shibing624_medical_reward", "dpo_zh"),
    "dpo_pairs": ("trl", "trl_dpo", "preference_pairs"),
    "dpo_conversations": ("medicalgpt_dpo", "sharegpt_dpo"),
}


def known_formats() -> str:
    kinds = (
        ("pretraining", FORMATS.keys() - SFT_FORMATS - MCQ_FORMATS - IMAGE_FORMATS - PREFERENCE_FORMATS),
        ("SFT (also pretraining)", SFT_FORMATS),
        ("MCQ", MCQ_FORMATS),
        ("image conversations", IMAGE_FORMATS),
        ("preference pairs (DPO)", PREFERENCE_FORMATS),
    )
    return "; ".join(f"{label}: {', '.join(sorted(names))}" for label, names in kinds)


def infer_format(name: str) -> str:
    """The format a source NAME stands for: a registry key or alias, exactly or as a prefix
    ("wiki_2023" -> wiki, "belle_multiturn_part1" -> belle_multiturn; the longest match wins)."""
    key = name.lower().replace("-", "_").replace(" ", "_")
    names = {fmt: fmt for fmt in FORMATS} | {alias: fmt for fmt, aliases in ALIASES.items() for alias in aliases}
    for candidate in sorted(names, key=len, reverse=True):
        if key == candidate or key.startswith(candidate + "_"):
            return names[candidate]
    raise ValueError(
        f"cannot tell the format of source '{name}': name it after its format, FORMAT or FORMAT_anything "
        f"(e.g. text_{name}=PATH for plain text). Formats: {known_formats()}"
    )


def is_plain_name(name: str) -> bool:
    """A name that can only mean a folder right inside the output folder: no separator, not "." or "..",
    not hidden."""
    return re.fullmatch(r"[\w-][\w.-]*", name) is not None


def parse_source(spec: str, fmt: str | None = None) -> Source:
    """ "NAME=PATH_OR_GLOB" -> Source. PATH may be a file, a folder (every file below it, sorted; hidden
    ones skipped) or a glob. A missing or unreadable path raises now, before any work; a glob that
    matches nothing gives files=[] (callers report it and go on)."""
    name, sep, location = spec.partition("=")
    name = name.strip()
    if not sep or not name or not location:
        raise ValueError(f"--source {spec!r}: expected NAME=PATH_OR_GLOB, e.g. wiki=data/raw/wiki/*.json")
    if not is_plain_name(name):
        raise ValueError(
            f"--source {spec!r}: NAME names the output folder, so it is a plain name: letters, "
            "digits, '_', '-' and '.', not starting with '.' (no '.', '..', hidden names or paths)"
        )
    fmt = fmt or infer_format(name)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}' for source '{name}'. Formats: {known_formats()}")
    if os.path.exists(location):  # a real name, even one holding glob characters ("sky[1].jsonl")
        files = _files_below(location) if os.path.isdir(location) else [Path(location)]
    elif any(char in location for char in "*?["):
        matches = sorted(glob.glob(location, recursive=True))
        files = [f for match in matches for f in (_files_below(match) if os.path.isdir(match) else [Path(match)])]
        files = list(dict.fromkeys(files))  # "**" matches a folder and the files below it
    else:
        raise FileNotFoundError(f"source '{name}': {location} does not exist")
    for path in tqdm(files, desc=f"{name}: checking files", unit=" files", delay=LISTING_BAR_DELAY, leave=False):
        if path.is_symlink() and not path.exists():
            raise FileNotFoundError(f"source '{name}': {path} is a broken link (to {os.readlink(path)})")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"source '{name}': cannot read {path}")
    return Source(name, fmt, files, location)


def check_out(path, folder: bool = False):
    """Refuse, before any work, an --out that cannot be written: a folder where a file is wanted (or a
    file where a folder is), a path below a file, or a read-only place. Every tool that reads sources
    writes one output; a full disk can only be found while writing."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"--out {path} is a {'file' if folder else 'folder'}: give a {'folder' if folder else 'file'}")
    existing = path if folder else path.parent  # the folder that is, or will hold, the output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot write in {existing} (read-only?)")


LISTING_BAR_DELAY = 2  # seconds before listing or checking a source's files shows progress: small ones print nothing


def _files_below(folder) -> list[Path]:
    if not os.access(folder, os.R_OK | os.X_OK):
        raise PermissionError(f"cannot list folder {folder}")

    def refuse(err):
        raise PermissionError(f"cannot list folder {err.filename}: {err.strerror}")

    files, seen = [], {os.path.realpath(folder)}
    with tqdm(desc=f"listing {folder}", unit=" files", delay=LISTING_BAR_DELAY, leave=False) as bar:
        for root, dirs, names in os.walk(folder, onerror=refuse, followlinks=True):  # a linked folder, like a file
            dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen]
            seen.update(os.path.realpath(os.path.join(root, d)) for d in dirs)  # each folder once: links may loop
            files += [Path(root, n) for n in names if not n.startswith(".")]
            bar.update(len(names))
    return sorted(files, key=str)


# ---------------------------------------------------------------- reading a source


def _format(source: Source, wanted: str) -> Format:
    fmt = FORMATS.get(source.format)
    if fmt is None:
        raise ValueError(f"unknown format '{source.format}' for source '{source.name}'. Formats: {known_formats()}")
    allowed = {
        "text": PRETRAIN_FORMATS,
        "dialogue": SFT_FORMATS,
        "question": MCQ_FORMATS,
        "image": IMAGE_FORMATS,
        "preference": PREFERENCE_FORMATS,
    }[wanted]
    if source.format not in allowed:
        raise ValueError(
            f"source '{source.name}': format '{source.format}' holds {fmt.kind}s, not {wanted}s; "
            f"{wanted} formats: {', '.join(sorted(allowed))}"
        )
    return fmt


@functools.cache
def _glob_regexes(globs: tuple) -> list[tuple[int, re.Pattern]]:
    """Path.match's rule (a glob matches as many trailing components of a path as it has) as one regex
    per number of components: Path.match parses the path and the glob on every call, an eighth of a
    worker's time on a folder of small articles."""
    by_depth = {}
    for pattern in globs:
        by_depth.setdefault(pattern.count("/") + 1, []).append(fnmatch.translate(pattern))
    return [(depth, re.compile("|".join(regexes))) for depth, regexes in by_depth.items()]


def matches_any(path, globs: tuple) -> bool:
    """Path(path).match(glob) for any of globs."""
    for depth, regex in _glob_regexes(globs):
        components = os.fspath(path).rsplit("/", depth)
        if len(components) >= depth and regex.match("/".join(components[-depth:])):
            return True
    return False


def _readable_files(source: Source, fmt: Format, problems: Problems) -> Iterator[Path]:
    """The source's files its format reads: companions are passed over, other kinds counted."""
    for path in source.files:
        if matches_any(path, fmt.companions):
            continue
        kind = container(path)
        if kind in fmt.containers:
            yield path
        else:
            problems.add(
                "file of a kind this format does not read",
                path,
                None,
                f"{kind or 'unknown'} file; {source.format} reads {'/'.join(fmt.containers)}",
            )


def _outputs(source: Source, fmt: Format, problems: Problems, span) -> Iterator[tuple[Path, object, object]]:
    """(file, location, output) for every output of the source's reader; everything skipped is counted."""
    for path in _readable_files(source, fmt, problems):
        for where, record in iter_records(path, problems, span, fmt):
            problems.records += 1
            try:
                for output in fmt.read(record, path) if fmt.kind == "question" else fmt.read(record):
                    if isinstance(output, Skipped):
                        problems.add(output.reason, path, where, output.detail, part=True)
                    else:
                        yield path, where, output
            except BadRecord as err:
                problems.add(err.reason, path, where, err.detail)
            except RecursionError:  # the XML readers walk elements recursively: 5,000 nested <sec> exceed the limit
                problems.add("record nested too deeply, record skipped", path, where)


def iter_texts(source: Source, problems: Problems, span=None) -> Iterator[str]:
    """Pretraining documents, raw (before cleaning). Dialogue formats are flattened: "prompt\\nanswer"
    per turn, one line each. span=(start, end, first_line) reads one byte range of a one-file source
    (see split_source)."""
    fmt = _format(source, "text")
    if fmt.whole_source:
        yield from fmt.read(list(_readable_files(source, fmt, problems)), problems)
        return
    for path, where, output in _outputs(source, fmt, problems, span):
        if fmt.kind == "dialogue":
            turns = _checked_turns(output, path, where, problems)
            if not turns:
                continue
            output = "\n".join(f"{prompt}\n{answer}" for prompt, answer in turns)
        if output and not output.isspace():
            yield output
        else:
            problems.add("empty text", path, where)


def _checked_turns(turns, path, where, problems):
    if not turns:
        problems.add("no complete question-answer turn", path, where)
        return None
    if not all(prompt and answer for prompt, answer in turns):
        problems.add("empty question or answer", path, where)
        return None
    return turns


def iter_dialogues(source: Source, problems: Problems) -> Iterator[list[tuple[str, str]]]:
    """SFT conversations: the turns [(prompt, answer), ...] in order; none empty."""
    fmt = _format(source, "dialogue")
    for path, where, turns in _outputs(source, fmt, problems, None):
        turns = _checked_turns(turns, path, where, problems)
        if turns:
            yield turns


def iter_questions(source: Source, problems: Problems) -> Iterator[dict]:
    """{"question", "options": {"A": text, ...} (non-empty ones), "answer": "A" / "ABC" / "" (unknown),
    "subject", "explanation", "where": its line (or "#N" in a JSON array)}."""
    fmt = _format(source, "question")
    for _, where, question in _outputs(source, fmt, problems, None):
        yield {**question, "where": where}


def iter_preferences(source: Source, problems: Problems) -> Iterator[dict]:
    """DPO pairs {"history": [(prompt, answer), ...], "prompt", "chosen", "rejected"}: none empty, chosen and
    rejected different (a pair of equal answers teaches nothing)."""
    fmt = _format(source, "preference")
    for path, where, pair in _outputs(source, fmt, problems, None):
        if not all([pair["prompt"], pair["chosen"], pair["rejected"]] + [p and a for p, a in pair["history"]]):
            problems.add("empty question or answer", path, where)
        elif pair["chosen"] == pair["rejected"]:
            problems.add("chosen and rejected are the same answer", path, where)
        else:
            yield pair


def expected_input(format_name: str) -> str:
    """What a format reads, for messages about a source that yielded nothing: its reader's docstring."""
    fmt = FORMATS[format_name]
    return f"{format_name} reads {'/'.join(fmt.containers)} files: " + " ".join(fmt.read.__doc__.split())


def iter_image_dialogues(source: Source, problems: Problems, image_folder=None) -> Iterator[ImageDialogue]:
    """ImageDialogues whose image paths are resolved under `image_folder` (default: IMAGE_FOLDERS' folder beside
    each data file). A path that is absolute or climbs out of the folder, or a file that is missing, drops the
    record (counted); images are decoded only when used."""
    fmt = _format(source, "image")
    for path, where, item in _outputs(source, fmt, problems, None):
        root = Path(image_folder) if image_folder else Path(path).parent / IMAGE_FOLDERS[source.format]
        try:
            images = [image if isinstance(image, bytes) else image_file(root, image) for image in item.images]
        except BadRecord as err:
            problems.add(err.reason, path, where, err.detail)
            continue
        yield replace(item, images=images, origin=(str(path), where))


def image_file(root: Path, name: str) -> Path:
    relative = PurePath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise BadRecord("image path outside the image folder", name)
    path = root / relative
    if not path.is_file():
        raise BadRecord("missing image file", str(path))
    return path


# ---------------------------------------------------------------- splitting big files for parallel work


def split_source(
    source: Source, target_bytes: int, sizes: list[int] | None = None, gzip_spans: int = 2
) -> list[tuple[Source, Span | None]]:
    """Independently readable pieces of a source, in reading order: (Source, Span or None).
    Plain JSON-lines, JSON-array, CSV and text files larger than target_bytes are cut into byte ranges
    that begin at a record start: a line; for text, one after a blank line; for CSV, one where the quotes
    before it pair up (a newline inside a quoted field is not a row end); for a JSON array, an item
    (see _array_spans). An XML file of records, plain or gzipped, is cut into equal spans whose readers
    find their first record (see _xml_spans and iter_xml). Reading the pieces one after another gives
    exactly what reading the file gives (a cut that the bytes placed wrongly is caught as it is read: see
    Span). Every other file is read whole, and consecutive ones are grouped into pieces of up to
    target_bytes (a folder of 100,000 small articles is not 100,000 pieces: each costs a worker round trip
    and a part file); formats that join files are one piece. What is counted once per file stays counted
    once. sizes: the files' sizes where the caller has them (one stat a file is not free on a network
    file system holding millions). gzip_spans: the most spans of a gzipped XML file (the workers: gzip
    cannot seek, so each span decompresses the file from its start)."""
    fmt = FORMATS[source.format]
    if fmt.whole_source:
        return [(source, None)]
    target_bytes = max(target_bytes, 1)
    pieces, group_bytes = [], 0  # group_bytes: of the last piece, when it is a group of whole files
    for path, size in zip(source.files, sizes or map(os.path.getsize, source.files)):
        if size > target_bytes and _splittable(path, fmt):
            single = Source(source.name, source.format, [path], source.location)
            pieces += [(single, span) for span in _spans(path, target_bytes, container(path), gzip_spans) or [None]]
        elif pieces and pieces[-1][1] is None and group_bytes + size <= target_bytes:
            pieces[-1][0].files.append(path)
            group_bytes += size
        else:
            pieces.append((Source(source.name, source.format, [path], source.location), None))
            group_bytes = size
    return pieces


def _splittable(path, fmt: Format) -> bool:
    """A plain JSON-lines, JSON-array, CSV or text file the format reads, or an XML file (plain or gzipped)
    of records in an encoding whose bytes show their tags: one that can be cut at record starts (a JSON
    array only where _array_spans finds its items)."""
    kind = container(path)
    if kind not in fmt.containers:
        return False
    if kind == "xml":
        return fmt.record_tag is not None and _tags_in_bytes(path)
    if str(path).endswith(".gz") or kind not in ("json", "text", "csv"):
        return False
    first = _first_byte(path) if kind == "json" else None
    return kind != "json" or first == b"[" or (first == b"{" and not _one_json_object(path))


def _tags_in_bytes(path) -> bool:
    """An XML file whose start tags can be found by their bytes: one expat reads as it is (no declared
    encoding decoded first, see xml_transcoder) and not in UTF-16."""
    try:
        with open_binary(path) as f:
            head = f.read(XML_CHUNK_BYTES)
        decoded_first = xml_transcoder(head) is not None
    except (OSError, EOFError, zlib.error, LookupError):
        return False
    return (
        not decoded_first
        and b"\x00" not in head[:4]
        and not head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    )


def _xml_spans(path, target_bytes: int, gzip_spans: int) -> list[Span] | None:
    """Spans of equal size of an XML file of records (offsets into its bytes after gunzip; a gzipped file's
    size is its trailer's, the last span read to its end), at most gzip_spans of a gzipped file. The
    reader finds the records that start in each: iter_xml."""
    size, gzipped = os.path.getsize(path), str(path).endswith(".gz")
    if gzipped:
        with open(path, "rb") as f:
            f.seek(max(size - 4, 0))
            size = max(int.from_bytes(f.read(4), "little"), size)  # the trailer holds the size modulo 4 GiB
    count = -(-size // target_bytes)
    count = min(count, gzip_spans) if gzipped else count
    if count < 2:
        return None
    cuts = [0] + [size * k // count for k in range(1, count)] + [size]
    if gzipped:  # its spans count their lines as they decompress from its start
        return [Span(start, end, 1, read_to_end=end == size) for start, end in zip(cuts, cuts[1:])]
    spans, first_line = [], 1
    with open(path, "rb") as f:
        for start, end in zip(cuts, cuts[1:]):
            spans.append(Span(start, end, first_line, read_to_end=end == size))
            first_line += _count(f, start, end, b"\n")
    return spans


def _one_json_object(path) -> bool:
    """A pretty-printed JSON object: its first line is a lone "{" (iter_jsonl reports such a file once)."""
    with open(path, "rb") as f:
        return f.readline(64).removeprefix(codecs.BOM_UTF8).strip() == b"{"


COUNT_PIECE = 1 << 20  # bytes read at a time by _count: large enough to amortise a call, small enough for cache


def _spans(path, target_bytes: int, kind: str, gzip_spans: int) -> list[Span] | None:
    if kind == "json" and _first_byte(path) == b"[":
        return _array_spans(path, target_bytes)
    if kind == "xml":
        return _xml_spans(path, target_bytes, gzip_spans)
    size = os.path.getsize(path)
    spans, start, first_line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            end = size if start + target_bytes >= size else _boundary(f, start, start + target_bytes, kind, size)
            spans.append(Span(start, end, first_line))
            start, first_line = end, first_line + _count(f, start, end, b"\n")
    return spans


def _count(f, start: int, end: int, byte: bytes) -> int:
    """How often byte occurs in [start, end) of the open file. The workers wait for these counts (every
    unit's first line number), so they are taken with numpy over one reused 1 MiB buffer: a third of the
    time of bytes.count over fresh reads (320 MiB: ~75 against ~220 ms)."""
    f.seek(start)
    buffer = bytearray(min(COUNT_PIECE, max(end - start, 0)))
    values = np.frombuffer(buffer, np.uint8)
    found, left = 0, end - start
    while left > 0:
        got = f.readinto(memoryview(buffer)[: min(left, len(buffer))])
        if not got:
            break
        found, left = found + int(np.count_nonzero(values[:got] == byte[0])), left - got
    return found


def _boundary(f, start: int, offset: int, kind: str, size: int) -> int:
    """The first line start at or after offset; for text, the first one right after a blank line; for
    CSV, the first one with an even number of quote bytes since start (a row start: '"' is one byte in
    UTF-8 and GB18030 alike and never part of another character)."""
    f.seek(offset - 1)
    position = offset - 1 + len(f.readline())
    if kind == "csv":
        quotes = _count(f, start, position, b'"')
        f.seek(position)
        while quotes % 2 and position < size:
            line = f.readline()
            position, quotes = position + len(line), quotes + line.count(b'"')
    while kind == "text" and position < size:
        line = f.readline()
        position += len(line)
        if not line.strip():
            break
    return min(position, size)


ARRAY_PIECE = 1 << 20  # a JSON array is scanned this many bytes at a time (4 MiB: 18 MiB more RSS, no faster)
QUOTE, BACKSLASH, OPENING, CLOSING, COMMA = 1, 2, 3, 4, 5
JSON_SYNTAX = bytes(  # byte -> its part in JSON's structure (0: none): bytes.translate classes a piece at C speed
    dict(zip(b'"\\[{]},', (QUOTE, BACKSLASH, OPENING, OPENING, CLOSING, CLOSING, COMMA))).get(byte, 0)
    for byte in range(256)
)


def _array_spans(path, target_bytes: int) -> list[Span] | None:
    """Spans of a JSON array file, each a run of whole items, cut at the first top-level comma past every
    target_bytes and numbered by the index of their first item (the array's brackets are in none: the
    reader reads a span as an array of its own). None, and the file is read whole, unless it is valid
    UTF-8 (where every line decodes as in the whole file) holding one array whose strings and brackets
    pair up, with an item on either side of every cut: a file malformed there is read whole, and the
    reader says where. JSON's structure is ASCII, which no byte of a UTF-8 multi-byte character is, so
    it is found in the bytes, with numpy over one piece at a time: a quote not escaped (after an even run
    of backslashes) opens or closes a string; brackets and commas outside strings are the structure."""
    if not file_encoding(path).startswith("utf-8"):
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    in_string, depth, backslashes, base = 0, 0, 0, 0  # carried from piece to piece; backslashes: a run at the end
    opening = closing = None  # the array's brackets
    items, cuts, next_cut = 0, [], target_bytes  # top-level commas so far; (offset, index of the item after)
    with open(path, "rb") as f:
        while piece := f.read(ARRAY_PIECE):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError:
                return None
            classes = np.frombuffer(piece.translate(JSON_SYNTAX), np.uint8)
            where = np.flatnonzero(classes != 0)  # a bool array: several times faster than uint8
            kind = classes[where]
            toggles, backslashes = _string_edges(kind, where, len(piece), backslashes)
            inside = (np.cumsum(toggles) - toggles + in_string) % 2 == 1
            structure = ~inside & (kind >= OPENING)
            kind, offset = kind[structure], where[structure] + base
            step = (kind == OPENING).astype(np.int64) - (kind == CLOSING)
            after = np.cumsum(step) + depth
            before = after - step
            if opening is None and len(kind):
                opening = int(offset[0])  # the file's first byte that is not whitespace (split_source)
            closed = np.flatnonzero(after == 0)
            if closing is None and len(closed):
                closing = int(offset[closed[0]])  # past it, only whitespace is well-formed: checked at the end
            commas = offset[(kind == COMMA) & (before == 1)]
            while (found := int(np.searchsorted(commas, next_cut))) < len(commas):
                cut = int(commas[found])
                cuts.append((cut, items + found + 1))
                next_cut = cut + target_bytes
            items += len(commas)
            in_string = (in_string + int(toggles.sum())) % 2
            depth = int(after[-1]) if len(after) else depth
            base += len(piece)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return None
        if closing is None or _next_byte(f, closing + 1) or not all(_item_on_both_sides(f, c) for c, _ in cuts):
            return None
    starts = [(opening + 1, 0)] + [(cut + 1, item) for cut, item in cuts]
    ends = [cut for cut, _ in cuts] + [closing]
    return [Span(start, end, item) for (start, item), end in zip(starts, ends)]


def _string_edges(kind: np.ndarray, where: np.ndarray, length: int, backslashes: int) -> tuple[np.ndarray, int]:
    """Which of a piece's JSON syntax bytes (kind, at offsets where) are quotes that open or close a string:
    those after an even run of backslashes (backslashes: the run that ended the piece before). Also the
    run of backslashes that ends this piece."""
    index = np.arange(len(where))
    backslash = kind == BACKSLASH
    adjacent = np.zeros(len(where), bool)  # right after the previous entry
    adjacent[1:] = where[1:] - where[:-1] == 1
    adjacent[:1] = where[:1] == 0  # the piece's first byte: right after the last piece's last
    in_run = backslash & adjacent & np.r_[backslashes > 0, backslash[:-1]]
    run_start = np.where(in_run, 0, index)
    np.maximum.accumulate(run_start, out=run_start)
    run = index - run_start + 1 + np.where(in_run[:1].any() & (run_start == 0), backslashes, 0)  # run length so far
    odd_before = np.r_[backslashes % 2 == 1, backslash[:-1] & (run[:-1] % 2 == 1)] & adjacent
    ends_in_run = len(where) and backslash[-1] and where[-1] == length - 1
    return (kind == QUOTE) & ~odd_before, int(run[-1]) if ends_in_run else 0


def _next_byte(f, position: int, backwards: bool = False) -> bytes:
    """The first byte that is not whitespace from position on (backwards: before it), b"" for none."""
    while True:
        start = max(position - 4096, 0) if backwards else position
        f.seek(start)
        data = f.read(position - start if backwards else 4096)
        stripped = data.rstrip() if backwards else data.lstrip()
        if stripped or not data:
            return stripped[-1:] if backwards else stripped[:1]
        position = start if backwards else position + len(data)


def _item_on_both_sides(f, comma: int) -> bool:
    """Not a comma that follows "[" or "," or comes before "]" or ",": such a span would read as an empty
    array, with no error where the whole file's reading stops."""
    return _next_byte(f, comma, backwards=True) not in (b"[", b",") and _next_byte(f, comma + 1) not in (b"]", b",")
