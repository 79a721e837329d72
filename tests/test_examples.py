"""The README's entry points run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from peft import get_peft_model  # noqa: F401  (the README snippet's imports must resolve)

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_trains_and_reloads():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert "reproduces the outputs exactly: True" in proc.stdout


def test_readme_usage_snippet_runs():
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Usage", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the snippet is ours
    assert namespace["out"].loss.requires_grad


def test_milora_benchmark_script_prints_its_table(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_milora
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    bench_milora.main(["--width", "64", "--layers", "1", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| train", "| generate"))]
    assert len(rows) == 2 * 3  # 3 candidates for each of the two benchmarks
    assert all(float(row.split("|")[-2]) > 0 for row in rows)
    assert [row.split("|")[-2].strip() for row in rows[::3]] == ["1.00", "1.00"]  # the LoRA baseline
