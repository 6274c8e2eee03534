"""The main job end to end (quickstart.py --smoke: every stage, 3 steps a phase), and README's commands."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configurator import script_defaults
from trainer import TrainConfig

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_quickstart_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "quickstart.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "report.md").read_text(encoding="utf-8")
    for phase in ("general", "refined", "anneal", "clinical", "sft"):
        assert f"| {phase} |" in report
    for bench in ("ceval", "cmmlu", "cmb", "cmexam"):
        assert f"| {bench} |" in report
    assert report.count("用户>") == 4 and (out / "loss.png").stat().st_size > 10_000
    assert "| instruct | projector + LLM | 3 |" in report and "| slake |" in report
    assert all((out / "pretrain" / p / "ckpt.pt").is_file() for p in ("general", "refined", "anneal", "clinical"))
    assert json.loads((out / "eval" / "ppl_sft.json").read_text())["sources"]["heldout"]["tokens"] > 1000
    log = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    first_train = next(r["loss"] for r in log if "loss" in r)
    validation = [r["val/val"] for r in log if "val/val" in r]
    assert len(validation) == 4 and validation[-1] < first_train - 0.5  # 12 steps learn something
    heldout = {
        name: json.loads((out / "eval" / f"ppl_{name}.json").read_text())["sources"]["heldout"]["loss_per_token"]
        for name in ("general", "clinical")
    }
    assert heldout["clinical"] < heldout["general"]  # the held-out loss falls from the first phase to the last
    assert "moved aside" not in result.stdout
    aside = out / "pretrain.replaced-20261203-101010"  # what a rerun of the pretraining stage leaves
    aside.mkdir()
    (aside / "ckpt.pt").write_bytes(bytes(3 << 20))
    again = subprocess.run(  # from another folder: a relative --out is taken from there, the stages run in ROOT
        [sys.executable, str(ROOT / "quickstart.py"), "--smoke", "--out", out.name],
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") >= 5  # finished stages are reused
    assert f"earlier runs that reruns moved aside (3 MiB; delete them when not needed): {aside}" in again.stdout


def readme_commands():
    """Every `python X.py ...` line of README's code blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split(" #")[0].strip()
        match = re.search(r"python (\S+\.py|-m \S+)(.*)", line)
        if match:
            commands.append((match.group(1), shlex.split(match.group(2))))
    return commands


def test_readme_commands_name_real_scripts_and_flags():
    """README cannot rot: its scripts exist, argparse scripts accept its --flags, and configurator
    scripts know its --keys and config files."""
    commands = readme_commands()
    assert len(commands) > 15
    helps = {}
    for script, args in commands:
        if script.startswith("-m"):
            module = script.split()[1]
            assert (ROOT / module.replace(".", "/")).with_suffix(".py").is_file(), script
            continue
        assert (ROOT / script).is_file(), script
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        if script in ("pretrain.py", "sft.py", "vlm_train.py", "dpo.py"):
            scope = {}
            exec(compile((ROOT / script).read_text(encoding="utf-8").split("\ndef ")[0], script, "exec"), scope)
            keys = script_defaults(scope, scope.get("SHARED", TrainConfig))
            assert all(f[2:] in keys for f in flags), (script, flags)
            assert all((ROOT / a).is_file() for a in args if a.startswith("config/")), args
            continue
        subcommand = (args[0],) if script == "eval.py" else ()  # eval.py's flags belong to its subcommands
        if (script, subcommand) not in helps:
            helps[script, subcommand] = subprocess.run(
                [sys.executable, script, *subcommand, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
            ).stdout
        help_text = helps[script, subcommand]
        assert "usage" in help_text, (script, subcommand)
        for flag in flags:
            assert flag in help_text, f"README: {script} {flag} is not an option of {script}"


def test_readme_shell_entry_points_exist():
    for script in set(re.findall(r"bash (script/\S+\.sh)", README)):
        assert (ROOT / script).is_file(), script
    assert "bash script/test.sh" in (ROOT / ".ci" / "run").read_text()


REPO_PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|md|sh|json|txt|csv|html|png))(?![\w/])")
REPO_FOLDERS = ("config/", "data/sample/", "script/", "tests/", "chatglm_tokenizer/", "docs/")  # not data/raw, out/


def docstring_paths():
    """(module, path) for every file of the repository a module docstring names: paths under its folders
    (config/sft_tiny.py, data/sample/...) and bare module names (tokenization_chatglm.py)."""
    import ast

    for source in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("chatglm_tokenizer/*.py")):
        doc = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))) or ""
        for path in REPO_PATH.findall(doc):
            if path.startswith(REPO_FOLDERS) or ("/" not in path and path.endswith(".py")):
                yield source.name, path


def test_paths_named_in_docstrings_exist():
    """A docstring that sends the reader to a file must name one the repository has: no docs/ users do not
    get, no config that was renamed, no module that is gone (example paths of user data are not checked)."""
    named = sorted(docstring_paths())
    missing = [
        (name, path)
        for name, path in named
        if not ((ROOT / path).exists() or ("/" not in path and any(ROOT.glob(f"**/{path}"))))
    ]
    assert len(named) > 20 and not missing, missing


def test_ctrl_c_in_a_stage_is_one_line_and_leaves_no_stamp(tmp_path):
    """The stage's command sends SIGINT to the quickstart, as Ctrl-C in a terminal does."""
    stage = "import os, signal, time; os.kill(os.getppid(), signal.SIGINT); time.sleep(30)"
    driver = (
        "import sys, quickstart; from pathlib import Path; "
        f"quickstart.Pipeline(Path({str(tmp_path)!r}), False).run('pretrain', [[sys.executable, '-c', {stage!r}]])"
    )
    result = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "quickstart: interrupted in stage 'pretrain' (-c); run it again to go on" in result.stderr
    assert not (tmp_path / "stamps" / "pretrain").exists()


def running(pid):
    """Whether the process runs (a zombie waiting for a reaper that never comes, in a container, does not)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(sys.platform != "linux", reason="the stage's parent-death signal is Linux's prctl")
def test_a_killed_quickstart_leaves_no_stage_running(tmp_path):
    """SIGKILL of the quickstart (no handler can run) stops its stage too, rather than leaving it writing."""
    pid_file = tmp_path / "stage.pid"
    stage = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    driver = (
        "import sys, quickstart; from pathlib import Path; "
        f"quickstart.Pipeline(Path({str(tmp_path)!r}), False).run('pretrain', [[sys.executable, '-c', {stage!r}]])"
    )
    quickstart = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT)
    for _ in range(600):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    stage_pid = int(pid_file.read_text())
    quickstart.kill()
    quickstart.wait()
    for _ in range(200):
        if not running(stage_pid):
            break
        time.sleep(0.05)
    alive = running(stage_pid)
    if alive:
        os.kill(stage_pid, signal.SIGKILL)
    assert not alive, "the stage kept running after the quickstart was killed"
