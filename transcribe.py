"""Transcribe audio files: ``python transcribe.py ckpt=PATH audio=FILE_DIR_OR_GLOB`` (see conf/transcribe.yaml)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from aero_lightning.errors import check_group_overrides, exit_on_user_error
from aero_lightning.tasks.transcribe import transcribe


@hydra.main(version_base="1.3", config_path="conf", config_name="transcribe")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    result = transcribe(cfg)
    for record in result["records"]:
        if record is not None and "text" in record:
            print(f"{record['path']}\t{record['text']}")
    if result["transcribed"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    check_group_overrides(Path(__file__).resolve().parent / "conf")
    main()
