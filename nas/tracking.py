"""Experiment tracking: Weights & Biases (offline unless the user has logged in) or nothing."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["Tracker", "create_tracker", "wandb_mode"]

log = logging.getLogger(__name__)


def wandb_mode(requested: str | None) -> str:
    """Return the W&B mode: the requested one, else ``WANDB_MODE``, else online only with credentials."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    return "online" if logged_in else "offline"


def _netrc_has_wandb() -> bool:
    """Return whether ``~/.netrc`` (or ``$NETRC``) contains W&B credentials, as ``wandb login`` writes them.

    The host is that of ``WANDB_BASE_URL`` (``https://api.wandb.ai`` by default). A netrc file with
    entries for other hosts only does not count.
    """
    import netrc
    from urllib.parse import urlparse

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return False
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    # wandb writes the host with its port where the URL has one.
    hosts = {name for name in (url.netloc, url.hostname) if name}
    try:
        credentials = netrc.netrc(path)
    except (netrc.NetrcParseError, OSError):
        return False
    return any(credentials.authenticators(host) is not None for host in hosts)


class Tracker:
    """Logs stage metrics and summaries; the base class does nothing."""

    name = "none"

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def log_table(self, key: str, rows: list[Mapping[str, Any]]) -> None:
        pass

    def log_image(self, key: str, path: str) -> None:
        pass

    def lightning_logger(self, prefix: str = "") -> Any:
        """Return a Lightning logger for trainers, or False for none; ``prefix`` starts its metric names."""
        return False

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, cfg: Mapping[str, Any], run_config: Mapping[str, Any], job_type: str, run_dir: str,
                 default_group: str | None = None) -> None:
        import wandb

        allowed = {"name", "project", "entity", "mode", "group", "tags"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"Unknown keys {unknown} in logger=wandb; allowed keys are {sorted(allowed)}.")
        mode = wandb_mode(cfg.get("mode"))
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.get("project", "tailnas"), entity=cfg.get("entity"), group=cfg.get("group") or default_group,
            tags=list(cfg.get("tags") or []), job_type=job_type, config=dict(run_config), mode=mode, dir=run_dir,
        )
        log.info("Weights & Biases run %s in %s mode (dir %s)", self.run.id, mode, run_dir)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def log_table(self, key: str, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[str(r[c]) if c == "arch" else r[c] for c in columns] for r in rows])
        self.run.log({key: table})

    def log_image(self, key: str, path: str) -> None:
        self.run.log({key: self._wandb.Image(path)})

    def lightning_logger(self, prefix: str = "") -> Any:
        from lightning.pytorch.loggers import WandbLogger

        # Lightning joins the prefix with "-": "scratch-val/accuracy".
        return WandbLogger(experiment=self.run, prefix=prefix)

    def finish(self) -> None:
        self.run.finish()


def create_tracker(cfg: Mapping[str, Any], run_config: Mapping[str, Any], job_type: str, run_dir: str,
                   default_group: str | None = None) -> Tracker:
    """Build the tracker that ``logger=<name>`` selects.

    ``default_group`` is the W&B group when ``logger.group`` is null. search.py and train.py pass the
    study name, so that a study's search run and its fine-tuning runs appear together in the W&B UI.
    """
    name = cfg.get("name", "none")
    if name == "none":
        return Tracker()
    if name == "wandb":
        return WandbTracker(cfg, run_config, job_type, run_dir, default_group)
    raise ValueError(f"Unknown logger={name!r}; available loggers are ['none', 'wandb'].")
