"""Every SFT set -> one CSV of conversations (prompt, answer, history, source).

    python sft_data_process.py --source huatuo=data/raw/HuatuoGPT_sft_data_v1.jsonl \
        --source alpaca_zh=data/raw/alpaca_gpt4_data_zh.json --out data/sft/sft_data.csv

NAME picks the reader (formats: corpora.py) unless --format is given.
`history` is a JSON list of the earlier [prompt, answer] turns ([] for single-turn data); `prompt`
and `answer` are the last turn. Conversations with a turn over the length limits, exact duplicates
(across all sources of the run) and unreadable records are skipped and counted; a summary per source
is printed and written beside the CSV (<name>.summary.json). The CSV is written to a temp name and
renamed, so an interrupted run never leaves a half-written file behind. A source that yields no
conversation is an error: nothing is written, and the message says what the format expects.
"""

import argparse
import csv
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import corpora
from atomic import atomic_write, atomic_write_text

CSV_FIELDS = ["prompt", "answer", "history", "source"]


def conversations(source, problems, max_prompt_chars, max_answer_chars, seen, counts):
    """The source's conversations that pass the filters, as CSV rows; counts what was dropped."""
    for turns in corpora.iter_dialogues(source, problems):
        turns = [(p.strip(), a.strip()) for p, a in turns]
        if max_prompt_chars and any(len(p) > max_prompt_chars for p, _ in turns):
            counts["prompt too long"] += 1
            continue
        if max_answer_chars and any(len(a) > max_answer_chars for _, a in turns):
            counts["answer too long"] += 1
            continue
        if not all(p and a for p, a in turns):
            counts["empty after stripping"] += 1
            continue
        key = hashlib.sha1(json.dumps(turns, ensure_ascii=False).encode()).digest()
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        counts["kept"] += 1
        prompt, answer = turns[-1]
        yield {
            "prompt": prompt,
            "answer": answer,
            "source": source.name,
            "history": json.dumps([list(t) for t in turns[:-1]], ensure_ascii=False),
        }


def process(sources, out_path, max_prompt_chars=2048, max_answer_chars=4096):
    """Write the CSV; returns {source name: {"format", "files", "read" (records in the files), "kept",
    "dropped": {reason: n} (conversations the filters dropped), "skipped_records": {reason: n} (records the
    reader could not use), "parts_left_out": {reason: n} (parts of records read, e.g. a trailing question
    without an answer), "examples": ["file:line: reason", ...]}}; every record read is kept, dropped or
    skipped, once. A source
    that yields no conversation raises ValueError and nothing is written; so does a failed write (a
    full or read-only disk: OSError naming the file), leaving no temporary file."""
    corpora.check_out(out_path)
    out_path = Path(out_path)
    summary_path = summary_path_of(out_path)
    twice = corpora.repeated([source.name for source in sources])
    if twice:
        raise ValueError(f"--source name {', '.join(twice)} given twice: give each source a name of its own")
    inputs = {path.resolve(): source.name for source in sources for path in source.files}
    for path in (out_path, summary_path):
        if path.resolve() in inputs:
            raise ValueError(f"--out would overwrite {path}, an input file of source '{inputs[path.resolve()]}'")
    summary, seen = {}, set()

    def write_csv(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for source in sources:
                problems, counts = corpora.Problems(), Counter()
                if not source.files:
                    problems.add("no input files", source.location or source.name)
                rows = conversations(source, problems, max_prompt_chars, max_answer_chars, seen, counts)
                for row in tqdm(rows, desc=source.name, unit=" conv", leave=False):
                    writer.writerow(row)
                summary[source.name] = {
                    "format": source.format,
                    "files": [str(p) for p in source.files],
                    "read": problems.records,
                    "kept": counts.pop("kept", 0),
                    "dropped": dict(counts),
                    "skipped_records": dict(problems.counts),
                    "parts_left_out": dict(problems.parts),
                    "examples": problems.examples,
                }
        empty = [
            f"source '{name}' yielded no conversation (read {s['read']:,}; dropped {s['dropped'] or 'none'}; "
            f"skipped {s['skipped_records'] or 'none'}; first: {'; '.join(s['examples']) or '-'}). "
            f"Expected: {corpora.expected_input(s['format'])}"
            for name, s in summary.items()
            if not s["kept"]
        ]
        if empty:
            raise ValueError(f"nothing written to {out_path}: " + " | ".join(empty))

    atomic_write(out_path, write_csv)
    atomic_write_text(summary_path, json.dumps(summary, ensure_ascii=False, indent=2))
    return summary


def summary_path_of(out_path: Path) -> Path:
    """sft_data.csv -> sft_data.summary.json; sft_v1.5 -> sft_v1.5.summary.json (not sft_v1.summary.json)."""
    return out_path.with_name(out_path.name.removesuffix(".csv") + ".summary.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=PATH_OR_GLOB",
        help=f"an SFT set (repeatable); formats: {', '.join(sorted(corpora.SFT_FORMATS))}",
    )
    parser.add_argument("--format", default=None, help="reader for every --source (default: inferred from NAME)")
    parser.add_argument("--out", default="data/sft/sft_data.csv")
    parser.add_argument("--max-prompt-chars", type=int, default=2048, help="0: no limit")
    parser.add_argument("--max-answer-chars", type=int, default=4096, help="0: no limit")
    args = parser.parse_args(argv)
    for flag, value in (("--max-prompt-chars", args.max_prompt_chars), ("--max-answer-chars", args.max_answer_chars)):
        if value < 0:
            parser.error(f"{flag} must be >= 0 (0: no limit), not {value}")
    try:
        sources = [corpora.parse_source(spec, args.format) for spec in args.source]
        not_sft = [s.name for s in sources if s.format not in corpora.SFT_FORMATS]
        if not_sft:
            raise ValueError(f"{not_sft} are not SFT formats; known: {', '.join(sorted(corpora.SFT_FORMATS))}")
        summary = process(sources, args.out, args.max_prompt_chars, args.max_answer_chars)
    except ValueError as err:
        sys.exit(f"sft_data_process: {err}")
    except OSError as err:  # a missing input, a full or read-only disk
        sys.exit(f"sft_data_process: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""))
    total = sum(s["kept"] for s in summary.values())
    for name, s in summary.items():
        dropped = ", ".join(f"{k} {v}" for k, v in {**s["dropped"], **s["skipped_records"]}.items()) or "none"
        parts = ", ".join(f"{k} {v}" for k, v in s["parts_left_out"].items())
        print(
            f"{name:>18}: read {s['read']:>8,}  kept {s['kept']:>8,}  dropped: {dropped}"
            + (f"  (parts of records left out: {parts})" if parts else "")
        )
        for example in s["examples"]:
            print(f"{'':>20}{example}")
    print(f"wrote {total:,} conversations to {args.out} (summary: {summary_path_of(Path(args.out))})")


if __name__ == "__main__":
    main()
