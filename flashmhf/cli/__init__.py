"""`flashmhf` command line: presets, show, tune, cache, bench, doctor."""

from flashmhf.cli.app import main

__all__ = ["main"]
