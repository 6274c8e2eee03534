"""The whole life of a model on the embedded sample data, on a CPU, in minutes.

    bash script/quickstart.sh              # = python quickstart.py, after setting up .venv
    python quickstart.py --force           # redo every stage
    python quickstart.py --smoke           # a few steps per stage: checks the plumbing (tests use it)

Stages, each one of the project's own commands run exactly as a user would run it:
 1. tokenizer   ChatGLM2's when chatglm_tokenizer/tokenizer.model exists, else one trained on the sample
 2. data        data_process.py over the sample corpora listed in data/sample/sources.json
 3. pretrain    pretrain.py config/pretrain_tiny.py: the four MiniCPM phases
 4. sft         sft_data_process.py over every sample SFT set, then sft.py config/sft_tiny.py
 5. eval        eval.py: held-out perplexity after every phase and after SFT; the sample C-Eval/CMMLU/
                CMB/CMExam files
 6. chat        chat.py answers data/sample/chat_questions.txt
 7. vlm         a vision-language model on the SFT model: a random 2-layer CLIP tower (vision.py), vlm_train.py
                align then instruct on data/sample/vlm, eval.py vqa on the sample SLAKE and PMC-VQA test files
 8. vlm_chat    chat.py --image answers one question about a drawn chest film
 9. report      OUT/report.md (every number above) and OUT/loss.png (all phases + SFT)
A stage whose command and inputs are unchanged since it last succeeded is skipped; once a stage
runs, every later one runs too. Any failure stops the run with the failing command and its output.
"""

import argparse
import ctypes
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from atomic import atomic_write_text
from chatglm_tokenizer import DEFAULT_DIR, load_tokenizer, tokenizer_model_path
from plot import plot_runs
from runlog import read_log

ROOT = Path(__file__).resolve().parent  # the stages run here: their commands name the repository's files
SAMPLE = Path("data/sample")
# which sample folder feeds which stage
SOURCES = json.loads((ROOT / SAMPLE / "sources.json").read_text(encoding="utf-8"))
PRETRAIN_SOURCES, SFT_SOURCES, MCQ_SOURCES, VQA_SOURCES = (SOURCES[k] for k in ("pretrain", "sft", "mcq", "vqa"))
VLM_QUESTION = ("vlm/slake/imgs/xmlab2/source.jpg", "这张胸片有什么异常吗？")  # a film with an opacity in the left lung
SMOKE_PHASES = [  # --smoke: the tiny config's plan, 3 steps a phase
    {"name": "general", "iters": 3, "mixture": {"wiki": 1, "baike": 1, "c4_zh": 1, "wudao": 1, "skypile": 1}},
    {"name": "refined", "iters": 3, "mixture": {"wiki": 1, "baike": 1, "medical_pretrain": 0.5}},
    {"name": "anneal", "iters": 3, "decay": True, "mixture": {"wiki": 1, "medical_pretrain": 2, "cmedqa2": 1}},
    {"name": "clinical", "iters": 3, "decay": True, "mixture": {"guidelines": 1, "medical_pretrain": 1, "text": 1}},
]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent(parent_pid):
    """preexec_fn of a stage (Linux): the kernel sends it SIGTERM when the quickstart dies, even by SIGKILL,
    so a killed run leaves no stage writing on unseen into OUT, racing the next run over the same files."""

    def preexec():
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the quickstart died before prctl took effect
            os._exit(1)

    return preexec if sys.platform == "linux" else None


class Pipeline:
    def __init__(self, out, force):
        self.out, self.force = out, force
        self.stamps = out / "stamps"
        self.stamps.mkdir(parents=True, exist_ok=True)

    def run(self, stage, commands, inputs=(), stdout=None):
        """Run a stage's commands unless a stamp of the same commands and inputs says it already ran.
        stdout: a file that also receives the commands' output (the chat's answers)."""
        digest = hashlib.sha256(json.dumps(commands).encode())
        for path in inputs:
            for f in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
                if f.is_file():
                    digest.update(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        stamp = self.stamps / stage
        if not self.force and stamp.is_file() and stamp.read_text() == digest.hexdigest():
            print(f"== {stage}: up to date, skipped (--force to redo)", flush=True)
            return
        self.force = True  # everything after a stage that ran runs again
        stamp.unlink(missing_ok=True)
        start = time.time()
        for command in commands:
            print(f"== {stage}: {shlex.join(command)}", flush=True)
            try:
                result = subprocess.run(
                    command,
                    stdout=subprocess.PIPE if stdout else None,
                    text=True,
                    preexec_fn=stop_with_parent(os.getpid()),
                )
            except KeyboardInterrupt:  # Ctrl-C: subprocess.run has stopped the command; no stamp is written
                sys.exit(
                    f"quickstart: interrupted in stage '{stage}' ({command[1]}); run it again to go on "
                    "(finished stages are skipped)"
                )
            if stdout:
                print(result.stdout, end="")
                atomic_write_text(stdout, result.stdout)
            if result.returncode != 0:
                sys.exit(f"quickstart: stage '{stage}' failed (exit {result.returncode}): {shlex.join(command)}")
        atomic_write_text(self.stamps / f"{stage}.seconds", f"{time.time() - start:.1f}")
        atomic_write_text(stamp, digest.hexdigest())

    def seconds(self, stage):
        path = self.stamps / f"{stage}.seconds"
        return float(path.read_text()) if path.is_file() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="everything goes here (default: the repository's out/quickstart)")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--smoke", action="store_true", help="3 steps a phase: a plumbing check in seconds")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve() if args.out else ROOT / "out" / "quickstart"  # --out: from where it was run
    os.chdir(ROOT)
    py = [sys.executable]
    pipeline = Pipeline(out, args.force)
    started = time.time()

    # 1. tokenizer
    if tokenizer_model_path(DEFAULT_DIR).is_file():
        tokenizer = str(DEFAULT_DIR)
        print(f"== tokenizer: ChatGLM2-6B's, {tokenizer_model_path(DEFAULT_DIR)}")
    else:
        tokenizer = str(out / "tokenizer")
        print(
            "== tokenizer: chatglm_tokenizer/tokenizer.model is absent (README: 'The tokenizer'), so the "
            f"quickstart trains its own on the sample corpus into {tokenizer}"
        )
        pipeline.run(
            "tokenizer",
            [
                py
                + ["train_tokenizer.py", "--vocab-size", "8000", "--out", tokenizer]
                + [a for name in PRETRAIN_SOURCES for a in ("--source", f"{name}={SAMPLE / name}")]
            ],
            inputs=[SAMPLE],
        )

    # 2. corpora -> token shards
    data = out / "data"
    pipeline.run(
        "data",
        [
            py
            + ["data_process.py", "--out", str(data), "--tokenizer", tokenizer]
            + [a for name in PRETRAIN_SOURCES for a in ("--source", f"{name}={SAMPLE / name}")]
        ],
        inputs=[SAMPLE, tokenizer_model_path(tokenizer)],
    )

    # 3. the four MiniCPM phases
    pretrain_dir = out / "pretrain"
    smoke = (
        [f"--phases={SMOKE_PHASES!r}", "--eval_interval=3", "--log_interval=1", "--warmup_iters=2"]
        if args.smoke
        else []
    )
    # the quickstart owns its out folder: a stage that runs again replaces its earlier run (--overwrite)
    pipeline.run(
        "pretrain",
        [
            py
            + [
                "pretrain.py",
                "config/pretrain_tiny.py",
                f"--out_dir={pretrain_dir}",
                "--overwrite=True",
                f"--data_dir={data}",
                f"--tokenizer={tokenizer}",
            ]
            + smoke
        ],
        inputs=["config/pretrain_tiny.py"],
    )

    # 4. SFT
    sft_csv, sft_dir = out / "sft_data.csv", out / "sft"
    pipeline.run(
        "sft",
        [
            py
            + ["sft_data_process.py", "--out", str(sft_csv)]
            + [a for name in SFT_SOURCES for a in ("--source", f"{name}={SAMPLE / name}")],
            py
            + [
                "sft.py",
                "config/sft_tiny.py",
                f"--out_dir={sft_dir}",
                "--overwrite=True",
                f"--sft_csv={sft_csv}",
                f"--pretrain_dir={pretrain_dir}",
                f"--tokenizer={tokenizer}",
            ]
            + (["--max_iters=3", "--eval_interval=3"] if args.smoke else []),
        ],
        inputs=["config/sft_tiny.py"],
    )

    # 5. evaluation
    phases = dict.fromkeys(r["phase"] for r in read_log(pretrain_dir / "log.jsonl"))  # the config's, in order
    checkpoints = {phase: pretrain_dir / phase / "ckpt.pt" for phase in phases}
    checkpoints["sft"] = sft_dir / "ckpt.pt"
    evals = out / "eval"
    commands = [
        py
        + [
            "eval.py",
            "ppl",
            "--ckpt",
            str(ckpt),
            "--tokenizer",
            tokenizer,
            "--source",
            f"heldout={SAMPLE / 'heldout'}",
            "--out",
            str(evals / f"ppl_{name}.json"),
        ]
        for name, ckpt in checkpoints.items()
    ]
    commands.append(
        py
        + [
            "eval.py",
            "mcq",
            "--ckpt",
            str(checkpoints["sft"]),
            "--tokenizer",
            tokenizer,
            "--out",
            str(evals / "mcq_sft.json"),
        ]
        + [a for name, path in MCQ_SOURCES.items() for a in ("--source", f"{name}={SAMPLE / path}")]
    )
    pipeline.run("eval", commands)

    # 6. chat
    pipeline.run(
        "chat",
        [
            py
            + [
                "chat.py",
                "--ckpt",
                str(checkpoints["sft"]),
                "--tokenizer",
                tokenizer,
                "--prompt-file",
                str(SAMPLE / "chat_questions.txt"),
                "--temperature",
                "0",
                "--repetition-penalty",
                "1.2",
                "--max-new-tokens",
                "96",
            ]
        ],
        stdout=out / "chat.txt",
    )

    # 7. the vision-language model on the SFT model, and 8. one question about an image
    vlm = out / "vlm"
    smoke_vlm = ["--max_iters=3", "--eval_interval=3"] if args.smoke else []
    pipeline.run(
        "vlm",
        [
            py + ["vision.py", "--random-tower", str(out / "vision_tower")],
            py
            + [
                "vlm_train.py",
                "config/vlm_align_tiny.py",
                f"--out_dir={vlm / 'align'}",
                "--overwrite=True",
                f"--init_from={checkpoints['sft']}",
                f"--vision_tower={out / 'vision_tower'}",
                f"--tokenizer={tokenizer}",
            ]
            + smoke_vlm,
            py
            + [
                "vlm_train.py",
                "config/vlm_instruct_tiny.py",
                f"--out_dir={vlm / 'instruct'}",
                "--overwrite=True",
                f"--init_from={vlm / 'align' / 'ckpt.pt'}",
                f"--tokenizer={tokenizer}",
            ]
            + smoke_vlm,
            py
            + [
                "eval.py",
                "vqa",
                "--ckpt",
                str(vlm / "instruct" / "ckpt.pt"),
                "--tokenizer",
                tokenizer,
                "--out",
                str(evals / "vqa.json"),
            ]
            + [a for name, path in VQA_SOURCES.items() for a in ("--source", f"{name}={SAMPLE / path}")],
        ],
        inputs=["config/vlm_align_tiny.py", "config/vlm_instruct_tiny.py", SAMPLE / "vlm"],
    )
    image, question = VLM_QUESTION
    pipeline.run(
        "vlm_chat",
        [
            py
            + [
                "chat.py",
                "--ckpt",
                str(vlm / "instruct" / "ckpt.pt"),
                "--tokenizer",
                tokenizer,
                "--image",
                str(SAMPLE / image),
                "--prompt",
                question,
                "--temperature",
                "0",
                "--repetition-penalty",
                "1.2",
                "--max-new-tokens",
                "48",
            ]
        ],
        stdout=out / "vlm_chat.txt",
    )

    # 9. report
    write_report(out, pipeline, tokenizer, checkpoints, time.time() - started)
    print(f"quickstart finished in {time.time() - started:.0f} s: {out / 'report.md'}, {out / 'loss.png'}")
    replaced = sorted(path for path in out.glob("**/*.replaced-*") if path.is_dir())
    if replaced:  # the training scripts move an earlier run aside rather than delete it; say where they went
        sizes = [sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for path in replaced]
        print(
            f"earlier runs that reruns moved aside ({sum(sizes) / 2**20:.0f} MiB; delete them when not needed): "
            + ", ".join(str(path) for path in replaced)
        )


def last(records, key, phase=None):
    values = [r[key] for r in records if key in r and (phase is None or r.get("phase") == phase)]
    return values[-1] if values else None


def fmt(value, spec=".3f"):
    return "–" if value is None else format(value, spec)


def write_report(out, pipeline, tokenizer, checkpoints, seconds):
    """out/report.md: every number of the run in tables, and out/loss.png: all phases and SFT."""
    tok = load_tokenizer(tokenizer)
    pretrain_log, sft_log = read_log(out / "pretrain" / "log.jsonl"), read_log(out / "sft" / "log.jsonl")
    plot_runs(
        {"pretrain": pretrain_log, "sft": sft_log},
        out / "loss.png",
        title="quickstart: four pretraining phases, then SFT",
    )
    ppl = {
        name: json.loads((out / "eval" / f"ppl_{name}.json").read_text())["sources"]["heldout"] for name in checkpoints
    }
    mcq = json.loads((out / "eval" / "mcq_sft.json").read_text())
    which = (
        "ChatGLM2-6B's" if Path(tokenizer).resolve() == DEFAULT_DIR else "trained on the sample by train_tokenizer.py"
    )
    lines = [
        "# Quickstart report",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads. "
        f"This run took {seconds:.0f} s (stages that were up to date were skipped; their last duration is shown).",
        "",
        f"Tokenizer: {which}, {tok.vocab_size:,} ids (sha256 {tok.fingerprint[:12]}…).",
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [
        f"| {stage} | {fmt(pipeline.seconds(stage), '.0f')} |"
        for stage in ("tokenizer", "data", "pretrain", "sft", "eval", "chat", "vlm", "vlm_chat")
        if pipeline.seconds(stage) is not None
    ]
    lines += [
        "",
        "## Corpora (data_process.py)",
        "",
        "| source | documents read | kept | tokens |",
        "|---|---:|---:|---:|",
    ]
    for manifest in sorted((out / "data").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        lines.append(f"| {m['name']} | {m['documents_read']:,} | {m['documents_kept']:,} | {m['tokens']:,} |")
    lines += [
        "",
        "## Training and held-out perplexity",
        "",
        "Held-out: data/sample/heldout, text no training file contains. bits/char is comparable across tokenizers.",
        "",
        "| stage | last step | last train loss | val loss | held-out loss/token | held-out ppl | held-out bits/char |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in checkpoints:
        log = sft_log if name == "sft" else pretrain_log
        r = ppl[name]
        lines.append(
            f"| {name} | {fmt(last(log, 'step', name), 'd')} | {fmt(last(log, 'loss', name))} | "
            f"{fmt(last(log, 'val/val', name))} | {r['loss_per_token']:.3f} | "
            f"{r['ppl']:.1f} | {r['bits_per_char']:.3f} |"
        )
    norm = mcq["norm"]
    lines += [
        "",
        f"## Multiple choice (SFT model, {mcq['shots']}-shot, log-likelihood, norm {norm})",
        "",
        "| benchmark | questions | accuracy | chance |",
        "|---|---:|---:|---:|",
    ]
    for name, r in mcq["sources"].items():
        o = r["overall"]
        lines.append(f"| {name} | {o['n']} | {fmt(o[f'accuracy_{norm}'], '.1%')} | {fmt(o['chance'], '.1%')} |")
    chat = (out / "chat.txt").read_text(encoding="utf-8").strip()
    lines += ["", "## Chat (chat.py, SFT model, greedy)", "", "```", chat, "```"]
    lines += vlm_report(out)
    lines += ["", "## Loss", "", "![loss](loss.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def vlm_report(out):
    """The vision-language section: both stages' losses, VQA accuracy and the answer about an image."""
    lines = [
        "",
        "## Vision-language model (vlm_train.py on the SFT model, a random 2-layer CLIP tower)",
        "",
        "The tower is untrained (no downloads here), so the image features are random projections of the pixels:",
        "this checks the pipeline, not vision. With a real tower (README: 'Vision-language model') the same",
        "commands train a real model.",
        "",
        "| stage | trained | last step | last train loss | val loss |",
        "|---|---|---:|---:|---:|",
    ]
    for stage, trained in (("align", "projector"), ("instruct", "projector + LLM")):
        log = read_log(out / "vlm" / stage / "log.jsonl")
        lines.append(
            f"| {stage} | {trained} | {fmt(last(log, 'step'), 'd')} | {fmt(last(log, 'loss'))} | "
            f"{fmt(last(log, 'val/val'))} |"
        )
    vqa = json.loads((out / "eval" / "vqa.json").read_text())["sources"]
    lines += [
        "",
        "| VQA (eval.py vqa, greedy) | closed n | closed accuracy | open n | open exact | open normalised |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in vqa.items():
        c, o = r["closed"], r["open"]
        lines.append(
            f"| {name} | {c['n']} | {fmt(c['normalised'], '.1%')} | {o['n']} | {fmt(o['exact'], '.1%')} | "
            f"{fmt(o['normalised'], '.1%')} |"
        )
    image, _ = VLM_QUESTION
    answer = (out / "vlm_chat.txt").read_text(encoding="utf-8").strip()
    lines += ["", f"Image `{SAMPLE / image}`, chat.py --image, greedy:", "", "```", answer, "```"]
    return lines


if __name__ == "__main__":
    main()
