"""`fedmt-predictor`: fit the throughput predictor, export it to ONNX, search a configuration.

Its data comes from `fedmt-agent calibrate` on the device (the measurement needs the agent's task runtime)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.daemon import cli_main, cli_parser

NETWORKS = ("deepsets", "factored")  # predictor.model.NETWORKS, named without importing torch


def main(argv: list[str] | None = None) -> int:
    parser, sub = cli_parser("fedmt-predictor", "FedMT throughput predictor (Eq. 3-6, Algorithm 1).")
    fit = sub.add_parser("fit", help="train the predictor on a data file (torch); writes weights and errors")
    fit.add_argument("--data", type=Path, required=True)
    fit.add_argument("--out", type=Path, default=Path("predictor/models"))
    default = argparse.SUPPRESS  # unset options keep predictor.training.fit's defaults
    fit.add_argument("--epochs", type=int, default=default)
    fit.add_argument("--hidden", type=int, default=default)
    fit.add_argument("--members", type=int, default=default, help="networks in the ensemble")
    fit.add_argument("--seed", type=int, default=default)
    fit.add_argument("--network", choices=NETWORKS, default=default, help="predictor.model")
    crossval = sub.add_parser(
        "crossval", help="each co-located model combination held out in turn: the networks' errors on it"
    )
    crossval.add_argument("--data", type=Path, required=True)
    crossval.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    crossval.add_argument("--epochs", type=int, default=default)
    crossval.add_argument("--members", type=int, default=default, help="networks in each ensemble")
    crossval.add_argument("--out", type=Path, help="write the errors as JSON")
    export = sub.add_parser("export", help="export fitted weights to ONNX with a model card")
    export.add_argument("--weights", type=Path, required=True)
    plan = sub.add_parser(
        "plan", help="search R_i, B_i and the start order for co-located tasks (Eq. 5, 6, Algorithm 1)"
    )
    plan.add_argument("--predictor", type=Path, required=True, help="an exported .onnx file")
    plan.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="MODEL:SAMPLES",
        help="a co-located task: torchvision model and its local data volume (repeat, 1..5)",
    )
    plan.add_argument("--resolution", type=int, help="input size (default: the predictor's)")
    plan.add_argument("--batches", default="16,32,64,128", help="allowed batch sizes")
    plan.add_argument("--link-mbps", type=float, default=100.0, help="link speed for transfer-time estimates")
    plan.add_argument("--objective", choices=["sum", "makespan"], default="sum", help="Eq. 5 objective")
    from predictor.runtime import PredictorUnavailable

    return cli_main(parser, COMMANDS, argv, errors=(PredictorUnavailable, FileNotFoundError, ValueError))


def _fit(args: argparse.Namespace) -> int:
    import json

    from predictor.records import DataFile
    from predictor.training import fit

    options = {k: v for k, v in vars(args).items() if k in ("epochs", "hidden", "members", "seed", "network")}
    weights = fit(DataFile.read(args.data), args.out, **options)
    report = json.loads(weights.with_suffix(".fit.json").read_text())
    print(f"wrote {weights}; MAPE (percent): {report['mape_percent']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from predictor.training import export

    print(f"wrote {export(args.weights)} and its model card")
    return 0


def _crossval(args: argparse.Namespace) -> int:
    import json
    import statistics

    from predictor.training import combination_errors

    options = {k: v for k, v in vars(args).items() if k in ("epochs", "members")}
    errors = {n: combination_errors(args.data, network=n, **options) for n in args.networks}
    combinations = list(errors[args.networks[0]])
    print(f"{'held-out combination':<60}" + "".join(f"{n:>10}" for n in args.networks) + "  (MAPE %)")
    for combination in combinations:
        print(f"{combination:<60}" + "".join(f"{errors[n][combination]:>10.1f}" for n in args.networks))
    summary = {
        n: {"mean": statistics.fmean(e.values()), "median": statistics.median(e.values())}
        for n, e in errors.items()
    }
    for key in ("mean", "median"):
        print(f"{key:<60}" + "".join(f"{summary[n][key]:>10.1f}" for n in args.networks))
    if args.out:
        args.out.write_text(
            json.dumps({"data": str(args.data), "errors": errors, "summary": summary}, indent=2)
        )
    return 0


def _plan(args: argparse.Namespace) -> int:
    import time

    from predictor.features import extract
    from predictor.runtime import OnnxPredictor
    from predictor.search import configure, default_grid
    from protocol.schemas import ModelSpec

    predict = OnnxPredictor(args.predictor)
    resolution = args.resolution or predict.card["resolution"]
    models, volumes = zip(*(_model_and_samples(t) for t in args.task))
    tasks = [extract(ModelSpec(name=m, num_classes=10, input_size=resolution)) for m in models]
    seconds = [8 * t.param_bytes / (args.link_mbps * 1e6) for t in tasks]
    candidates = [sorted({int(b) for b in args.batches.split(",")})] * len(tasks)
    low, high = predict.batch_range
    if not low <= candidates[0][0] <= candidates[0][-1] <= high:
        raise ValueError(
            f"--batches {args.batches}: {predict.path.name} was profiled at batch sizes {low}..{high}; "
            "outside them it extrapolates"
        )
    started = time.perf_counter()
    grid = default_grid(len(tasks), predict.share_range)
    result = configure(
        tasks, volumes, candidates, seconds, seconds, predict, grid=grid, objective=args.objective
    )
    elapsed_ms = 1000 * (time.perf_counter() - started)
    print(f"{'order':>5}  {'model':<22}{'samples':>8}{'batch':>7}{'R_i %':>7}{'pred. img/s':>13}")
    for position, i in enumerate(result.order):
        print(
            f"{position + 1:>5}  {models[i]:<22}{volumes[i]:>8}{result.batches[i]:>7}{result.resources[i]:>7.0f}"
            f"{result.predicted_throughput[i]:>13.0f}"
        )
    print(
        f"R_v {sum(result.resources):.0f}%, simulated makespan {result.makespan:.1f} s, batch mismatch "
        f"{result.mismatch:.2f}, search {elapsed_ms:.1f} ms ({predict.path.name})"
    )
    return 0


def _model_and_samples(text: str) -> tuple[str, int]:
    model, _, samples = text.partition(":")
    if not samples.isdigit() or int(samples) < 1:
        raise SystemExit(f"--task expects MODEL:SAMPLES, e.g. resnet50:1000; got {text!r}")
    return model, int(samples)


COMMANDS = {"fit": _fit, "export": _export, "crossval": _crossval, "plan": _plan}

if __name__ == "__main__":
    sys.exit(main())
