"""Carrying tuned results to a new template hash (flashmhf/tuner/carry.py): only where the new render
launches the very kernels the old one did. Runs in a subprocess without TRITON_INTERPRET (Triton's
cache keys exist only for real JIT functions); nothing runs on a GPU.
"""

from __future__ import annotations

import json

import pytest

from tests.test_resources import _run_compiling

_SCRIPT = r"""
import json, sys
import triton
from flashmhf.cache.store import ResultKey, TuningCache
from flashmhf.codegen import Spec, get_kind, render, template_hash
from flashmhf.tuner.carry import carry

spec = Spec("fwd", 2, 2, 32, 3, 32, "fp32")
kind = get_kind("fwd")
config = kind.default(spec, 64)
current = render(spec)
sources = {
    "aaaaaaaaaaaaaaaa": current + "\n# an edit of host code only\n",  # the same kernels
    "bbbbbbbbbbbbbbbb": "\n" + current,  # every kernel one line lower: another cache key
}
with TuningCache(sys.argv[1]) as cache:
    for old, source in sources.items():
        key = ResultKey(spec, 64, "nvidia-h200", "9.0", triton.__version__, old, kind.space_hash)
        cache.record_trial(key, config, "ok", median_ms=0.5)
        cache.db["kernel_sources"].insert({**spec.to_dict(), "template_hash": old, "source": source,
                                           "sha256": "-", "recorded_at": "-"})
    reports = carry(cache, ["fwd"])
    now = [k.template_hash for k, _ in cache.matching_rows(kind="fwd")]
print(json.dumps({"carried": {r.key.template_hash: r.carried for r in reports}, "now": sorted(now),
                  "current": template_hash("fwd")}))
"""


@pytest.mark.slow
def test_carries_host_only_edits_and_keeps_kernel_edits_stale(tmp_path):
    out = json.loads(_run_compiling("-c", _SCRIPT, str(tmp_path / "c.sqlite")).strip().splitlines()[-1])
    assert out["carried"] == {"aaaaaaaaaaaaaaaa": True, "bbbbbbbbbbbbbbbb": False}
    assert out["now"] == sorted([out["current"], "bbbbbbbbbbbbbbbb"])


def test_carry_script_refuses_the_interpreter(monkeypatch, tmp_path):
    from benchmarks import carry_results

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        carry_results.main([str(tmp_path / "a.sqlite"), "--out", str(tmp_path / "b.sqlite")])
