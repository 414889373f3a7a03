"""Spec → validate → plan → render → load: the code generator."""

from flashmhf.codegen.kinds import KINDS, Config, KernelKind, format_config, get_kind
from flashmhf.codegen.loader import load, load_source
from flashmhf.codegen.plan import Plan, plan
from flashmhf.codegen.render import render, template_hash
from flashmhf.codegen.spec import DTYPES, Spec, SpecError, validate_spec

__all__ = [
    "DTYPES", "KINDS", "Config", "KernelKind", "Plan", "Spec", "SpecError", "format_config", "get_kind",
    "load", "load_source", "plan", "render", "template_hash", "validate_spec",
]
