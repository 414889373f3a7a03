"""The README's "Use it in your model" recipes run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flashmhf_runtime import op

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def recipe(heading: str) -> str:
    """The first python block under ``### heading`` of the "Use it in your model" section."""
    section = README.read_text().split("## Use it in your model", 1)[1].split("\n## ", 1)[0]
    part = section.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    match = re.search(r"```python\n(.*?)```", part, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_transformers_recipe_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it saves to ./flashmhf-llama
    # The core's reference path: generation under the interpreter is slow, and test_transformers.py
    # already runs these steps through the kernels.
    monkeypatch.setattr(op, "_INTERPRET", False)
    exec(compile(recipe("Hugging Face transformers"), "README.md", "exec"), {})
    assert (tmp_path / "flashmhf-llama" / "model.safetensors").is_file()
    assert "tensor([[" in capsys.readouterr().out  # the generated ids: 4 prompt + 8 new per row


def test_torch_distributed_recipe_runs_on_two_ranks(tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(recipe("torch.distributed"))
    # The ranks run the core's reference path: repo-128m sizes are too large for the interpreter.
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
