"""Train an audio language model: ``python train.py experiment=demo`` (see conf/train.yaml, ``--help``).

A user error (a missing data folder, an unknown option of a config group) prints one ``error:`` line and exits with
status 2 (:mod:`aero_lightning.errors`).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from aero_lightning.errors import check_group_overrides, exit_on_user_error
from aero_lightning.tasks.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    check_group_overrides(Path(__file__).resolve().parent / "conf")
    main()
