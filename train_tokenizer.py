"""Train your own SentencePiece tokenizer, the llama2.c way, with ChatGLM2's id layout.

    python train_tokenizer.py --source text=data/sample/text --source wiki=data/sample/wiki \
        --vocab-size 8000 --out out/tokenizer

BPE with byte fallback (no <unk> for unseen characters), digits split one by one, identity
normalisation and kept whitespace (decode(encode(x)) == x), <unk>=0 <s>=1 </s>=2, then
chatglm_tokenizer's five specials after the pieces. The folder it writes (tokenizer.model,
tokenizer_config.json, tokenization_chatglm.py) loads with load_tokenizer(out) and with
AutoTokenizer.from_pretrained(out, trust_remote_code=True). Sources use data_process.py's readers.
"""

import argparse
import io
import os
import random
import re
import sys
from pathlib import Path

import sentencepiece as spm

from atomic import atomic_write
from chatglm_tokenizer import SPECIAL_TOKENS, load_tokenizer

MAX_IDS = 65536  # token files are uint16
MIN_PIECES = 3 + 256  # <unk> <s> </s> and the 256 byte-fallback pieces, before any of the text's own
MAX_LINE_CHARS = 2000  # SentencePiece skips longer sentences (max_sentence_length is in bytes)


def training_lines(texts, max_lines, seed=0):
    """(lines, how many there were): the non-empty lines of the documents, cut to MAX_LINE_CHARS; a
    uniform reservoir sample of max_lines of them when there are more, so a huge corpus costs
    O(max_lines) memory."""
    rng = random.Random(seed)
    sample, seen = [], 0
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            for start in range(0, len(line), MAX_LINE_CHARS):
                piece = line[start : start + MAX_LINE_CHARS]
                seen += 1
                if len(sample) < max_lines:
                    sample.append(piece)
                else:
                    slot = rng.randrange(seen)
                    if slot < max_lines:
                        sample[slot] = piece
    return sample, seen


def train(texts, out_dir, vocab_size=8000, max_lines=2_000_000, character_coverage=0.9995):
    """Train on an iterable of documents, write a loadable tokenizer folder, return the tokenizer."""
    if vocab_size + len(SPECIAL_TOKENS) > MAX_IDS:
        raise ValueError(
            f"vocab_size {vocab_size} + {len(SPECIAL_TOKENS)} specials exceeds {MAX_IDS} ids: "
            f"token files are uint16, so the largest id must be <= 65535 (use <= {MAX_IDS - len(SPECIAL_TOKENS)})"
        )
    lines, seen = training_lines(texts, max_lines)
    if not lines:
        raise ValueError("no text to train a tokenizer on")
    if seen > len(lines):
        print(f"training on {len(lines):,} lines sampled from {seen:,} (--max-lines)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            character_coverage=character_coverage,
            max_sentence_length=4 * MAX_LINE_CHARS,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:  # SentencePiece's message, e.g. too many distinct characters
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if needed:  # its advice names its own flag; say what to change here
            raise ValueError(
                f"vocab_size {vocab_size} is below the {needed[1]} pieces this text needs (its characters at "
                f"character_coverage {character_coverage}, 256 byte-fallback pieces, <unk> <s> </s>): "
                f"use --vocab-size >= {needed[1]}"
            ) from None
        raise ValueError(
            f"SentencePiece could not train with vocab_size={vocab_size}, "
            f"character_coverage={character_coverage}: {err}"
        ) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "tokenizer.model", lambda tmp: Path(tmp).write_bytes(model.getvalue()))
    tokenizer = load_tokenizer(out_dir)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def texts_of(source, problems):
    """The source's documents; one that yields none is an error naming what its format reads, so a wrong path
    never trains a tokenizer on the other sources alone."""
    import corpora  # as in main: train() stays usable without the readers

    count = 0
    for text in corpora.iter_texts(source, problems):
        count += 1
        yield text
    if not count:
        raise ValueError(
            f"source '{source.name}' yielded no document ({source.location}). Expected: "
            f"{corpora.expected_input(source.format)}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=PATH_OR_GLOB",
        help="a corpus, as in data_process.py (repeatable); plain text: text=PATH",
    )
    parser.add_argument("--format", default=None, help="reader for every --source (default: inferred from NAME)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece pieces (specials come on top)")
    parser.add_argument("--max-lines", type=int, default=2_000_000, help="lines sampled for training")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_PIECES:
        parser.error(
            f"--vocab-size must be >= {MIN_PIECES} (<unk> <s> </s> and 256 byte-fallback pieces; the text's "
            f"characters come on top), not {args.vocab_size}"
        )
    if args.max_lines < 1:
        parser.error(f"--max-lines must be >= 1, not {args.max_lines}")

    import corpora  # the readers; imported here so train() stays usable without them

    problems = corpora.Problems()
    try:
        corpora.check_out(args.out, folder=True)
        sources = [corpora.parse_source(spec, args.format) for spec in args.source]
        texts = (text for source in sources for text in texts_of(source, problems))
        tokenizer = train(texts, args.out, args.vocab_size, args.max_lines)
    except ValueError as err:
        sys.exit(f"train_tokenizer: {err}" + (f"\n{problems.summary()}" if problems.counts else ""))
    except OSError as err:  # a missing input, a full or read-only disk
        sys.exit(f"train_tokenizer: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""))
    print(problems.summary())
    print(
        f"saved {args.out}: {tokenizer.n_pieces} pieces + {len(SPECIAL_TOKENS)} specials = vocab_size "
        f"{tokenizer.vocab_size}, sha256 {tokenizer.fingerprint[:16]}"
    )


if __name__ == "__main__":
    main()
