"""Render a kind's Jinja template for one spec into deterministic, readable Triton source."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

import jinja2
import jinja2.meta

from flashmhf.codegen.kinds import get_kind
from flashmhf.codegen.plan import plan
from flashmhf.codegen.spec import Spec

TEMPLATE_PACKAGE = "flashmhf.templates"


def _template_text(name: str) -> str:
    return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def _partials(name: str) -> list[str]:
    """The shared partials (names starting with ``_``) that template ``name`` includes or imports,
    directly or through another partial, sorted."""
    env = _environment()
    found: set[str] = set()
    todo = [name]
    while todo:
        ast = env.parse(_template_text(todo.pop()))
        for ref in jinja2.meta.find_referenced_templates(ast):
            if ref is None or not ref.startswith("_"):
                raise ValueError(f"template {name}: includes must name a shared partial, got {ref!r}")
            if ref not in found:
                found.add(ref)
                todo.append(ref)
    return sorted(found)


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
    """sha256 (first 16 hex digits) of the kind's template and the shared partials it uses: editing
    a partial stales the tuned configs of the kinds that include it, and only those."""
    h = hashlib.sha256()
    template = get_kind(kind).template
    for name in (template, *_partials(template)):
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
