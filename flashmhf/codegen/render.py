"""Render a kind's Jinja template for one spec into deterministic, readable Triton source."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

import jinja2

from flashmhf.codegen.kinds import get_kind
from flashmhf.codegen.plan import plan
from flashmhf.codegen.spec import Spec

TEMPLATE_PACKAGE = "flashmhf.templates"


def _template_text(name: str) -> str:
    return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def _shared_partials() -> list[str]:
    """Files a template may include (names starting with ``_``), in a fixed order."""
    files = resources.files(TEMPLATE_PACKAGE).iterdir()
    return sorted(f.name for f in files if f.name.startswith("_") and f.name.endswith(".jinja"))


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("flashmhf", "templates"),
        undefined=jinja2.StrictUndefined,  # a missing variable is an error, never an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


@cache
def template_hash(kind: str) -> str:
    """sha256 (first 16 hex digits) of the kind's template and every shared partial."""
    h = hashlib.sha256()
    for name in (get_kind(kind).template, *_shared_partials()):
        h.update(name.encode())
        h.update(_template_text(name).encode())
    return h.hexdigest()[:16]


@cache
def render(spec: Spec) -> str:
    """Validate, plan and render ``spec``. Raises ``SpecError`` with a reason for invalid specs."""
    p = plan(spec)
    kind = get_kind(spec.kind)
    template = _environment().get_template(kind.template)
    return template.render(
        **p.template_vars(),
        KIND=kind.name,
        TEMPLATE=kind.template,
        TEMPLATE_HASH=template_hash(kind.name),
        SPACE_HASH=kind.space_hash,
    )
