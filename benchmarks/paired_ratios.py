"""Round-by-round ratios between two providers of a `fastcaps bench` JSON.

    python benchmarks/paired_ratios.py benchmarks/results/cpu-mnist-run1.json \
        [--slower reference-compiled] [--faster cpu]

`fastcaps bench` reports each provider against the reference. Its samples come from
interleaved rounds (sample k of every provider of a group is from round k), so any two
providers can be compared the same way: per round, the time of `slower` over the time of
`faster`. Prints, per group, the median of those ratios with their quartiles and the
number of rounds in which `faster` was the faster one.
"""

from __future__ import annotations

import argparse
import json

from fastcaps.tools.bench import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--slower", default="reference-compiled", help="numerator provider")
    parser.add_argument("--faster", default="cpu", help="denominator provider")
    args = parser.parse_args()
    with open(args.json) as f:
        results = json.load(f)["results"]
    groups = {}
    for r in results:
        key = (r["case"], r["mode"], r["batch"], r["iterations"], r["dtype"])
        groups.setdefault(key, {})[r["provider"]] = r["samples_ms"]
    print(f"{args.slower} time / {args.faster} time, per round")
    for key, samples in groups.items():
        if args.slower not in samples or args.faster not in samples:
            continue
        slower, faster = samples[args.slower], samples[args.faster]
        median, q1, q3 = report.round_ratios(slower, faster)
        wins = sum(a > b for a, b in zip(slower, faster))
        print(f"{' '.join(map(str, key)):40s} {median:.2f}x [{q1:.2f}, {q3:.2f}]  "
              f"{args.faster} faster in {wins} of {len(faster)} rounds")


if __name__ == "__main__":
    main()
