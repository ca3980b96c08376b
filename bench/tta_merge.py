"""Merge time-to-accuracy runs that several invocations made (a device call ends after 10 minutes) into one report.

    python -m bench.tta_merge --base call2/time_to_accuracy.json --out bench/results/tta_graphs \\
        call1/s/*_summary.json call2/s/*_summary.json

Every summary (testbed.demo's, one federation run) is a run of its own `partition` and `policy`, in the order
given; the base report, one of the invocations' `time_to_accuracy.json`, gives the device, target and settings
(the merged settings say how many runs each policy has). Writes <out>/time_to_accuracy.json and .png as
bench.time_to_accuracy does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.time_to_accuracy import from_summary, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="an invocation's time_to_accuracy.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("summaries", type=Path, nargs="+")
    args = parser.parse_args(argv)
    base = json.loads(args.base.read_text())
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in args.summaries:
        summary = json.loads(path.read_text())
        by_policy = runs.setdefault(summary["partition"], {})
        by_policy.setdefault(summary["policy"], []).append(from_summary(summary, base["target"]))
    repeats = {policy: len(r) for by_policy in runs.values() for policy, r in by_policy.items()}
    settings = base["settings"] | {"repeats": repeats, "merged_from": [str(p) for p in args.summaries]}
    write_report(args.out, runs, base["device"], base["target"], settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
