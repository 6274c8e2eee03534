"""gpu_check.py on the CPU: the GPU check's plumbing, so that it runs the day a GPU is lent."""

import subprocess
import sys

import pytest

from conftest import ROOT

ITEMS = [
    "loss kernel",
    "train eager",
    "train compiled",
    "fused AdamW",
    "plain pretrain.py",
    "torchrun DDP",
    "torchrun FSDP2",
    "resume",
    "generation",
    "export",
]


@pytest.mark.slow
def test_gpu_check_runs_every_item_on_the_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "gpu_check.py", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split(" | ") for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    results = {row[0].strip("| "): row[1] for row in rows[1:]}  # after the header row
    assert results == {item: "PASS" for item in ITEMS}
    assert "(bit-exact; tolerance 0)" in (tmp_path / "report.md").read_text()  # resume on the CPU is exact


def test_an_out_that_is_a_file_is_refused_before_any_item(tmp_path):
    report = tmp_path / "report"
    report.write_text("mine")
    result = subprocess.run(
        [sys.executable, "gpu_check.py", "--device", "cpu", "--out", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--out {report} is a file: give a folder" in result.stderr
    assert "[gpu_check]" not in result.stdout and report.read_text() == "mine"
