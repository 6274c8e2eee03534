"""Evaluate checkpoints: perplexity and bits per character, multiple-choice accuracy, answers to read,
visual question answering.

    python eval.py ppl --ckpt out/pretrain/clinical/ckpt.pt --source heldout=data/sample/heldout/medical_heldout.txt
    python eval.py ppl --ckpt CKPT --source wiki=data/processed/wiki --max-docs 2000 --out ppl.json
    python eval.py mcq --ckpt out/sft/ckpt.pt --source ceval=data/sample/eval/ceval \
        --source cmmlu=data/sample/eval/cmmlu --source cmb=data/sample/eval/cmb \
        --source cmexam=data/sample/eval/cmexam --shots 5 --out mcq.json
    python eval.py generate --ckpt out/pretrain/clinical/ckpt.pt --ckpt out/sft/ckpt.pt \
        --questions data/sample/chat_questions.txt --out answers.md
    python eval.py ppl --ckpt out/pretrain/clinical/ckpt.pt --adapter out/sft_lora/adapter \
        --source heldout=data/sample/heldout/medical_heldout.txt
    python eval.py vqa --ckpt out/vlm/instruct/ckpt.pt --source slake=data/raw/Slake1.0/test.json \
        --source pmc_vqa=data/raw/PMC-VQA/test_2.csv --source vqa_rad="data/raw/VQA_RAD/VQA_RAD Dataset Public.json"

--adapter DIR folds a LoRA adapter (lora.py) into --ckpt, the checkpoint it was trained on; generate takes one
--adapter per --ckpt, in order, "-" for none.

ppl: perplexity on held-out text
  --source NAME=PATH is any pretraining format of corpora.py (plain text: documents separated by blank
  lines; JSON, JSONL, CSV ...: the format named by NAME), or a token folder / .bin file written by
  data_process.py (documents split after each eos; its manifest must name the same tokenizer). Point
  it at tokens of held-out text: a training shard is training data (the trainer's own validation is
  the tail of each shard). --max-docs N scores the first N documents of each source.
  Each document is scored as training saw it, `<eos> doc <eos>`: the leading eos stands for the end of
  the previous document, so every token of the document and its closing eos is predicted exactly once.
  Text is scored as read (data_process.py's cleaning is not applied).
  A document longer than max_seq_len is cut into consecutive windows of max_seq_len predictions: no
  overlap, nothing counted twice, and the first tokens of a later window see only that window.
  --stride S (< max_seq_len) slides instead: after the first window, one every S tokens, each scoring
  only its last S predictions (still each token once) with max_seq_len - S tokens of extra context;
  slower, and a lower (truer) ppl for long documents.
  Reported per source: documents, tokens (predictions, closing eos included), chars (characters of the
  documents' text), loss/token in nats, ppl = exp(loss/token), bits/char = total nats / ln 2 / chars.
  Why bits per character: perplexity is per token, and a tokenizer with longer tokens makes fewer but
  harder predictions, so two tokenizers' perplexities measure different things. The total information
  a model needs to encode a text (the summed loss) means the same thing for any tokenizer, and per
  character of that same text it is comparable across models, tokenizers and vocabulary sizes.

mcq: multiple-choice accuracy (C-Eval, CMMLU, CMB, CMExam; formats: corpora.py)
  Scoring: every option is scored by the log-likelihood of its answer text given the prompt (the sum
  of the log-probs of its tokens; batched forward passes, padding and the prompt as IGNORE_INDEX).
  --norm mean (default) divides the sum by the option's token count, so a long correct option is not
  beaten by a short wrong one for its length alone; --norm sum uses the raw sum. Both accuracies are
  computed and saved; --norm picks the one printed first. Ties go to the earlier option.
  Prompt, pretrain checkpoint (a plain continuation):  问题：{question}\nA. {A}\nB. {B}...\n答案：{option text}
  Prompt, SFT checkpoint: dataset_sft.render's chat template, the question and its lettered options as
  the prompt, the option text as the answer after <bos> (encoded as SFT answers are).
  Few-shot (--shots K): the first K questions of the dev split next to the file (C-Eval
  ../dev/{subject}_dev.csv, CMMLU ../dev/{subject}.csv), shown with their correct option text; with no
  dev split (CMB, CMExam, or a dev file itself) the first K other questions of the same file that have
  an answer, never the question asked. Dev files in a source folder only supply shots. Shots that do
  not fit max_seq_len are dropped, the last first; a question too long even alone loses its start
  (counted as "truncated"). Fewer shots than K are reported with their reason: the average pool size
  ("shots_available": a dev split or file with fewer than K answered questions) and how many fit
  ("shots_used").
  Multi-answer items (several gold letters: CMB 多项选择题, some CMExam): the candidates are every
  non-empty combination of the options (their texts joined by "；" in letter order), and the item is
  correct only when the best combination equals the gold set exactly. The model is told an item has
  several answers (as exam takers are, by the question type), not how many. Reported overall and
  separately ("multi"); their chance is 1 / (2^n - 1). A multi-answer item with more than
  MAX_MULTI_OPTIONS (8) options is skipped: 2^n - 1 answer sets (4095 at 12) cost minutes a question.
  Skipped, counted by reason, printed and saved ("skipped", with file:line examples): every question of
  the tested files that is not scored: no answer given (C-Eval test, CMExam NaN), rejected by the
  reader (an answer letter that is not an option, fewer than two options, ...), too many options for a
  multi-answer item, too long for max_seq_len. A source with no question scored is an error.
  Chance: 1 / number of candidates, averaged over the questions; printed beside every accuracy.

generate: answers to a file of questions (one a line) from one or more checkpoints, side by side in a
  Markdown file with the sampling settings and every checkpoint's phase and step (inference.answer()).
  Every --ckpt is checked (present, readable) before the first answer is generated.

vqa: visual question answering with a vision-language checkpoint (vlm_train.py) on SLAKE, PMC-VQA,
  VQA-RAD (or any image format of corpora.py: the last turn is asked, earlier turns are history).
  Answers are generated greedily (--max-new-tokens, default 32) and compared with the gold answer.
  Closed questions (yes/no, and PMC-VQA's four options) are scored exactly, up to normalisation: NFKC,
  lower case, whitespace and punctuation removed ("Yes." = "yes"); an option question is right when
  the answer names the gold letter ("B", "B. MRI", "b：") or is the gold option's text. Open questions
  are reported both ways: exact (after trimming) and normalised. Per source: closed, open and overall
  accuracy with counts; items whose image cannot be decoded or that do not fit the context are
  skipped and counted, as are the readers' skipped records (missing image files).

Results files (--out) are written to a temporary name and renamed; an --out that cannot be written (a
folder, a read-only place) is refused before any work, and a full disk leaves no temporary file. Every
numeric option is checked first. A source that yields nothing (ppl: no document; mcq: no question
scored) makes eval.py exit with an error naming what its format expects, after the other sources are
evaluated and --out is written.
"""

import argparse
import itertools
import json
import math
import re
import unicodedata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from atomic import atomic_write_text
from checkpoint import checkpoint_meta
from corpora import (
    Problems,
    Source,
    check_out,
    expected_input,
    iter_image_dialogues,
    iter_questions,
    iter_texts,
    parse_source,
)
from dataset_sft import encode_turns, render
from inference import (
    add_sampling_args,
    answer,
    build_prompt,
    fit_max_new_tokens,
    fitted_images,
    load,
    sampling_from,
)
from lm_head import IGNORE_INDEX
from precision import CHOICES
from vision import ImageError, pixel_batch
from vlm import VLM

NORMS = ("mean", "sum")
MAX_MULTI_OPTIONS = 8  # a multi-answer item with more options is skipped: its 2^n - 1 answer sets cost too much


@torch.no_grad()
def summed_losses(model, rows, pad_id, batch_size=16, desc="scoring"):
    """For every row (inputs, targets) of at most max_seq_len ids, the summed cross-entropy in nats
    over its targets != IGNORE_INDEX. Rows are sorted by length and right-padded per batch (padding
    comes after every real position, so causal attention never sees it). The model runs its LM head
    only on the scored positions: for options after a long prompt that is most of the work saved."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    device = model.rope_cos.device
    out = [0.0] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
        batch = order[start : start + batch_size]
        width = len(rows[batch[0]][0])
        x = torch.full((len(batch), width), pad_id, dtype=torch.long)
        y = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(batch):
            inputs, targets = rows[i]
            x[r, : len(inputs)] = torch.tensor(inputs)
            y[r, : len(targets)] = torch.tensor(targets)
        per_row = model(x.to(device), y.to(device), reduction="none").sum(dim=1).tolist()
        for r, i in enumerate(batch):
            out[i] = per_row[r]
    return out


# ---------------------------------------------------------------- perplexity


def is_token_source(path):
    path = Path(path)
    return path.suffix == ".bin" or (path.is_dir() and any(path.glob("*.bin")))


def token_documents(path, tokenizer, max_docs=None):
    """[(ids ending in eos, chars)] of a data_process.py token folder or .bin file; chars are those of
    the decoded text. A tail without eos (a cut file) counts as a last document. Refused: a manifest
    that names another tokenizer or cannot be read, and ids beyond the tokenizer's vocabulary."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
            sha = info.get("tokenizer", {}).get("sha256")
        except (ValueError, AttributeError) as err:
            raise ValueError(
                f"{manifest} is not a readable data_process.py manifest ({type(err).__name__}): "
                "re-run data_process.py for this source"
            ) from None
        if sha not in (None, tokenizer.fingerprint):
            raise ValueError(
                f"{folder} was tokenized with another tokenizer (sha256 {str(sha)[:12]}…) than the one given"
            )
    docs = []
    for file in [path] if path.is_file() else sorted(path.glob("*.bin")):
        tokens = np.memmap(file, dtype=np.uint16, mode="r") if file.stat().st_size >= 2 else np.zeros(0, np.uint16)
        if len(tokens) and int(tokens.max()) >= tokenizer.vocab_size:
            raise ValueError(
                f"{file} holds token id {int(tokens.max())}, beyond the tokenizer's "
                f"{tokenizer.vocab_size} ids: these are not tokens of this tokenizer"
            )
        bounds = np.flatnonzero(tokens == tokenizer.eos_id) + 1
        start = 0
        for end in [*bounds.tolist(), len(tokens)]:
            if end > start:
                ids = tokens[start:end].tolist()
                text = ids[:-1] if ids[-1] == tokenizer.eos_id else ids
                docs.append((ids, len(tokenizer.decode(text))))
                if max_docs and len(docs) >= max_docs:
                    return docs
            start = end
    return docs


def text_documents(source, tokenizer, max_docs=None, problems=None):
    """[(ids + [eos], chars)] of a corpora.py Source."""
    texts = list(itertools.islice(iter_texts(source, problems or Problems()), max_docs or None))
    return [(ids + [tokenizer.eos_id], len(text)) for ids, text in zip(tokenizer.encode_batch(texts), texts)]


def windows(ids, eos_id, max_len, stride=None):
    """(inputs, targets) rows that predict every id of `ids` once, after a leading eos.
    stride None or max_len: consecutive non-overlapping windows; smaller: after a first full window,
    each window re-reads max_len - stride earlier tokens as context and scores its last `stride`."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..{max_len}, not {stride}")
    seq = [eos_id] + list(ids)
    rows, first = [], 1  # first: the seq index of the first target this window scores
    while first < len(seq):
        end = min(first + (max_len if first == 1 else stride), len(seq))  # targets seq[first:end]
        begin = max(0, end - 1 - max_len)  # inputs seq[begin:end-1], at most max_len of them
        rows.append((seq[begin : end - 1], [IGNORE_INDEX] * (first - 1 - begin) + seq[first:end]))
        first = end
    return rows


def ppl_summary(nats, tokens, chars, documents):
    return {
        "documents": documents,
        "tokens": tokens,
        "chars": chars,
        "loss_per_token": nats / tokens,
        "ppl": math.exp(nats / tokens),
        "bits_per_char": nats / math.log(2) / chars,
        "nats": nats,
    }


def perplexity(model, tokenizer, documents, stride=None, batch_size=16, desc="ppl"):
    """ppl_summary of a list of (ids ending in eos, chars)."""
    if not documents:
        raise ValueError("no documents to score")
    rows = [row for ids, _ in documents for row in windows(ids, tokenizer.eos_id, model.args.max_seq_len, stride)]
    nats = sum(summed_losses(model, rows, tokenizer.pad_id, batch_size, desc))
    tokens = sum(len(ids) for ids, _ in documents)
    return ppl_summary(nats, tokens, sum(chars for _, chars in documents), len(documents))


def run_ppl(args):
    sources = []  # (name, token folder or file, or a corpora Source): a wrong path fails before the model loads
    for spec in args.source:
        name, _, location = spec.partition("=")
        sources.append((name, location if is_token_source(location) else parse_source(spec)))
    model, tok, ckpt, _ = load(args.ckpt, args.tokenizer, args.device, args.dtype, "score", args.adapter)
    if args.stride > model.args.max_seq_len:
        raise ValueError(f"--stride {args.stride} is more than the model's max_seq_len {model.args.max_seq_len}")
    results, empty = {}, []
    print(f"{'source':<20} {'docs':>7} {'tokens':>10} {'chars':>10} {'loss/tok':>9} {'ppl':>10} {'bits/char':>9}")
    for name, source in sources:
        problems = Problems()
        if isinstance(source, Source):
            docs = text_documents(source, tok, args.max_docs, problems)
        else:
            docs = token_documents(source, tok, args.max_docs)
        if not docs:
            expected = expected_input(source.format) if isinstance(source, Source) else "data_process.py token shards"
            where = source.location if isinstance(source, Source) else source
            empty.append(f"no document read from source '{name}' ({where}); expected {expected}")
            results[name] = {"documents": 0, "skipped": problems.skipped, "skipped_examples": problems.examples}
            print(f"{name:<20} {0:>7}  nothing to score")
            if problems.counts:
                print(problems.summary())
            continue
        r = perplexity(model, tok, docs, args.stride, args.batch_size, desc=name)
        r["skipped"] = dict(problems.counts)
        results[name] = r
        print(
            f"{name:<20} {r['documents']:>7,} {r['tokens']:>10,} {r['chars']:>10,} {r['loss_per_token']:>9.4f} "
            f"{r['ppl']:>10.2f} {r['bits_per_char']:>9.4f}"
        )
        if problems.counts:
            print(problems.summary())
    return {
        "task": "ppl",
        **checkpoint_info(args.ckpt, ckpt),
        "stride": args.stride or model.args.max_seq_len,
        "sources": results,
    }, empty


# ---------------------------------------------------------------- multiple choice


def candidates(q):
    """[(letters, answer text)]: the options; for a multi-answer item every non-empty combination."""
    letters = list(q["options"])
    if len(q["answer"]) <= 1:
        return [(letter, q["options"][letter]) for letter in letters]
    combos = (c for n in range(1, len(letters) + 1) for c in itertools.combinations(letters, n))
    return [("".join(c), "；".join(q["options"][letter] for letter in c)) for c in combos]


def question_block(q):
    return q["question"] + "\n" + "\n".join(f"{letter}. {text}" for letter, text in q["options"].items())


def gold_text(q):
    return "；".join(q["options"][letter] for letter in q["answer"])


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_question(q, shots, texts, tokenizer, mode):
    """[(context ids, continuation ids)] for every candidate answer text."""
    if mode == "chat":
        turns = [(question_block(s), gold_text(s)) for s in shots] + [(question_block(q), None)]
        context = render(encode_turns(tokenizer, [turns])[0], tokenizer.bos_id, tokenizer.eos_id)[0]
        return [(context, ids) for ids in tokenizer.encode_batch(list(texts))]
    context = "".join(f"问题：{question_block(s)}\n答案：{gold_text(s)}\n\n" for s in shots)
    context += f"问题：{question_block(q)}\n答案："
    encoded = tokenizer.encode_batch([context] + [context + t for t in texts])
    # The option is the part of the joint encoding after the context's ids; where a token spans the
    # seam, that candidate's context ends before it.
    requests = []
    for whole in encoded[1:]:
        cut = min(common_prefix(encoded[0], whole), len(whole) - 1)
        requests.append((whole[:cut], whole[cut:]))
    return requests


def fit_question(q, shots, tokenizer, mode, max_len):
    """(requests, shots used, truncated): as many shots as fit max_seq_len, else the context's end."""
    texts = [text for _, text in candidates(q)]
    for k in range(len(shots), -1, -1):
        requests = encode_question(q, shots[:k], texts, tokenizer, mode)
        if max(len(c) + len(a) for c, a in requests) <= max_len + 1:
            return requests, k, False
    longest = max(len(a) for _, a in requests)
    if longest > max_len:  # not even one context token would fit
        return None, 0, True
    keep = max_len + 1 - longest
    return [(c[-keep:], a) for c, a in requests], 0, True


def dev_file(path):
    """The dev split beside an eval file: ../dev/{subject}_dev.csv (C-Eval) or ../dev/{name} (CMMLU)."""
    path = Path(path)
    dev = path.parent.parent / "dev"
    stem = path.name.rsplit("_", 1)[0] if path.stem.endswith(("_val", "_test")) else None
    for candidate in ([dev / f"{stem}_dev{path.suffix}"] if stem else []) + [dev / path.name]:
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return candidate
    return None


def read_questions(path, fmt, problems):
    return list(iter_questions(Source(Path(path).stem, fmt, [Path(path)], str(path)), problems))


def model_scorer(model, tokenizer, batch_size):
    """requests [(context, continuation)] -> summed log-probs of the continuations."""

    def score(requests):
        rows = [((c + a)[:-1], [IGNORE_INDEX] * (len(c) - 1) + list(a)) for c, a in requests]
        return [-nats for nats in summed_losses(model, rows, tokenizer.pad_id, batch_size, desc="mcq")]

    return score


def summarise(items):
    n = len(items)
    out = {"n": n, "chance": sum(i["chance"] for i in items) / n if n else None}
    for norm in NORMS:
        correct = sum(i["correct"][norm] for i in items)
        out[f"correct_{norm}"] = correct
        out[f"accuracy_{norm}"] = correct / n if n else None
    return out


def evaluate_mcq(source, tokenizer, score, mode, shots=0, max_len=512):
    """Accuracy of one corpora Source of questions; `score` maps [(context ids, continuation ids)]
    to summed log-probs (model_scorer, or any table in tests). Every question of the tested files that
    is not scored is counted in "skipped" by reason, with the first examples (file:line)."""
    problems, pool_problems = Problems(), Problems()
    dev = [f for f in source.files if Path(f).parent.name == "dev"]
    tested = [f for f in source.files if f not in dev] or dev
    items, requests, files, truncated = [], [], {}, 0
    for path in tested:
        questions = read_questions(path, source.format, problems)
        known = [q for q in questions if q["answer"]]
        pool_file = dev_file(path) if shots else None
        pool = None
        if pool_file:
            pool = [q for q in read_questions(pool_file, source.format, pool_problems) if q["answer"]]
        shots_from = str(pool_file) if pool_file else "same file" if shots else None
        files[str(path)] = {"questions": len(questions), "shots_from": shots_from}
        for q in questions:
            reason = skip_reason(q)
            if reason:
                problems.add(reason, path, q["where"], f"{len(q['options'])} options" if q["answer"] else "")
                continue
            examples = pool[:shots] if pool is not None else [s for s in known if s is not q][:shots]
            reqs, used, cut = fit_question(q, examples, tokenizer, mode, max_len)
            if reqs is None:
                problems.add(TOO_LONG, path, q["where"])
                continue
            truncated += cut
            items.append(
                {
                    "file": str(path),
                    "where": q["where"],
                    "subject": q["subject"] or source.name,
                    "answer": q["answer"],
                    "shots": used,
                    "shots_available": len(examples),
                    "candidates": [c for c, _ in candidates(q)],
                    "first": len(requests),
                }
            )
            requests += reqs
    scores = score(requests) if requests else []
    for item in items:
        first, n = item.pop("first"), len(item["candidates"])
        sums = scores[first : first + n]
        lengths = [len(a) for _, a in requests[first : first + n]]
        by_norm = {"sum": sums, "mean": [s / max(1, k) for s, k in zip(sums, lengths)]}
        item["predicted"] = {norm: item["candidates"][max(range(n), key=by_norm[norm].__getitem__)] for norm in NORMS}
        item["correct"] = {norm: set(item["predicted"][norm]) == set(item["answer"]) for norm in NORMS}
        item["chance"] = 1 / n
        item["multi"] = len(item["answer"]) > 1
        del item["candidates"]
    subjects = sorted({i["subject"] for i in items})
    shots_used = sum(i["shots"] for i in items) / len(items) if items else 0
    shots_available = sum(i["shots_available"] for i in items) / len(items) if items else 0
    return {
        "files": files,
        "skipped": problems.skipped,
        "skipped_examples": problems.examples,
        "shot_pool_skipped": dict(pool_problems.counts),
        "truncated": truncated,
        "shots_available": shots_available,
        "shots_used": shots_used,
        "overall": summarise(items),
        "single": summarise([i for i in items if not i["multi"]]),
        "multi": summarise([i for i in items if i["multi"]]),
        "subjects": {s: summarise([i for i in items if i["subject"] == s]) for s in subjects},
        "items": items,
    }


NO_ANSWER = "no answer given (a test split, or NaN)"
TOO_MANY_OPTIONS = f"multi-answer item with more than {MAX_MULTI_OPTIONS} options (2^n - 1 answer sets to score)"
TOO_LONG = "question longer than max_seq_len even without shots"


def skip_reason(q):
    if not q["answer"]:
        return NO_ANSWER
    if len(q["answer"]) > 1 and len(q["options"]) > MAX_MULTI_OPTIONS:
        return TOO_MANY_OPTIONS
    return None


def print_mcq(name, r, norm, mode, shots):
    other = NORMS[1 - NORMS.index(norm)]
    # two reasons for fewer shots than asked: a small pool (dev split or file), or max_seq_len
    pool = f", {r['shots_available']:.1f} in the shot pool" if r["shots_available"] < shots else ""
    fit = f", {r['shots_used']:.1f} fit max_seq_len" if r["shots_used"] < r["shots_available"] else ""
    fit = f"{pool}{fit} on average" if pool or fit else ""
    skipped = sum(r["skipped"].values())
    print(
        f"\n{name} ({mode} prompt, {shots}-shot{fit}): {r['overall']['n']} questions scored, "
        f"{skipped} skipped, {r['truncated']} truncated"
    )
    for reason, count in r["skipped"].items():
        print(f"  skipped {count:>6,}  {reason}")
    for example in r["skipped_examples"]:
        print(f"    e.g. {example}")
    if r["shot_pool_skipped"]:
        print(f"  dev questions not usable as shots: {r['shot_pool_skipped']}")
    print(f"  {'':<28} {'n':>5} {'acc (' + norm + ')':>12} {'acc (' + other + ')':>11} {'chance':>7}")
    rows = list(r["subjects"].items()) + [("overall", r["overall"])]
    if r["multi"]["n"]:
        rows += [("  single-answer", r["single"]), ("  multi-answer (exact set)", r["multi"])]
    for label, s in rows:
        if s["n"]:
            print(
                f"  {label:<28} {s['n']:>5} {s['accuracy_' + norm]:>12.1%} "
                f"{s['accuracy_' + other]:>11.1%} {s['chance']:>7.1%}"
            )


def run_mcq(args):
    sources = [parse_source(spec) for spec in args.source]  # a wrong path fails before the model loads
    model, tok, ckpt, mode = load(args.ckpt, args.tokenizer, args.device, args.dtype, "score", args.adapter)
    mode = args.mode or mode
    score = model_scorer(model, tok, args.batch_size)
    results, empty = {}, []
    for source in sources:
        r = evaluate_mcq(source, tok, score, mode, args.shots, model.args.max_seq_len)
        print_mcq(source.name, r, args.norm, mode, args.shots)
        results[source.name] = r
        if not r["overall"]["n"]:
            empty.append(
                f"no question of source '{source.name}' ({source.location}) could be scored "
                f"(skipped: {r['skipped'] or 'nothing read'}); expected {expected_input(source.format)}"
            )
    return {
        "task": "mcq",
        **checkpoint_info(args.ckpt, ckpt),
        "mode": mode,
        "shots": args.shots,
        "norm": args.norm,
        "sources": results,
    }, empty


# ---------------------------------------------------------------- answers for review


def quote(text):
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def read_questions_file(path):
    """One question a line, UTF-8; a missing, binary or empty file is refused with its name."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--questions {path} is not UTF-8 text (byte {err.start}): one question a line") from None
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise ValueError(f"--questions {path} holds no question: one question a line")
    return questions


def run_generate(args):
    questions = read_questions_file(args.questions)
    sampling = sampling_from(args)
    adapters = args.adapter or ["-"] * len(args.ckpt)
    if len(adapters) != len(args.ckpt):
        raise ValueError(f"{len(adapters)} --adapter for {len(args.ckpt)} --ckpt: give one per --ckpt, '-' for none")
    for path in args.ckpt:  # a missing or damaged one is found before the others' answers are generated
        checkpoint_meta(path)
    runs = []
    for path, adapter in zip(args.ckpt, adapters):
        adapter = None if adapter == "-" else adapter
        model, tok, ckpt, mode = load(path, args.tokenizer, args.device, args.dtype, adapter=adapter)
        mode = args.mode or mode
        max_new = fit_max_new_tokens(args.max_new_tokens, model)
        replies = []
        for start in tqdm(range(0, len(questions), args.batch_size), desc=Path(path).parent.name, leave=False):
            replies += answer(
                model, tok, questions[start : start + args.batch_size], None, mode, max_new, args.seed, **sampling
            )
        runs.append((f"`{path}`" + (f" + `{adapter}`" if adapter else ""), ckpt, mode, max_new, replies))
        del model
    settings = ", ".join(f"{k} {'off' if v is None else v}" for k, v in dict(sampling, seed=args.seed).items())
    lines = [
        "# Answers for review",
        "",
        f"Sampling: {settings}.",
        "",
        "| checkpoint | phase | step | mode | max_new_tokens |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {ckpt.get('phase')} | {ckpt.get('step')} | {mode} | {max_new} |"
        for label, ckpt, mode, max_new, _ in runs
    ]
    for i, question in enumerate(questions):
        lines += ["", f"## {i + 1}. {question}"]
        for label, ckpt, _, _, replies in runs:
            lines += ["", f"**{label}** (step {ckpt.get('step')}):", "", quote(replies[i])]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {len(questions)} questions x {len(runs)} checkpoint(s) to {args.out}")


# ---------------------------------------------------------------- visual question answering


def normalise_answer(text):
    """NFKC, lower case, whitespace and punctuation (ASCII and CJK) removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


LETTER_ALONE = re.compile(r"\(?([A-Za-z])[.:、)]?")  # after NFKC: "B", "B.", "(B)", "b："
LETTER_FIRST = re.compile(r"\(?([A-Za-z])[.:、)]\s*(.*)")  # "B. MRI", "b：MRI", "B) MRI"
LETTER_SPACE = re.compile(r"([A-Za-z])\s+(.+)")  # "B MRI": a letter only if the rest is its option's text


def option_letter(prediction, options):
    """The option a prediction picks, "" if none: a letter alone; else the option whose text it is ("A cyst"
    is option B's text, not the letter A); else a letter before punctuation; else a letter, a space and that
    option's text."""
    text = unicodedata.normalize("NFKC", prediction).strip()
    if (match := LETTER_ALONE.fullmatch(text)) and match[1].upper() in options:
        return match[1].upper()
    said = normalise_answer(text)
    by_text = next((letter for letter, option in options.items() if said and normalise_answer(option) == said), "")
    if by_text:
        return by_text
    if (match := LETTER_FIRST.fullmatch(text)) and match[1].upper() in options:
        return match[1].upper()
    if (match := LETTER_SPACE.fullmatch(text)) and match[1].upper() in options:
        letter = match[1].upper()
        return letter if normalise_answer(match[2]) == normalise_answer(options[letter]) else ""
    return ""


def judge(item, prediction):
    """(exact, normalised) correctness of a prediction for a VQA item."""
    if item.options:
        right = option_letter(prediction, item.options) == item.label
        return right, right
    gold = item.turns[-1][1]
    return prediction.strip() == gold.strip(), normalise_answer(prediction) == normalise_answer(gold)


def vqa_predictor(model, tokenizer, max_new_tokens, batch_size):
    """items -> greedy answers (None for an item that cannot be asked: undecodable image, too long)."""
    budget = model.args.max_seq_len - max_new_tokens

    def predict(items):
        answers = [None] * len(items)
        asked = []  # (index, ids, pixels)
        for i, item in enumerate(items):
            *history, (question, _) = item.turns
            try:
                ids = build_prompt(tokenizer, question, history, "chat", budget, model)[0]
                asked.append((i, ids, pixel_batch(fitted_images(model, ids, item.images), model.args.preprocess)))
            except (ImageError, ValueError) as err:
                answers[i] = err
        for start in tqdm(range(0, len(asked), batch_size), desc="vqa", leave=False, disable=len(asked) <= batch_size):
            batch = asked[start : start + batch_size]
            images = torch.cat([pixels for _, _, pixels in batch])
            outputs = model.generate(
                [ids for _, ids, _ in batch], max_new_tokens, eos_id=tokenizer.eos_id, images=images, temperature=0
            )
            for (i, _, _), out in zip(batch, outputs):
                answers[i] = tokenizer.decode(out, skip_special_tokens=True)
        return answers

    return predict


def accuracy(items, key):
    return {"n": len(items), key: sum(i[key] for i in items) / len(items) if items else None}


def evaluate_vqa(items, predict):
    """Scores of one source's ImageDialogues; `predict` maps items to answers (or an exception: not asked)."""
    scored, skipped = [], []
    for item, prediction in zip(items, predict(items)):
        where = ":".join(map(str, item.origin))
        if isinstance(prediction, Exception):
            skipped.append(f"{where}: {prediction}")
            continue
        exact, normalised = judge(item, prediction)
        scored.append(
            {
                "where": where,
                "question": item.turns[-1][0],
                "answer": item.turns[-1][1],
                "prediction": prediction,
                "type": item.answer_type or "open",
                "exact": exact,
                "normalised": normalised,
            }
        )
    closed = [s for s in scored if s["type"] == "closed"]
    opened = [s for s in scored if s["type"] != "closed"]
    return {
        "closed": accuracy(closed, "normalised"),
        "open": {**accuracy(opened, "exact"), **accuracy(opened, "normalised")},
        "overall": accuracy(scored, "normalised"),
        "skipped": len(skipped),
        "skipped_examples": skipped[:5],
        "items": scored,
    }


def print_vqa(name, r, problems):
    def pct(value):
        return "–" if value is None else f"{value:.1%}"

    c, o, a = r["closed"], r["open"], r["overall"]
    print(
        f"\n{name}: {a['n']} questions scored, {r['skipped']} could not be asked, "
        f"{problems.total} records skipped by the reader"
    )
    print(f"  closed {c['n']:>5}  accuracy {pct(c['normalised'])}")
    print(f"  open   {o['n']:>5}  exact {pct(o['exact'])}, normalised {pct(o['normalised'])}")
    print(f"  all    {a['n']:>5}  accuracy {pct(a['normalised'])} (closed exact up to normalisation, open normalised)")
    for example in r["skipped_examples"]:
        print(f"  not asked: {example}")
    if problems.total:
        print("  " + problems.summary().replace("\n", "\n  "))


def run_vqa(args):
    sources = [parse_source(spec) for spec in args.source]  # a wrong path fails before the model loads
    model, tok, ckpt, _ = load(args.ckpt, args.tokenizer, args.device, args.dtype)
    if not isinstance(model, VLM):
        raise ValueError(f"{args.ckpt} is a text checkpoint: vqa needs a vision-language one (vlm_train.py)")
    folders = dict(spec.split("=", 1) for spec in args.image_folder or [])
    predict = vqa_predictor(model, tok, fit_max_new_tokens(args.max_new_tokens, model), args.batch_size)
    results, empty = {}, []
    for source in sources:
        problems = Problems()
        items = list(
            itertools.islice(iter_image_dialogues(source, problems, folders.get(source.name)), args.max_items or None)
        )
        r = evaluate_vqa(items, predict)
        r["reader_skipped"] = dict(problems.counts)
        print_vqa(source.name, r, problems)
        results[source.name] = r
        if not r["overall"]["n"]:
            empty.append(
                f"no question scored from source '{source.name}' ({source.location}); expected "
                f"{expected_input(source.format)}"
            )
    return {
        "task": "vqa",
        **checkpoint_info(args.ckpt, ckpt),
        "max_new_tokens": args.max_new_tokens,
        "sources": results,
    }, empty


# ---------------------------------------------------------------- command line


def checkpoint_info(path, ckpt):
    return {
        "checkpoint": str(path),
        "adapter": ckpt.get("adapter"),
        "phase": ckpt.get("phase"),
        "step": ckpt.get("step"),
    }


def check_numbers(parser, args):
    """Every numeric argument in range before any work (argparse checks only the type)."""
    limits = {
        "batch_size": 1,
        "max_docs": 0,
        "stride": 0,
        "shots": 0,
        "max_new_tokens": 1,
        "temperature": 0,
        "top_k": 0,
        "max_items": 0,
    }
    for name, low in limits.items():
        value = getattr(args, name, None)
        if value is not None and not value >= low:  # `not >=`: NaN fails too
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, not {value}")
    if args.task == "generate" and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.task == "generate" and not args.repetition_penalty > 0:
        parser.error(f"--repetition-penalty must be > 0, not {args.repetition_penalty}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)

    def add_common(parser, batch_size):
        parser.add_argument("--tokenizer", default="chatglm_tokenizer")
        parser.add_argument("--device", default="auto")
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=CHOICES,
            help="auto: bfloat16 where this machine scores faster in it (precision.py), else float32",
        )
        parser.add_argument("--batch-size", type=int, default=batch_size, help="rows per forward pass")

    ppl = tasks.add_parser("ppl", help="perplexity and bits/char on held-out text")
    add_common(ppl, 16)
    ppl.add_argument("--ckpt", required=True)
    ppl.add_argument("--adapter", help="a LoRA adapter folder (PEFT format) trained on --ckpt, folded into it")
    ppl.add_argument("--source", action="append", required=True, help="NAME=PATH (corpora format, or *.bin tokens)")
    ppl.add_argument("--max-docs", type=int, default=0, help="per source; 0: all")
    ppl.add_argument("--stride", type=int, default=0, help="sliding windows every STRIDE tokens; 0: non-overlapping")
    ppl.add_argument("--out", help="results JSON")
    mcq = tasks.add_parser("mcq", help="multiple-choice accuracy")
    add_common(mcq, 16)
    mcq.add_argument("--ckpt", required=True)
    mcq.add_argument("--adapter", help="a LoRA adapter folder (PEFT format) trained on --ckpt, folded into it")
    mcq.add_argument("--source", action="append", required=True, help="ceval|cmmlu|cmb|cmexam=FILE_OR_DIR")
    mcq.add_argument("--shots", type=int, default=0)
    mcq.add_argument("--norm", choices=NORMS, default="mean", help="option score: mean or sum of token log-probs")
    mcq.add_argument("--mode", choices=["chat", "continue"], help="default: chat for SFT checkpoints")
    mcq.add_argument("--out", help="results JSON")
    gen = tasks.add_parser("generate", help="answers to questions, side by side, as Markdown")
    add_common(gen, 8)
    gen.add_argument("--ckpt", action="append", required=True, help="repeatable: one column per checkpoint")
    gen.add_argument("--adapter", action="append", help="one per --ckpt, in order ('-': none): LoRA adapter folders")
    gen.add_argument("--questions", required=True, help="one question a line")
    gen.add_argument("--mode", choices=["chat", "continue"])
    gen.add_argument("--out", required=True)
    add_sampling_args(gen)
    gen.set_defaults(seed=1337)  # reproducible side-by-side answers
    vqa = tasks.add_parser("vqa", help="visual question answering (vision-language checkpoints)")
    add_common(vqa, 8)
    vqa.add_argument("--ckpt", required=True)
    vqa.add_argument("--source", action="append", required=True, help="slake|pmc_vqa|vqa_rad|llava|minimind_v=PATH")
    vqa.add_argument(
        "--image-folder",
        action="append",
        metavar="NAME=DIR",
        help="the folder a source's image paths are relative to (default: per format, beside the file)",
    )
    vqa.add_argument("--max-items", type=int, default=0, help="per source; 0: all")
    vqa.add_argument("--max-new-tokens", type=int, default=32)
    vqa.add_argument("--out", help="results JSON (with every question, answer and prediction)")
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    try:
        if args.out:
            check_out(args.out)
        if args.task == "generate":
            run_generate(args)
            return None
        results, empty = {"ppl": run_ppl, "mcq": run_mcq, "vqa": run_vqa}[args.task](args)
        if args.out:
            atomic_write_text(args.out, json.dumps(results, ensure_ascii=False, indent=1))
            print(f"results: {args.out}")
    except ValueError as err:
        raise SystemExit(f"eval.py {args.task}: {err}") from None
    except OSError as err:  # a missing input, a full or read-only disk
        raise SystemExit(
            f"eval.py {args.task}: {err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        ) from None
    if empty:
        raise SystemExit(f"eval.py {args.task}: " + "; ".join(empty))
    return results


if __name__ == "__main__":
    main()
