"""The tools, each owning its ``fastcaps`` subcommand (``add_parser``), run by tools/cli.py:

    check.py   ``fastcaps check``: every backend against the float64 reference
    bench/     ``fastcaps bench``: the benchmark engine, its report and charts
    train/     ``fastcaps train``: the paper's CapsNet on real digits
    aot.py     ``python -m fastcaps.tools.aot``: the Triton kernels compiled ahead of time
"""
