"""The benchmark modules run as ``python -m benchmarks.<name>`` from a checkout, and the documents that
describe them point at files that exist and at no machine's absolute paths."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import benchmarks
from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")


def test_every_gpu_script_of_the_old_layout_is_a_module():
    assert {"check_backward", "check_forward", "check_overhead", "compare_tiny_lm", "pair_backward",
            "saved_activations", "ship_h200", "sweep_kind", "tuner_vs_exhaustive"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_without_touching_sys_path_and_answers_help(name, capsys):
    before = list(sys.path)
    module = importlib.import_module(f"benchmarks.{name}")
    assert sys.path == before
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m benchmarks.{name}")
    assert f"python -m benchmarks.{name}" in module.__doc__  # the docstring shows how to run it


def test_preset_spec_takes_the_preset_shape():
    spec = common.preset_spec("bwd_dq", "repo-128m")
    assert (spec.kind, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.n_experts, spec.expert_dim, spec.dtype) \
        == ("bwd_dq", 8, 8, 96, 8, 256, "bf16")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        common.preset_spec("fwd", "nope")


def test_empty_user_cache_is_a_new_folder_unless_one_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHMHF_CACHE_DIR", raising=False)
    made = common.use_empty_user_cache()
    assert made.is_dir() and not any(made.iterdir()) and os.environ["FLASHMHF_CACHE_DIR"] == str(made)
    monkeypatch.setenv("FLASHMHF_CACHE_DIR", str(tmp_path))
    assert common.use_empty_user_cache() == tmp_path


def test_out_dir_is_OUT_or_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path / "results"))
    assert common.out_dir() == tmp_path / "results" and (tmp_path / "results").is_dir()
    monkeypatch.delenv("OUT")
    monkeypatch.chdir(tmp_path)
    assert common.out_dir().resolve() == tmp_path.resolve()


# ------------------------------------------------------------------------------------ documents

DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # code is not a link, even when it looks like one


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_that_exist(doc):
    missing = [target for target in LINK.findall(CODE.sub("", doc.read_text(encoding="utf-8")))
               if "://" not in target and not (doc.parent / target).exists()]
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"


def test_no_document_or_result_holds_a_machine_path():
    absolute = re.compile(r"(?<![\w.~])/(?:work|root|home|tmp|mnt|scratch)/")
    files = [*DOCS, *(REPO / "docs").rglob("*.json"), *(REPO / "docs").rglob("*.log"),
             *(REPO / "benchmarks").glob("*.py")]
    found = [f"{path.relative_to(REPO)}:{i}" for path in files
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if absolute.search(line)]
    assert not found, f"absolute machine paths in: {found}"
