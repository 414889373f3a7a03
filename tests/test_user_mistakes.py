"""Mistakes users make get a ValueError naming the argument (Python) or one error line (CLI), never
a traceback from deep inside; runs users expect to work (bf16 under the interpreter, a layer on the
meta device) work and are right."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import flashmhf_runtime as fm
from flashmhf.cache import paths
from flashmhf.cache.store import TuningCache
from flashmhf.cli.app import main
from tests.helpers import core_inputs, reference_core, rel_error
from tests.test_cache_hostile import read_only
from tests.test_cache_store import cfg, key

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=64, n_heads=2, d_ff=64, n_experts=2)


# ---- Python API ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("make", [lambda t: t.numpy(), lambda t: t.tolist()], ids=["numpy", "list"])
def test_core_op_names_an_argument_that_is_not_a_tensor(make, grad):
    q, k, u, v, r = core_inputs(4, 2, 2, 32, 2, 32, torch.float32, seed=0)
    with torch.set_grad_enabled(grad):
        with pytest.raises(ValueError, match="q: expected a torch.Tensor"):
            fm.flash_mhf(make(q), k, u, v, r)
        with pytest.raises(ValueError, match="r: expected a torch.Tensor"):
            fm.flash_mhf(q, k, u, v, make(r))


def test_layer_on_meta_tensors_gives_shapes_without_compute():
    layer = fm.FlashMHF(**SMALL, head_norm=True, device="meta")
    x = torch.randn(3, 5, 64, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 64) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.is_meta and layer.k.grad.is_meta
    preset = fm.FlashMHF.from_preset("repo-1.3b", device="meta", dtype=torch.bfloat16)
    assert preset(torch.empty(2, 16384, 2048, device="meta", dtype=torch.bfloat16)).shape == (2, 16384, 2048)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, "bf16"])
def test_layer_dtype_must_be_floating_point(dtype):
    with pytest.raises(ValueError, match="dtype: expected a floating-point torch.dtype"):
        fm.FlashMHF(**SMALL, dtype=dtype)


def test_layer_input_checks():
    layer = fm.FlashMHF(**SMALL)
    with pytest.raises(ValueError, match="x: expected a torch.Tensor, got ndarray"):
        layer(np.zeros((2, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r"x: expected dtype torch.float32 .* got torch.float64"):
        layer(torch.randn(2, 64, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast other input dtypes are fine
        assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).shape == (2, 64)


def test_no_assert_statement_in_code_the_public_api_runs():
    # `assert` disappears under -O and gives no reason: the runtime, codegen and cache raise instead.
    offenders = []
    for folder in ("flashmhf_runtime", "flashmhf/codegen", "flashmhf/cache"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip().startswith("assert ") or "raise AssertionError" in line:
                    offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert not offenders, offenders


# ---- bf16 under the interpreter, as a user runs it (no test shim) ------------------------------------

INTERPRETER_BF16 = textwrap.dedent("""
    import torch
    import flashmhf_runtime as fm
    from flashmhf_runtime import op, reference
    assert op._INTERPRET and not op.INTERPRETER_RUNS_BF16
    torch.manual_seed(0)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    q = torch.randn(37, 2, 32)
    k, u, v = (torch.randn(2, 2, 32, 32) * 32 ** -0.5 for _ in range(3))
    r = torch.softmax(torch.randn(37, 2, 2), -1)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, u, v)] + [r.requires_grad_()]
    s = fm.flash_mhf(*leaves)
    ref = reference.flash_mhf(*(t.detach().double() for t in leaves))
    ds = torch.randn_like(ref)
    s.backward(ds.to(s.dtype))
    grads = reference.flash_mhf_backward(*(t.detach().double() for t in leaves), ds)
    with torch.no_grad():  # the inference fast path, twice (a remembered plan)
        again = [fm.flash_mhf(*(t.detach() for t in leaves)) for _ in range(2)]
    print("core", err(s, ref), *(err(a, ref) for a in again))
    print("grads", *(err(t.grad, g) for t, g in zip(leaves, grads)))

    layer = fm.FlashMHF(64, 2, 64, 2, head_norm=True, dtype=torch.bfloat16)
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    y = layer(x)
    layer64 = fm.FlashMHF(64, 2, 64, 2, head_norm=True, dtype=torch.float64)
    layer64.load_state_dict(layer.state_dict())
    layer64.core_fn = reference.flash_mhf
    print("layer", err(y, layer64(x.double()).detach()))
""")


def test_bf16_under_the_interpreter_is_right_without_the_test_shim(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLASHMHF_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", INTERPRETER_BF16], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    errors = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.stdout.splitlines()}
    assert max(errors["core"]) < 1e-2 and max(errors["layer"]) < 2e-2, errors
    assert max(errors["grads"]) < 2e-2, errors


# ---- CLI on read-only places -----------------------------------------------------------------------

def one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def filled(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMHF_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.setattr(paths, "shipped_cache_paths", lambda: [])
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "tuned.sqlite"
    with TuningCache(path) as c:
        c.record_trial(key(), cfg(), "ok", median_ms=1.0)
        c.conn.execute("PRAGMA journal_mode = DELETE")  # a single file, as shipped
    return path


TUNE = ["tune", "--d-model", "64", "--heads", "2", "--d-ff", "64", "--experts", "2", "--kind", "fwd",
        "--dtype", "fp32", "--tokens", "1", "--trials", "1"]


def test_a_read_only_cache_file_is_one_line(filled):
    with read_only(filled):
        line = one_error_line(CliRunner().invoke(main, [*TUNE, "--cache", str(filled)]))
        assert "cannot write to this cache file" in line and "the file is a fine cache" in line
        line = one_error_line(CliRunner().invoke(main, ["cache", "rm", "--cache", str(filled), "--all", "--yes"]))
        assert "read-only" in line
        assert CliRunner().invoke(main, ["cache", "ls", "--cache", str(filled)]).exit_code == 0  # reading is fine


def test_a_read_only_folder_is_one_line(filled, tmp_path):
    export = tmp_path / "out.json"
    export.write_text("{}")
    with read_only(filled.parent):
        line = one_error_line(CliRunner().invoke(main, [*TUNE, "--cache", str(filled.parent / "new.sqlite")]))
        assert "cannot create a cache file here" in line
        line = one_error_line(CliRunner().invoke(main, ["cache", "import", str(export), "--cache",
                                                        str(filled.parent / "new.sqlite")]))
        line = one_error_line(CliRunner().invoke(main, ["cache", "export", "--cache", str(filled), "-o",
                                                        str(filled.parent / "out.json")]))
        assert "out.json" in line
        line = one_error_line(CliRunner().invoke(main, ["cache", "rm", "--cache", str(filled), "--all", "--yes"]))
        assert "the file is a fine cache, but this place is read-only" in line


# ---- NaN and Inf -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_torch_ops_and_the_readme_says_so(bad):
    q, k, u, v, r = core_inputs(20, 2, 2, 32, 2, 32, torch.float32, seed=0)
    q[3, 1, 5] = bad
    s = fm.flash_mhf(q, k, u, v, r)
    ref = reference_core(q, k, u, v, r)
    assert not torch.isfinite(s[3, 1]).any() and not torch.isfinite(ref[3, 1]).any()
    finite = torch.ones(20, 2, dtype=torch.bool)
    finite[3, 1] = False
    assert torch.isfinite(s[finite]).all()  # no other token or head is touched
    assert rel_error(s[finite], ref[finite]) < 1e-4
    readme = (REPO / "README.md").read_text()
    assert "NaN and Inf in the inputs propagate" in readme
