"""`fedmt-predictor`: profile this GPU, fit the throughput predictor, export it to ONNX, search a plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmt-predictor", description="FedMT throughput predictor (Eq. 3-6, Algorithm 1).")
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="measure co-located throughput on this GPU (needs MPS; appends to a data file)")
    prof.add_argument("--out", type=Path, default=Path("predictor/data"), help="folder of the per-GPU data files")
    prof.add_argument("--budget-s", type=float, default=480.0, help="stop after this many seconds")
    prof.add_argument("--resolution", type=int, default=128)
    prof.add_argument("--window-s", type=float, default=1.0, help="length of one measurement window")
    prof.add_argument("--seed", type=int, default=0)
    fit = sub.add_parser("fit", help="train the predictor on a data file (torch); writes weights and errors")
    fit.add_argument("--data", type=Path, required=True)
    fit.add_argument("--out", type=Path, default=Path("predictor/models"))
    fit.add_argument("--epochs", type=int, default=2000)
    fit.add_argument("--hidden", type=int, default=32)
    fit.add_argument("--members", type=int, default=5, help="networks in the ensemble")
    fit.add_argument("--seed", type=int, default=0)
    export = sub.add_parser("export", help="export fitted weights to ONNX with a model card")
    export.add_argument("--weights", type=Path, required=True)
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args)


def _profile(args: argparse.Namespace) -> int:
    from predictor.profiler import profile

    profile(args.out, budget_s=args.budget_s, seed=args.seed, resolution=args.resolution, window_s=args.window_s)
    return 0


def _fit(args: argparse.Namespace) -> int:
    import json

    from predictor.training import fit

    weights = fit(args.data, args.out, hidden=args.hidden, members=args.members, epochs=args.epochs, seed=args.seed)
    report = json.loads(weights.with_suffix(".fit.json").read_text())
    print(f"wrote {weights}; MAPE (percent): {report['mape_percent']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from predictor.training import export

    print(f"wrote {export(args.weights)} and its model card")
    return 0


COMMANDS = {"profile": _profile, "fit": _fit, "export": _export}

if __name__ == "__main__":
    sys.exit(main())
