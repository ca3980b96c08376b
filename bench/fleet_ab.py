"""Fleet A/B: `bench.fleet` at one fleet size for two git revisions, runs alternating on one machine.

Single fleet runs on a small, shared machine vary up to 2x in updates/s, so a change to the aggregator is judged
by alternating runs of the two trees (base, head, base, head, ...) and the medians of each: the aggregator's CPU
time per update (the steadier figure), updates/s and peak RSS, with their spreads; a difference no larger than
either side's spread is a tie. Each revision is checked out into a temporary git worktree and runs there with
this interpreter, so the working tree is not touched.

    python -m bench.fleet_ab --base e015386 --head a5e4ca5 --update-kb 1 275 --repeats 3 \\
        --out bench/results/fleet_events_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import compare, spread, write_json

REPO = Path(__file__).resolve().parent.parent
FIGURES = {  # row key: how one fleet run gives it
    "aggregator_cpu_ms_per_update": lambda row: row["cpu_ms_per_update"]["aggregator"],
    "updates_per_s": lambda row: row["updates_per_s"],
    "peak_rss_mib": lambda row: row["peak_rss_mib"],
}


@contextmanager
def worktrees(revisions: list[str]) -> Iterator[dict[str, Path]]:
    """Each revision checked out (detached) in a temporary worktree; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fedmt-ab-") as root:
        trees: dict[str, Path] = {}
        try:
            for revision in revisions:
                path = Path(root) / revision.replace("/", "_")
                git("worktree", "add", "--detach", "--quiet", str(path), revision)
                trees[revision] = path
            yield trees
        finally:
            for path in trees.values():
                git("worktree", "remove", "--force", str(path))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def fleet_run(tree: Path, devices: int, rounds: int, update_kb: int, out: Path) -> dict:
    """One `bench.fleet` run in `tree` (its code, this interpreter); its row."""
    command = [
        sys.executable,
        "-m",
        "bench.fleet",
        *("--devices", str(devices), "--rounds", str(rounds), "--update-kb", str(update_kb)),
        *("--out", str(out)),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["rows"][0]


def summarise(update_kb: int, revision: str, rows: list[dict]) -> dict:
    """One tree at one update size: each run's figures, their median and spread."""
    summary: dict = {
        "update_kb": update_kb,
        "tree": revision,
        "load_average": [r["load_average"] for r in rows],
    }
    for key, figure in FIGURES.items():
        values = [figure(row) for row in rows]
        summary[key] = values
        summary[f"median_{key}"] = statistics.median(values)
        summary[f"spread_{key}"] = round(spread(values), 3)
    summary["lost"] = sum(row["lost"] for row in rows)
    return summary


def verdicts(base: dict, head: dict) -> dict[str, str]:
    """head / base per figure, or a tie."""
    return {
        key: compare(
            head[f"median_{key}"], head[f"spread_{key}"], base[f"median_{key}"], base[f"spread_{key}"]
        )
        for key in FIGURES
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision measured first in each pair")
    parser.add_argument("--head", default="HEAD", help="git revision compared with it")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--update-kb", type=int, nargs="+", default=[1, 275])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tree and size (median, spread)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fleet_ab.json"))
    args = parser.parse_args(argv)
    revisions = {
        name: git("rev-parse", "--short", rev) for name, rev in (("base", args.base), ("head", args.head))
    }
    if revisions["base"] == revisions["head"]:
        parser.error(f"--base and --head are the same commit ({revisions['base']})")
    runs: dict[tuple[int, str], list[dict]] = {}
    with worktrees(list(revisions.values())) as trees, tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for kb in args.update_kb:
                for revision, tree in trees.items():
                    row = fleet_run(tree, args.devices, args.rounds, kb, Path(scratch) / "fleet.json")
                    runs.setdefault((kb, revision), []).append(row)
                    print(
                        f"run {repeat + 1}/{args.repeats} {kb} KB {revision}: "
                        f"{FIGURES['aggregator_cpu_ms_per_update'](row):.2f} ms CPU/update, "
                        f"{row['updates_per_s']:.0f} updates/s, peak RSS {row['peak_rss_mib']:.1f} MiB",
                        flush=True,
                    )
    summaries = {key: summarise(*key, rows) for key, rows in runs.items()}
    base, head = revisions["base"], revisions["head"]
    comparisons = {str(kb): verdicts(summaries[kb, base], summaries[kb, head]) for kb in args.update_kb}
    rows = list(summaries.values())
    write_json(
        args.out,
        {
            "command": " ".join(["python -m bench.fleet_ab", *(argv if argv is not None else sys.argv[1:])]),
            "devices": args.devices,
            "rounds": args.rounds,
            "base": revisions["base"],
            "head": revisions["head"],
            "rows": rows,
            "head_over_base": comparisons,
        },
    )
    print(f"{'KB':>5} {'tree':>9} {'CPU ms/update':>22} {'updates/s':>20} {'peak RSS MiB':>20}")
    for row in rows:
        cells = [
            f"{row[f'median_{key}']:.2f} ({row[f'spread_{key}']:.0%})".rjust(width)
            for key, width in zip(FIGURES, (22, 20, 20))
        ]
        print(f"{row['update_kb']:>5} {row['tree']:>9} {' '.join(cells)}")
    for kb, verdict in comparisons.items():
        print(f"{kb} KB, head / base: " + ", ".join(f"{key} {text}" for key, text in verdict.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
