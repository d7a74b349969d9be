"""The ``fastcaps`` command line: ``fastcaps check``, ``fastcaps bench`` and ``fastcaps train``."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import List, Optional

import torch

from . import check, report, train
from .backends import BACKENDS, available_backends

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check(args: argparse.Namespace) -> int:
    # On CPU, "triton" runs under the interpreter (minutes per MNIST case): only when named.
    backends = args.backend or [
        b for b in available_backends(args.device) if not (b == "triton" and args.device == "cpu")
    ]
    dtypes = [_DTYPES[name] for name in (args.dtype or list(_DTYPES))]
    cases = check.full_cases() if args.full else check.small_cases() if args.small else check.default_cases()
    print(
        f"fastcaps check: {len(cases)} cases x {len(dtypes)} dtypes, backends {', '.join(backends)}; "
        "oracle: the reference in float64 (errors are max|x - ref| / max|ref|)",
        flush=True,
    )
    started = time.perf_counter()
    rows = check.run(backends, cases, dtypes, seed=args.seed, device=args.device)
    if args.verbose:
        print(check.format_table([check.format_row(row) for row in rows]))
    else:
        print(check.format_table(_summary(rows), _SUMMARY_HEADER))
    failed = [row for row in rows if not row.passed]
    tolerances = ", ".join(f"{str(d).replace('torch.', '')} {t:g}" for d, t in check.TOLERANCE.items())
    print(
        f"\n{len(rows) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - started:.1f} s "
        f"(tolerance: {tolerances}; finite difference {check.FD_TOLERANCE:g})"
    )
    for row in failed:
        print("FAILED: " + "  ".join(check.format_row(row)))
    return 1 if failed else 0


_SUMMARY_HEADER = ("backend", "shape", "dtype", "cases", "max err v", "grad u", "grad W", "grad b", "fd", "result")


def _summary(rows: List[check.Row]) -> List[List[str]]:
    """One line per (backend, shape, dtype): the worst error over all routing options."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row.backend, row.case.shape, row.dtype)].append(row)

    def worst(values):
        present = [v for v in values if v is not None]
        return max(present) if present else None

    lines = []
    for (backend, shape, dtype), group in groups.items():
        lines.append([
            backend, shape, str(dtype).replace("torch.", ""), str(len(group)),
            *(check.format_error(worst(getattr(r, name) for r in group))
              for name in ("error_v", "error_grad_u", "error_grad_weight", "error_grad_bias", "error_fd")),
            "pass" if all(r.passed for r in group) else "FAIL",
        ])
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcaps", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser(
        "check", help="compare every available backend with the reference, values and gradients"
    )
    check_parser.add_argument("--backend", action="append", choices=BACKENDS,
                              help="backend to check (repeatable; default: every one available on the "
                                   "device, but the Triton interpreter on CPU, which is checked when named)")
    check_parser.add_argument("--device", default="cpu", help="device of the inputs, e.g. cpu or cuda")
    check_parser.add_argument("--dtype", action="append", choices=list(_DTYPES),
                              help="dtype to check (repeatable; default: float32 and float64)")
    check_parser.add_argument("--full", action="store_true",
                              help="the full grid: B in {1,3,17} x I in {1,7,1152} x J in {1,3,10}")
    check_parser.add_argument("--small", action="store_true",
                              help="the default cases without the MNIST shape (for the Triton interpreter)")
    check_parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    check_parser.add_argument("--verbose", "-v", action="store_true", help="one line per case")
    check_parser.set_defaults(run=_check)
    report.add_parser(commands)
    train.add_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
