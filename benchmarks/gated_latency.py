"""Profile gated blocks of space=resnet on this CPU, score the gate-aware latency model, print one JSON line.

Usage: python benchmarks/gated_latency.py [--subnets N] [--passes P] [--repeats R] [--threads T]
       [--rounds K] [--ratios R ...] [--arch JSON] [--out DIR]

1. Profiles the gateable blocks of ``--subnets`` subnets of ``conf/space/resnet.yaml`` (1x28x28
   inputs) with their gates at every kept count (``predictors.gated.profile_gated_blocks``) into a
   fresh profile store, ``--passes`` times each.
2. ``blocks``: a quarter of the distinct blocks is held out and the model is fitted on the rest.
   Every run of the held-out blocks is scored (``within_10pct``, ``within_5pct``, ``mape``,
   ``kendall_tau``), and so is ``proportional``: the block's measured ungated latency times the
   kept share of its MACs. ``noise_floor``: agreement of the first two passes of every run.
3. ``network``: the ``--arch`` subnet (the default of ``benchmarks/gates.py``) gets gates as
   ``train.py gates=feature`` places them (``placement: measure``), and its blocks are profiled
   as ``train.py`` does for a budget (``fit_for_model``). Per keep ratio the gated network's
   latency is predicted (measured ungated latency plus the predicted change of each gated block)
   and measured, both at batch 1, the smallest median of ``--rounds`` interleaved rounds
   (``measure_latencies`` of ``benchmarks/gates.py``).
   ``proportional_ms`` is the ungated latency minus each gated block's MACs share of its
   measured ungated latency.
4. ``budgets``: ``gates.latency_budget_ms`` at 80%, 90% and 95% of the ungated latency: the
   keep ratio chosen from predictions (``predicted_keep_ratio``), the ratio after measuring the
   network (``keep_ratio``, as ``apply_gates`` confirms it) and the latency measured there.

Writes ``gated_blocks_predicted.png`` (held-out runs) and ``gated_network.png`` (latency against
keep ratio) to ``--out``. Latencies are only as quiet as the machine: run it alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gates import DEFAULT_ARCH, measure_latencies  # noqa: E402
from nas.gates import apply_gates, confirm_budget, find_block_sites, parse_gate_config  # noqa: E402
from nas.gates.budget import choose_keep_ratio, gated_runs, predict_latency_ms  # noqa: E402
from nas.report import atomic_write_text, save_figure  # noqa: E402
from nas.spaces import create_space, load_space_config  # noqa: E402
from predictors.build import hardware_facts_from_fingerprint  # noqa: E402
from predictors.fingerprint import device_fingerprint  # noqa: E402
from predictors.gated import (  # noqa: E402
    block_signature,
    fit_for_model,
    gated_block_features,
    holdout_predictions,
    profile_gated_blocks,
    score_holdout,
    space_blocks,
)
from predictors.plots import plot_predicted_vs_measured  # noqa: E402
from predictors.protocol import MeasurementProtocol  # noqa: E402
from predictors.store import ProfileStore, noise_floor_from_pairs  # noqa: E402

log = logging.getLogger("benchmarks.gated_latency")

BUDGET_SHARES = (0.8, 0.9, 0.95)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=int, default=60, help="subnets whose blocks are profiled (%(default)s)")
    parser.add_argument("--passes", type=int, default=2, help="measurements of each run (%(default)s)")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per measurement (%(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (%(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds timing the network (%(default)s)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0],
                        help="keep ratios at which the network check predicts and measures latency (%(default)s)")
    parser.add_argument("--arch", type=json.loads, default=DEFAULT_ARCH, help="subnet of the network check (JSON)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the subnets, the held-out split and the network's weights (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-gated-latency"),
                        help="folder for gated_latency.json and the plots, created if missing (%(default)s)")
    return parser.parse_args()


def noise_floor(records: list[dict[str, Any]]) -> dict[str, Any]:
    passes: dict[str, dict[int, float]] = defaultdict(dict)
    for record in records:
        passes[record["key"]][int(record["pass"])] = float(record["latency_ms"])
    return noise_floor_from_pairs((p[0], p[1]) for p in passes.values() if 0 in p and 1 in p)


def plot_network(path: Path, points: list[dict[str, Any]], ungated_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [p["keep_ratio"] for p in points]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ax.plot(ratios, [p["measured_ms"] for p in points], "o-", color="black", label="measured")
    ax.plot(ratios, [p["predicted_ms"] for p in points], "s--", color="tab:blue", label="gate-aware prediction")
    ax.plot(ratios, [p["proportional_ms"] for p in points], "^:", color="0.55", label="MACs share of blocks")
    ax.axhline(ungated_ms, color="tab:red", linewidth=1, label="ungated (measured)")
    ax.set(xlabel="keep ratio", ylabel="latency at batch 1 (ms)", title="Gated network: predicted and measured")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def network_check(space: Any, store: ProfileStore, protocol: MeasurementProtocol, args: argparse.Namespace,
                  hw: Any) -> dict[str, Any]:
    arch = space.arch_from_dict(args.arch)
    shape = tuple(space.input_shape(arch))
    torch.manual_seed(args.seed)
    subnet = space.build_supernet().extract(arch).eval()
    block_latency = fit_for_model(subnet, shape, store, protocol, passes=args.passes)
    gated = apply_gates(subnet, {"name": "feature"}, input_shape=shape, protocol=protocol)
    sites = find_block_sites(subnet, shape)
    signatures = {site.name: block_signature(subnet.get_submodule(site.name), site) for site in sites}
    ungated_block_ms = {}
    for record in store.gated_block_records(protocol.batch_size):
        if record["run"]["option"] == "none":
            ungated_block_ms.setdefault(json.dumps(record["block"], sort_keys=True), []).append(record["latency_ms"])

    models: dict[Any, torch.nn.Module] = {"ungated": subnet}
    for ratio in args.ratios:
        network = copy.deepcopy(gated)
        network.set_keep_ratio(ratio)
        models[ratio] = network
    measured = measure_latencies(models, shape, protocol.batch_size, args)
    base = measured["ungated"]
    points = []
    for ratio in args.ratios:
        proportional = base
        for name, run in gated_runs(sites, gated.plans, ratio, protocol.batch_size):
            signature = signatures[name]
            block_ms = float(np.median(ungated_block_ms[json.dumps(signature, sort_keys=True)]))
            share = gated_block_features(signature, run, protocol.batch_size, hw)["macs_share"]
            proportional -= block_ms * (1.0 - share)
        predicted = predict_latency_ms(base, sites, gated.plans, signatures, ratio, block_latency)
        points.append({"keep_ratio": ratio, "measured_ms": measured[ratio], "predicted_ms": predicted,
                       "proportional_ms": proportional, "counts": models[ratio].keep_counts()})
    budgets = []
    for share in BUDGET_SHARES:
        budget = share * base
        config = parse_gate_config({"name": "feature", "latency_budget_ms": budget})
        try:
            predicted_ratio = choose_keep_ratio(base, sites, gated.plans, signatures, config, block_latency)
            chosen = copy.deepcopy(gated)
            chosen.config = config
            chosen.set_keep_ratio(predicted_ratio)
            ratio = confirm_budget(chosen, shape, protocol)
        except ValueError as err:
            budgets.append({"budget_ms": budget, "error": str(err)})
            continue
        timed = measure_latencies({"chosen": chosen, "ungated": subnet}, shape, protocol.batch_size, args)
        budgets.append({"budget_ms": budget, "predicted_keep_ratio": predicted_ratio, "keep_ratio": ratio,
                        "measured_ms": timed["chosen"], "measured_ungated_ms": timed["ungated"]})
    plot_network(args.out / "gated_network.png", points, base)

    def within(key: str) -> float:
        return float(np.mean([abs(p[key] - p["measured_ms"]) / p["measured_ms"] <= 0.10 for p in points]))

    return {"arch": args.arch, "ungated_ms": base, "gated_blocks": sorted(gated.gated_blocks()), "points": points,
            "within_10pct": within("predicted_ms"), "proportional_within_10pct": within("proportional_ms"),
            "budgets": budgets}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    space = create_space(load_space_config(ROOT / "conf/space/resnet.yaml"))
    protocol = MeasurementProtocol(device="cpu", threads=args.threads, warmup=10, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as work:
        store = ProfileStore(Path(work) / "profiles", device_fingerprint(protocol))
        hw = hardware_facts_from_fingerprint(store.fingerprint)
        blocks = space_blocks(space, args.subnets, args.seed)
        measurements = profile_gated_blocks(blocks, store, protocol, passes=args.passes, seed=args.seed)
        profile_s = time.perf_counter() - started
        records = store.gated_block_records(protocol.batch_size)
        held_out = holdout_predictions(records, hw, seed=args.seed)
        report = score_holdout(held_out)
        plot_predicted_vs_measured(args.out / "gated_blocks_predicted.png", held_out["measured"],
                                   held_out["predicted"], title="Gated blocks held out: predicted vs measured",
                                   baseline_ms=held_out["proportional"], baseline_label="MACs share")
        network = network_check(space, store, protocol, args, hw)
    result = {"blocks": report, "distinct_blocks": len(blocks), "measurements": measurements,
              "noise_floor": noise_floor(records),
              "network": network, "profile_s": round(profile_s, 1), "threads": args.threads,
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(args.out / "gated_latency.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
