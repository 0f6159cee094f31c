"""Fill the profile store for one space on this device: ``python -m predictors.profile +space=resnet``.

Measurements go to ``${paths.work_dir}/profiles/<fingerprint_id>/``. Every finished run is on
disk at once, so Ctrl-C or a kill leaves a valid store, and running the same command again
measures only what is missing.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nas.cli import (
    UsageError,
    import_user_modules,
    profiled_space_config,
    require_space,
    run_cli,
    to_container,
    warn_added_keys,
)

log = logging.getLogger(__name__)

COMMAND = "python -m predictors.profile"


def run(cfg: DictConfig) -> None:
    """Profile ``cfg.space`` with the ``cfg.hardware`` protocol and print a summary."""
    require_space(cfg, COMMAND)
    from nas.spaces import create_space
    from predictors.fingerprint import device_fingerprint
    from predictors.profiling import MeasurementProtocol, busy_advice, profile_space
    from predictors.store import ProfileStore

    protocol = MeasurementProtocol.from_config(to_container(cfg.hardware))
    space_cfg = profiled_space_config(cfg, COMMAND)
    import_user_modules(to_container(cfg.get("imports")))
    space = create_space(space_cfg)
    store = ProfileStore(Path(cfg.paths.work_dir) / "profiles", device_fingerprint(protocol))
    settings = cfg.profile

    gate_subnets = int(settings.get("gate_subnets", 0))
    if gate_subnets < 0:
        raise UsageError(f"profile.gate_subnets must be 0 or more, but got {gate_subnets}.")
    if gate_subnets and protocol.runtime != "eager":
        raise UsageError(f"profile.gate_subnets times gated blocks with hardware.runtime=eager only, but got "
                         f"hardware.runtime={protocol.runtime}; set profile.gate_subnets=0 or hardware.runtime=eager.")
    try:
        with store.profiling_lock():
            started = time.perf_counter()
            summary = profile_space(
                space,
                store,
                protocol,
                n_subnets=int(settings.n_subnets),
                seed=int(cfg.seed),
                passes=int(settings.passes),
                width_step=int(settings.width_step),
                progress=bool(settings.progress),
            )
            gated_runs = 0
            if gate_subnets:
                from predictors.gated import profile_gated_blocks, space_blocks

                blocks = space_blocks(space, gate_subnets, int(cfg.seed))
                gated_runs = profile_gated_blocks(blocks, store, protocol, passes=int(settings.passes),
                                                  seed=int(cfg.seed), progress=bool(settings.progress))
    except KeyboardInterrupt:
        log.warning("Profiling interrupted; %s contains every finished run.", store.directory)
        print(f"Interrupted. The store {store.directory} is valid; run the same command again to resume.",
              file=sys.stderr)
        sys.exit(130)

    noise = summary.noise_floor
    print(f"Profile store: {summary.store_dir} (device {store.fingerprint['name']}, id {summary.fingerprint_id})")
    print(f"Layers: {summary.distinct_layers} distinct ({summary.sweep_layers} from width sweeps) x "
          f"{summary.passes} passes: {summary.layers_measured} measured, {summary.layers_reused} already stored")
    print(f"Subnets: {summary.distinct_subnets} distinct x {summary.passes} passes: "
          f"{summary.subnets_measured} measured, {summary.subnets_reused} already stored")
    if gate_subnets:
        print(f"Gated blocks: {len(blocks)} distinct blocks of {gate_subnets} subnets: {gated_runs} measurements taken, "
              f"{len(store.gated_block_records(protocol.batch_size))} records of batch size {protocol.batch_size} stored")
    print(f"Wall time: {time.perf_counter() - started:.1f} s")
    if noise["n"]:
        tau = "n/a" if noise["kendall_tau"] is None else f"{noise['kendall_tau']:.3f}"
        print(f"Noise floor over {noise['n']} subnets: {100 * noise['within_5pct']:.1f}% of pass pairs agree "
              f"within 5%, {100 * noise['within_10pct']:.1f}% within 10%; Kendall tau between passes {tau}")
    else:
        print("Noise floor: needs profile.passes >= 2 and profile.n_subnets >= 1.")
    if summary.busy_runs:
        runs = summary.layers_measured + summary.subnets_measured
        print(f"Warning: {summary.busy_runs} of {runs} runs were measured while the load average exceeded the CPU "
              f"count, so their latencies may include waiting for a core. "
              f"{busy_advice(summary.busy_runs, runs, summary.store_dir)}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile")
def main(cfg: DictConfig) -> None:
    run_cli(run, cfg)


if __name__ == "__main__":
    warn_added_keys(sys.argv[1:], "python -m predictors.profile", "profile")
    main()
