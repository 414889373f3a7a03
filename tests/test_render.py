"""Rendering: template hashes cover exactly the files a template is made of; the planned constants."""

import importlib

import pytest

from flashmhf.codegen import Spec, plan
from flashmhf.codegen.kinds import KINDS
from flashmhf.codegen.plan import power_of_two_parts
from flashmhf.codegen.render import _partials, template_hash


def test_partials_are_those_a_template_uses():
    assert _partials("fwd.py.jinja") == ["_header.py.jinja", "_macros.py.jinja"]
    assert _partials("fwd_ws.py.jinja") == ["_gluon.py.jinja", "_gluon_launch.py.jinja", "_header.py.jinja"]


def test_hashes_are_distinct_per_template_and_cover_the_gluon_helpers(monkeypatch):
    hashes = {name: template_hash(name) for name in KINDS}
    # Kinds that share a template (norm_router and router) share its hash; the kind is in the key too.
    assert len(set(hashes.values())) == len({KINDS[name].template for name in KINDS})
    # Editing the Gluon partial stales the warp-specialized kinds only.
    render = importlib.import_module("flashmhf.codegen.render")  # the package exports a function of that name
    real = render._template_text
    monkeypatch.setattr(render, "_template_text",
                        lambda name: real(name) + ("# edited\n" if name == "_gluon.py.jinja" else ""))
    template_hash.cache_clear()
    try:
        changed = {name for name in KINDS if template_hash(name) != hashes[name]}
    finally:
        template_hash.cache_clear()
    assert changed == {"fwd_ws", "fwd_ws_split", "bwd_dq_ws", "bwd_dkuv_ws"}


def test_head_dims_split_into_power_of_two_parts():
    assert power_of_two_parts(96) == (64, 32) and power_of_two_parts(128) == (128,)
    assert power_of_two_parts(112) == (64, 32, 16) and sum(power_of_two_parts(200)) == 200
    assert plan(Spec("fwd_ws", 8, 8, 96, 8, 256, "bf16")).template_vars()["D_H_PARTS"] == [64, 32]
    with pytest.raises(ValueError, match="n must be positive"):
        power_of_two_parts(0)
