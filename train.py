"""Train an audio language model: ``python train.py experiment=demo`` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from aero_lightning.tasks.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
