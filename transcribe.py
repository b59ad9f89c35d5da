"""Transcribe audio files: ``python transcribe.py ckpt=PATH audio=FILE_DIR_OR_GLOB`` (see conf/transcribe.yaml).

stdout gets one line per input: ``path<TAB>text``, or ``#failed<TAB>path<TAB>reason<TAB>error`` for an input that
could not be transcribed; logs go to stderr.

Exit status (aero_lightning.tasks.transcribe.EXIT_CODES): 0 every input transcribed; 1 none transcribed; 2 a usage
error (bad arguments, missing checkpoint, no input found at all); 3 some inputs transcribed and some failed.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from aero_lightning.errors import check_group_overrides, exit_on_user_error
from aero_lightning.tasks.transcribe import text_lines, transcribe


@hydra.main(version_base="1.3", config_path="conf", config_name="transcribe")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    result = transcribe(cfg)
    for line in text_lines(result["records"]):
        print(line)
    if result["exit_code"]:
        sys.exit(result["exit_code"])


if __name__ == "__main__":
    check_group_overrides(Path(__file__).resolve().parent / "conf")
    main()
