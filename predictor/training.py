"""`fit` and `export`: from a profiling data file to weights, then to an ONNX file with its model card."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from predictor.dataset import Samples, build, mape, mape_interval, split
from predictor.encoding import INPUT_NAMES, MAX_TASKS
from predictor.features import extract
from predictor.model import EPOCHS, HIDDEN, MEMBERS, NETWORKS, Ensemble, ensemble, export_onnx, predict, train
from predictor.records import FOCUS, STEP_KINDS, DataFile, load_records, task_spec
from predictor.runtime import OnnxPredictor, card_path
from predictor.workload import fit_workload


def _fitted(samples: Samples, **options) -> Ensemble:
    """predictor.model.train on a set of samples; `options` are its keyword options."""
    return train(samples.x, samples.mask, samples.throughput, **options)


def samples_mape(model, samples: Samples) -> float:
    """The model's MAPE (percent, two decimals) on a set of samples."""
    return round(mape(predict(model, samples.x, samples.mask), samples.throughput, samples.mask), 2)


def samples_mape_interval(model, samples: Samples) -> list[float]:
    """The 95% bootstrap interval of `samples_mape` (percent, two decimals)."""
    interval = mape_interval(predict(model, samples.x, samples.mask), samples.throughput, samples.mask)
    return [round(v, 2) for v in interval]


def fit(
    data: DataFile,
    out_dir: Path,
    *,
    hidden: int = HIDDEN,
    members: int = MEMBERS,
    epochs: int = EPOCHS,
    seed: int = 0,
    protected: Sequence[Sequence[str]] = FOCUS,
    network: str = "deepsets",
) -> Path:
    """Train on the data file's training split (model combinations in `protected` are never held out as unseen);
    write `<gpu>.safetensors` and `<gpu>.fit.json`; return the weights."""
    gpu, records, cuda_graphs = data.gpu, data.records, data.cuda_graphs  # one of each, else ValueError
    samples = build(records)
    parts = split(samples, seed=seed, protected=protected)
    train_set = samples.take(parts.train)
    started = time.perf_counter()
    model = _fitted(train_set, hidden=hidden, members=members, epochs=epochs, seed=seed, network=network)
    held_out = {
        "train": train_set,
        "seen": samples.take(parts.seen),
        "unseen": samples.take(parts.unseen),
    }
    errors = {name: samples_mape(model, s) if len(s) else None for name, s in held_out.items()}
    intervals = {name: samples_mape_interval(model, s) if len(s) else None for name, s in held_out.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / (data.path.stem + ".safetensors")
    save_file(model.state_dict(), str(weights), metadata={"hidden": str(hidden), "members": str(members)})
    first = records[0]
    batches = [t.batch for r in records for t in r.tasks]
    shares = [t.resource for r in records for t in r.tasks]
    report = {
        "gpu": gpu,
        "sm_total": first.sm_total,
        "driver": first.driver,
        "torch": first.torch,
        "resolution": first.resolution,
        "data": {
            "file": data.path.name,
            "sha256": data.sha256,
            "records": len(records),
            "task_samples": int(samples.mask.sum()),
            "models": sorted({t.model for r in records for t in r.tasks}),
            "input_sizes": sorted({task_spec(r, t).input_size for r in records for t in r.tasks}),
            "batch_range": [min(batches), max(batches)],
            "share_range": [min(shares), max(shares)],
            "max_tasks_per_record": max(len(r.tasks) for r in records),
            "cuda_graphs": cuda_graphs,
        },
        "split": {
            "train_records": len(parts.train),
            "seen_test_records": len(parts.seen),
            "unseen_test_records": len(parts.unseen),
            "unseen_combinations": [list(c) for c in parts.unseen_combos],
        },
        "mape_percent": errors,
        "mape_interval_percent": intervals,  # 95% bootstrap over records
        "network": {
            "name": network,
            "kind": NETWORKS[network].kind,
            "hidden": hidden,
            "members": members,
            "epochs": epochs,
            "inputs_per_task": list(INPUT_NAMES),
            "max_tasks": MAX_TASKS,
            "output": "images/s per task",
            "train_seconds": round(time.perf_counter() - started, 1),
        },
    }
    report["workload"] = _workload(records)
    # the inputs' features, so that a process using the predictor on these workloads need not extract them
    features = {extract(task_spec(r, t)) for r in records for t in r.tasks}
    report["features"] = [
        dataclasses.asdict(f) for f in sorted(features, key=lambda f: (f.model, f.input_size, f.num_classes))
    ]
    weights.with_suffix(".fit.json").write_text(json.dumps(report, indent=2) + "\n")
    return weights


def combination_errors(data: Path, **options) -> dict[str, float]:
    """Leave one combination out: for every co-located model combination in the data file, fit on all the other
    records and return the MAPE (percent) on that combination's, by "model+model+...": how the network does on
    combinations it never saw, each one held out in turn rather than one random split's few. `options` are
    predictor.model.train's (network, hidden, members, epochs, seed)."""
    samples = build(load_records(data))
    errors = {}
    for combination in sorted({c for c in samples.combos if len(c) > 1}):
        held = np.array([c == combination for c in samples.combos])
        fitted = samples.take(np.flatnonzero(~held))
        model = _fitted(fitted, **options)
        errors["+".join(combination)] = samples_mape(model, samples.take(np.flatnonzero(held)))
    return errors


MIN_ALONE_RECORDS = 4


def _workload(records) -> dict:
    """Eq. 3's alpha (s/FLOP) and beta (s/byte) from single-task step times on the whole GPU, when there are enough."""
    alone = [
        (extract(task_spec(r, t)), t.batch, t.batch / t.throughput)
        for r in records
        if len(r.tasks) == 1 and r.tasks[0].resource == 100
        for t in r.tasks
    ]
    if len(alone) < MIN_ALONE_RECORDS:
        return {
            "alone_records": len(alone),
            "note": f"Eq. 3 needs at least {MIN_ALONE_RECORDS} single-task measurements at R=100%",
        }
    model = fit_workload(alone)
    return {
        "alone_records": len(alone),
        "alpha_s_per_flop": model.alpha,
        "beta_s_per_byte": model.beta,
        "gamma0_s": model.gamma0,
    }


def export(weights: Path) -> Path:
    """Write `<gpu>.onnx` and its model card (`.card.json` and `.card.md`) next to the weights."""
    import torch

    weights = Path(weights)
    report = json.loads(weights.with_suffix(".fit.json").read_text())
    state = load_file(str(weights))
    network = report["network"]
    model = ensemble(network["hidden"], network["members"], network.get("name", "deepsets"))
    model.load_state_dict(state)
    model.eval()
    onnx_path = weights.with_suffix(".onnx")
    export_onnx(model, str(onnx_path))
    rng = np.random.default_rng(0)
    reference_member = model.members[0]
    x = (
        rng.normal(size=(64, MAX_TASKS, len(INPUT_NAMES))) * reference_member.std.numpy()
        + reference_member.mean.numpy()
    ).astype(np.float32)
    mask = (rng.random((64, MAX_TASKS)) < 0.7).astype(np.float32)
    with torch.no_grad():
        reference = predict(model, x, mask)
    card = report | {
        "onnx": {
            "file": onnx_path.name,
            "opset": 17,
            "inputs": {"features": ["n", MAX_TASKS, len(INPUT_NAMES)], "mask": ["n", MAX_TASKS]},
        }
    }
    card_path(onnx_path).write_text(json.dumps(card, indent=2) + "\n")
    runtime = OnnxPredictor(onnx_path)
    (out,) = runtime.session.run(["throughput"], {"features": x, "mask": mask})
    parity = float(np.max(np.abs(out - reference) / np.maximum(np.abs(reference), 1e-6)))
    card["onnx"]["max_relative_difference_vs_torch"] = parity
    card_path(onnx_path).write_text(json.dumps(card, indent=2) + "\n")
    onnx_path.with_suffix(".card.md").write_text(card_markdown(card))
    return onnx_path


def _workload_text(workload: dict) -> str:
    if "alpha_s_per_flop" not in workload:
        return f"not fitted ({workload.get('note', 'no data')}; {workload.get('alone_records', 0)} found)."
    return (
        f"alpha {workload['alpha_s_per_flop']:.3g} s/FLOP, beta {workload['beta_s_per_byte']:.3g} s/byte, "
        f"gamma0 {workload['gamma0_s']:.3g} s, from {workload['alone_records']} single-task measurements."
    )


def _percent(mape: float | None, interval: list[float] | None = None) -> str:
    """A MAPE for the card's table, with its 95% interval where the card has one; a held-out set without records
    has none."""
    if mape is None:
        return "-"
    return f"{mape}%" if interval is None else f"{mape}% ({interval[0]}-{interval[1]}%)"


def card_markdown(card: dict) -> str:
    """The model card for people (`<gpu>.card.md`), from the card's JSON."""
    m, d, s = card["mape_percent"], card["data"], card["split"]
    i = card.get("mape_interval_percent", {})  # cards before intervals have none
    low, high = d["batch_range"]
    shares = ", SM shares {:g}..{:g}%".format(*d["share_range"]) if "share_range" in d else ""
    graphs = d.get("cuda_graphs")  # None: a card written before the kind of step was recorded
    steps = f" Profiled with {STEP_KINDS[graphs]}." if graphs is not None else ""
    return "\n".join(
        [
            f"# Throughput predictor for {card['gpu']}",
            "",
            f"Valid for: **{card['gpu']}** ({card['sm_total']} SMs), driver {card['driver']}, torch {card['torch']}, "
            f"training at {card['resolution']}x{card['resolution']} inputs, batch sizes {low}..{high}{shares} (the "
            f"profiled ranges; the agent keeps its plans inside them), 1..{card['network']['max_tasks']} co-located "
            f"tasks under MPS.{steps}",
            "",
            "| held-out set | MAPE of per-task throughput (95% interval) |",
            "|---|---:|",
            f"| configurations of seen model combinations ({s['seen_test_records']} records) | "
            f"{_percent(m['seen'], i.get('seen'))} |",
            f"| model combinations left out of training ({s['unseen_test_records']} records) | "
            f"{_percent(m['unseen'], i.get('unseen'))} |",
            f"| training set ({s['train_records']} records) | {_percent(m['train'], i.get('train'))} |",
            "",
            f"Training data: `{d['file']}` (sha256 `{d['sha256'][:16]}…`), {d['records']} measured windows, "
            f"{d['task_samples']} task throughputs, models {', '.join(d['models'])}.",
            f"Unseen combinations: {'; '.join('+'.join(c) for c in s['unseen_combinations']) or 'none'}.",
            f"Eq. 3 workload: {_workload_text(card.get('workload', {}))}",
            "",
            f"Network: {card['network']['kind']}; {card['network']['members']} members, hidden {card['network']['hidden']}, inputs per task "
            f"{', '.join(card['network']['inputs_per_task'])}; output images/s per task.",
            f"ONNX: `{card['onnx']['file']}`, dynamic batch axis, max relative difference to torch "
            f"{card['onnx']['max_relative_difference_vs_torch']:.1e}.",
            "",
            "Redo on your GPU: `fedmt-predictor profile --out predictor/data`, then `fedmt-predictor fit --data "
            "predictor/data/<gpu>.jsonl --out predictor/models` and `fedmt-predictor export --weights "
            "predictor/models/<gpu>.safetensors`.",
            "",
        ]
    )
