"""The training task: build model, data, trainer from the composed config; fit; decode the test split."""

from __future__ import annotations

import json
import logging
import os
from fnmatch import fnmatch
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from aero_lightning.callbacks.preemption import HPC_PATTERN, resume_checkpoint
from aero_lightning.lit_module import AeroLitModule
from aero_lightning.model.build import RUN_MODEL_DIR, save_run_model
from aero_lightning.model.freeze import unfreezable

logger = logging.getLogger(__name__)


def build_strategy(cfg: DictConfig):
    """The ``strategy`` group: an object config (``_target_``) or ``{name: auto|ddp|...}``."""
    if "_target_" in cfg:
        return instantiate(cfg)
    return cfg.get("name", "auto")


def build_plugins(cfg: DictConfig | None) -> list:
    """The ``plugins`` group: each entry instantiated; entries that build None (not applicable here) are dropped.

    ``plugins.slurm`` is Lightning's ``SLURMEnvironment`` under ``srun`` and None elsewhere
    (:func:`aero_lightning.strategies.slurm_environment`).
    """
    built = [instantiate(c) for c in (cfg or {}).values() if c is not None]
    return [p for p in built if p is not None]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """Instantiate the Lightning Trainer with the callbacks, loggers, plugins and strategy groups."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        strategy=build_strategy(cfg.strategy),
        plugins=build_plugins(cfg.get("plugins")) or None,
    )


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from: ``cfg.ckpt_path`` when given, else, for an interrupted run,
    the newest checkpoint of its run folder.

    A requeued or restarted job runs in the same folder (``slurm/aero.sbatch`` names it after the job id; submitit
    re-runs a sweep job in its own), which may hold preemption checkpoints (``hpc_ckpt_<step>.ckpt``,
    :mod:`aero_lightning.callbacks.preemption`) and the periodic ``checkpoints/last.ckpt``. The one with the higher
    ``global_step`` wins: an hpc checkpoint from an earlier requeue must not win over a later ``last.ckpt``, which
    Lightning's own choice (``ckpt_path=None`` under SLURM: always the newest hpc checkpoint) would do.

    The run counts as interrupted when SLURM restarted the job (``SLURM_RESTART_COUNT > 0``: requeued by the
    preemption callback, by SLURM's own preemption, or after a node failure, when no signal came and only
    ``last.ckpt`` may exist), or when its newest checkpoint is an hpc checkpoint (a run stopped by SIGTERM outside
    SLURM). A run folder that is reused otherwise (``experiment=demo`` always writes ``outputs/demo``), or whose run
    went on to a later ``last.ckpt``, starts training anew, as it always did.
    """
    if cfg.get("ckpt_path") is not None:
        return cfg.ckpt_path
    output_dir = Path(cfg.paths.output_dir)
    hpc_dir = Path(OmegaConf.select(cfg, "callbacks.preemption.dirpath", default=None) or output_dir)
    ckpt_dir = (
        OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
        or output_dir / "checkpoints"
    )
    restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    if not (restarted or any(hpc_dir.glob(HPC_PATTERN))):
        return None
    found = resume_checkpoint(hpc_dir, Path(ckpt_dir) / "last.ckpt")
    if found is None or not (restarted or fnmatch(found[0].name, HPC_PATTERN)):
        return None
    logger.info("resuming from %s (global step %d, the newest checkpoint of this run folder)", *found)
    return str(found[0])


def example_lines(records: list[dict], count: int) -> list[str]:
    """Greedy transcripts of the first ``count`` test utterances (in key order) beside their references.

    Args:
        records: the test decode's records (``key``, ``reference``, ``hypothesis``), each utterance once.
        count: how many to show; 0 shows none.

    Returns:
        Lines ``"  REF  <reference>"`` / ``"  HYP  <hypothesis>"`` under a heading, two per utterance.
    """
    chosen = sorted(records, key=lambda r: r["key"])[: max(count, 0)]
    if not chosen:
        return []
    lines = [f"{len(chosen)} test utterances, greedy transcript (HYP) beside the reference (REF):"]
    for r in chosen:
        lines += [f"  {r['key']}", f"    REF  {r['reference']}", f"    HYP  {r['hypothesis']}"]
    return lines


def train(cfg: DictConfig) -> dict:
    """Run a training job.

    Steps: seed; check every data folder (a missing or empty one fails here, before the model is loaded); build the
    model with ``from_pretrained``; write ``config.yaml`` and the run's ``model/`` folder
    (:func:`~aero_lightning.model.build.save_run_model`: what loading the checkpoints needs besides the weights);
    fit (resuming from ``cfg.ckpt_path``, else, for an interrupted run, from its newest checkpoint:
    :func:`resume_path`); decode ``data.test_dir`` greedily and score WER if ``cfg.run_test``.

    Returns:
        ``{"output_dir", "best_checkpoint", "last_checkpoint", "test": {...WER...}}``.

    Raises:
        FileNotFoundError, ValueError: for missing or empty data folders, before training.
    """
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.check()

    model = instantiate(cfg.model, _convert_="all")
    module: AeroLitModule = instantiate(cfg.module, model=model, _convert_="all")
    datamodule.bind_model(model.tokenizer, model.audio_token_counter(), model.end_of_turn_token)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, %.2fM trainable", n_all / 1e6, n_train / 1e6)
    if module.unfreeze:  # raises here, before training, if a pattern matches no frozen parameter
        later = unfreezable(model, module.unfreeze["patterns"], model.fixed_parameters)
        logger.info(
            "module.unfreeze: %.2fM more trainable from step %d",
            sum(p.numel() for p in later.values()) / 1e6,
            module.unfreeze["at_step"],
        )

    trainer = build_trainer(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # checkpoints hold every weight; with this folder (configs, tokenizer, settings) the run loads without the
    # component folders, hub ids and data folders it was built from (load_model reads only the run folder)
    save_run_model(model, output_dir / RUN_MODEL_DIR)

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg))
    result = {"output_dir": str(output_dir), "data_rejected": datamodule.rejected_counts()}
    if result["data_rejected"]:
        logger.warning("training samples skipped (this rank, by reason): %s", result["data_rejected"])
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None:
        result["best_checkpoint"] = ckpt_cb.best_model_path
        result["last_checkpoint"] = ckpt_cb.last_model_path
    if cfg.get("run_test") and cfg.data.get("test_dir"):
        trainer.test(module, datamodule=datamodule)  # one batch under fast_dev_run
        result["test"] = module.test_metrics
    if trainer.is_global_zero:
        (output_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
        summary = [f"outputs: {output_dir}"]
        if "test" in result:
            t = result["test"]
            summary.append(
                f"test WER {100 * t['wer']:.2f}% over {t['num_samples']} utterances / {t['num_ref_words']} words "
                f"(S={t['substitutions']} D={t['deletions']} I={t['insertions']}); predictions: "
                f"{t.get('predictions_path')}"
            )
            summary.extend(example_lines(module.test_records, int(cfg.get("test_examples", 0) or 0)))
        if result.get("last_checkpoint"):
            summary.append(f"checkpoint: {result['last_checkpoint']}")
        summary.append(f"TensorBoard: tensorboard --logdir {output_dir / 'tensorboard'}")
        logger.info("\n".join(summary))
    return result
