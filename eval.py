"""Evaluate a checkpoint: ``python eval.py ckpt=PATH benchmark=NAME`` (see conf/eval.yaml, ``--help``).

A user error (a missing checkpoint or source, an unknown benchmark) prints one ``error:`` line and exits with
status 2 (:mod:`aero_lightning.errors`).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from aero_lightning.errors import check_group_overrides, exit_on_user_error
from aero_lightning.tasks.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    check_group_overrides(Path(__file__).resolve().parent / "conf")
    main()
