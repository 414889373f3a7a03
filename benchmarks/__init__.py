"""Measurements and checks run from a checkout of the repository, on a GPU unless a module says
otherwise: ``python -m benchmarks.<module> --help`` from the repository root.

Each module prints a short table and writes its JSON under ``$OUT`` (default: the current
directory). Results and the commands that made them are indexed in ``docs/benchmarks/README.md``.

Not part of the installed package: these modules sit above every layer of it (codegen, runtime,
tuner, bench) and some read ``examples/``.
"""
