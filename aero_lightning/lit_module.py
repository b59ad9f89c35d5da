"""AeroLitModule: optimisation, logging and decoding around an :class:`AeroModel` (no model maths here)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch

from aero_lightning.data.encoder_cache import check_encoder_frozen, model_encoder_fingerprint
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.packing import target_documents
from aero_lightning.distributed import gather_objects, parameters_are_sharded
from aero_lightning.metrics.wer import corpus_wer
from aero_lightning.model.aero import AeroModel, AeroOutput
from aero_lightning.model.freeze import unfreezable, unfreeze

logger = logging.getLogger(__name__)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``.

    Source: Loshchilov & Hutter 2017, "SGDR" (cosine schedule); warmup as in Goyal et al. 2017.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_UNFREEZE_KEYS = {"at_step", "patterns", "lr_scale", "warmup_steps"}


def _check_unfreeze(unfreeze: Mapping | None) -> dict | None:
    """Validate ``module.unfreeze`` (see :class:`AeroLitModule`); ``None`` or ``{}`` means off."""
    if not unfreeze:
        return None
    unknown = set(unfreeze) - _UNFREEZE_KEYS
    if unknown:
        raise ValueError(
            f"module.unfreeze: unknown keys {sorted(unknown)}; allowed: {sorted(_UNFREEZE_KEYS)}"
        )
    out = {
        "at_step": int(unfreeze.get("at_step", 0)),
        "patterns": list(unfreeze.get("patterns") or []),
        "lr_scale": float(unfreeze.get("lr_scale", 1.0)),
        "warmup_steps": int(unfreeze.get("warmup_steps", 0)),
    }
    if out["at_step"] < 1 or not out["patterns"]:
        raise ValueError(
            "module.unfreeze needs at_step >= 1 and a non-empty patterns list, e.g. "
            "{at_step: 2000, patterns: ['^encoder\\.', '^projector\\.']}; set module.unfreeze=null to turn it off"
        )
    if out["lr_scale"] <= 0 or out["warmup_steps"] < 0:
        raise ValueError(f"module.unfreeze: lr_scale must be > 0 and warmup_steps >= 0, got {dict(unfreeze)}")
    return out


class AeroLitModule(L.LightningModule):
    """Lightning wrapper: AdamW + cosine schedule with warmup, loss/LR logging, greedy test decoding with WER.

    Args:
        model: the :class:`AeroModel`.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices (not on biases, norms and embeddings of size 1-D).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        min_lr_ratio: final LR as a fraction of ``lr``.
        max_new_tokens: generation budget in test decoding.
        num_beams: beams in test decoding (1 = greedy).
        predictions_dir: where test predictions JSONL and WER JSON are written (None: the trainer's log dir).
        unfreeze: a staged schedule in one run, ``{"at_step": K, "patterns": [regex, ...], "lr_scale": 1.0,
            "warmup_steps": 0}``: the parameters frozen by ``model.freeze`` that match ``patterns`` start
            training at optimizer step ``K``. They sit in the optimizer from the start, in their own param groups
            at LR 0; from step ``K`` their LR is ``lr_scale`` times the run's cosine schedule, ramped linearly over
            ``warmup_steps``. The rest of the model keeps one schedule, with no restart. Single-process runs only
            (DDP and FSDP fix the trainable set when they wrap the model).
        lr_groups: ``{regex: peak LR}``: trainable parameters whose name matches a regex (the first that matches)
            train at that peak LR instead of ``lr``, on the same schedule, e.g. ``{"^projector\\.": 1e-4}`` for a
            projector that starts from random init while the pre-trained encoder and LLM fine-tune at ``lr``.

    Raises:
        ValueError: on an ``unfreeze`` without ``at_step >= 1`` or ``patterns``, with ``lr_scale <= 0``,
            ``warmup_steps < 0`` or an unknown key; at fit start, when a pattern matches no frozen parameter or the
            run has more than one process, or an ``lr_groups`` pattern matches no trainable parameter.
    """

    def __init__(
        self,
        model: AeroModel,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        max_new_tokens: int = 96,
        num_beams: int = 1,
        predictions_dir: str | None = None,
        unfreeze: Mapping | None = None,
        lr_groups: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.model = model
        self.unfreeze = _check_unfreeze(unfreeze)
        self.lr_groups = dict(lr_groups or {})
        self._unfrozen = False
        self.save_hyperparameters(ignore=["model"])
        self._test_records: list[dict] = []
        self.test_metrics: dict = {}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        # parameters that module.unfreeze trains later; raises if a pattern matches no frozen parameter
        later = (
            unfreezable(self.model, self.unfreeze["patterns"], self.model.fixed_parameters)
            if self.unfreeze
            else {}
        )
        own_lr = [(re.compile(pattern), float(lr)) for pattern, lr in (self.lr_groups or {}).items()]
        buckets: dict[tuple, list] = {}  # (index in lr_groups or None, is a matrix) -> parameters, in order
        decay_later, no_decay_later = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                group = next((i for i, (pattern, _) in enumerate(own_lr) if pattern.search(name)), None)
                buckets.setdefault((group, p.ndim >= 2), []).append(p)
            elif name in later:
                (decay_later if p.ndim >= 2 else no_decay_later).append(p)
        if not (buckets or decay_later or no_decay_later):
            raise ValueError("every parameter is frozen: nothing to train (check model.freeze)")
        unused = [
            pattern.pattern for i, (pattern, _) in enumerate(own_lr) if not any(k[0] == i for k in buckets)
        ]
        if unused:
            raise ValueError(f"module.lr_groups patterns {unused} match no trainable parameter")
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10_000

        def schedule(step: int) -> float:
            return cosine_with_warmup(step, hp.warmup_steps, total, hp.min_lr_ratio)

        groups = [
            {"params": buckets.get((None, True), []), "weight_decay": hp.weight_decay},
            {"params": buckets.get((None, False), []), "weight_decay": 0.0},
        ]
        for (group, is_matrix), params in buckets.items():
            if group is not None:  # same schedule, own peak LR
                decay = hp.weight_decay if is_matrix else 0.0
                groups.append({"params": params, "weight_decay": decay, "lr": own_lr[group][1]})
        lambdas = [schedule] * len(groups)
        if self.unfreeze:  # the groups exist on resume too, so a checkpoint's optimizer state fits
            uf = self.unfreeze

            def staged(step: int) -> float:
                if step < uf["at_step"]:
                    return 0.0
                ramp = (
                    min(1.0, (step - uf["at_step"] + 1) / uf["warmup_steps"]) if uf["warmup_steps"] else 1.0
                )
                return uf["lr_scale"] * ramp * schedule(step)

            groups += [
                {"params": decay_later, "weight_decay": hp.weight_decay},
                {"params": no_decay_later, "weight_decay": 0.0},
            ]
            lambdas += [staged, staged]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        """With ``data.encoder_cache=true``: refuse an encoder that trains at any point of the run, and bind the
        training data to the cache of this model's encoder (before any strategy wraps or shards the model).

        Raises:
            UserValueError: from :func:`~aero_lightning.data.encoder_cache.check_encoder_frozen` and
                :meth:`~aero_lightning.data.datamodule.AeroDataModule.bind_encoder_cache`.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage != "fit" or not getattr(datamodule, "encoder_cache", False):
            return
        check_encoder_frozen(
            self.model.named_parameters(),
            self.unfreeze["patterns"] if self.unfreeze else (),
            self.model.fixed_parameters,
        )
        datamodule.bind_encoder_cache(model_encoder_fingerprint(self.model))

    def on_fit_start(self) -> None:
        if self.unfreeze and self.trainer.world_size > 1:
            raise ValueError(
                "module.unfreeze changes the trainable parameters during the run, which DDP and FSDP do not "
                "allow: run on one device, or train the stages as separate runs joined by model.init_from"
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.unfreeze and not self._unfrozen and self.global_step >= self.unfreeze["at_step"]:
            names = unfreeze(self.model, self.unfreeze["patterns"], self.model.fixed_parameters)
            self.model.refresh_frozen_components()
            self._unfrozen = True
            logger.info("step %d: unfroze %d parameter tensors (%s)", self.global_step, len(names), names[:3])

    # ------------------------------------------------------------------ steps
    def _forward(self, batch: dict):
        return self.model.forward_batch(batch, return_logits=False)  # loss in chunks: no (L, vocab) logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The step's loss, normalised by the target tokens of the whole global batch (:meth:`training_loss`)."""
        out = self._forward(batch)
        bs = len(batch["keys"])  # documents (a packed batch is one row of several)
        if self.model.ctc_only:  # encoder pre-training: the CTC term is the objective
            self.log("train/loss", out.ctc_loss, prog_bar=True, batch_size=bs)
            self.log("train/target_tokens", out.ctc_target_tokens.float(), batch_size=bs, reduce_fx="sum")
        else:
            self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
            self.log("train/target_tokens", out.num_target_tokens.float(), batch_size=bs, reduce_fx="sum")
            # a row without a transcript (no ASR document) has no CTC mean to log
            if out.ctc_loss_sum is not None and bool(out.ctc_target_tokens):
                self.log("train/ctc_loss", out.ctc_loss, prog_bar=True, batch_size=bs)
            self._log_breakdown(out, batch)
        return self.training_loss(out, batch)

    def _log_breakdown(self, out: AeroOutput, batch: dict) -> None:
        """LM loss and target tokens per task and per corpus of this micro-batch (``train/task/<task>/loss``,
        ``.../target_tokens``, ``train/corpus/<corpus>/...``); logging only, the objective stays the global mean."""
        if out.target_losses is None or "tasks" not in batch:
            return
        docs = target_documents(batch).to(out.target_losses.device)  # (N_t,)
        n_docs = len(batch["keys"])
        sums = torch.zeros(n_docs, device=docs.device).index_add_(0, docs, out.target_losses.float())
        counts = torch.bincount(docs, minlength=n_docs)
        for kind, names in (("task", batch["tasks"]), ("corpus", batch.get("corpora") or [])):
            for name in sorted(set(names)):
                pick = torch.tensor([n == name for n in names], device=docs.device)
                count = counts[pick].sum()
                if int(count):
                    self.log(f"train/{kind}/{name}/loss", sums[pick].sum() / count, batch_size=n_docs)
                    self.log(
                        f"train/{kind}/{name}/target_tokens",
                        count.float(),
                        batch_size=n_docs,
                        reduce_fx="sum",
                    )

    def training_loss(self, out: AeroOutput, batch: dict) -> torch.Tensor:
        """Assemble the objective: ``LM sum / LM targets + ctc_weight * CTC sum / CTC targets``.

        With ``group_target_tokens`` in the batch (the training stream's :class:`AccumulationGroups`), the target
        counts of the accumulation group are all-reduced over ranks at its first micro-batch, and each term is
        ``sum * world_size * accumulate / global_count``: Lightning divides the returned loss by ``accumulate`` and
        DDP/FSDP average gradients over ranks, so the step's gradient is ``sum of per-token gradients /
        global_count`` for each term, invariant to micro-batch size, accumulation and world size. The CTC count is
        ``group_ctc_tokens`` (CTC targets: reply tokens but the end-of-turn token, in documents with audio). Without
        group counts each term is the micro-batch's mean. With ``model.ctc_only`` the CTC term is the whole loss.
        """
        ctc_weight = 1.0 if self.model.ctc_only else self.model.ctc_weight
        if batch.get("group_target_tokens") is None:  # micro-batch means
            loss = None if self.model.ctc_only else out.loss
            if out.ctc_loss_sum is not None:
                ctc = ctc_weight * out.ctc_loss
                loss = ctc if loss is None else loss + ctc
            return loss
        if batch["group_index"] == 0:
            counts = [float(batch["group_target_tokens"])]
            if batch.get("group_ctc_tokens") is not None:
                counts.append(float(batch["group_ctc_tokens"]))
            self._global_tokens = self.trainer.strategy.reduce(
                torch.tensor(counts, device=self.device), reduce_op="sum"
            )
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches
        loss = None if self.model.ctc_only else out.loss_sum * scale / self._global_tokens[0].clamp_min(1.0)
        if out.ctc_loss_sum is not None:
            if len(self._global_tokens) > 1:
                ctc = out.ctc_loss_sum * scale / self._global_tokens[1].clamp_min(1.0)
            else:  # no CTC count in the batch: the micro-batch mean
                ctc = out.ctc_loss
            loss = ctc_weight * ctc if loss is None else loss + ctc_weight * ctc
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self._forward(batch)
        names = list(self.trainer.datamodule.val_dirs) if self.trainer.datamodule else []
        name = names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)
        # token-weighted mean over the set: log sums, Lightning reduces with "sum" then we divide at epoch end
        self._val_sums.setdefault(name, [0.0, 0])
        loss_sum, count = (
            (out.ctc_loss_sum, out.ctc_target_tokens)
            if self.model.ctc_only
            else (out.loss_sum, out.num_target_tokens)
        )
        self._val_sums[name][0] += float(loss_sum)
        self._val_sums[name][1] += int(count)

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, list] = {}

    def on_validation_epoch_end(self) -> None:
        # every rank gathers every configured set, in the same order, even one it got no shard of: a rank that
        # skipped a set must not skip the collective (16 ranks, 3 dev-clean shards)
        datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "val_dirs", {}) or self._val_sums)
        for name in names:
            loss_sum, count = self._val_sums.get(name, (0.0, 0))
            sums = self.all_gather(torch.tensor([loss_sum, float(count)], device=self.device))
            if sums.ndim > 1:
                sums = sums.sum(0)
            self.log(f"val/{name}/loss", sums[0] / sums[1].clamp_min(1), prog_bar=True, rank_zero_only=True)

    # ------------------------------------------------------------------ decoding
    def decode_batch(self, batch: dict) -> list[str]:
        """Greedy (or beam) decode a generation batch (left-padded prompts) into text."""
        feats, feat_lengths = self.model.compute_features(batch["audio_pcm"], batch["window_lengths"])
        generated = self.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            feats,
            feat_lengths,
            max_new_tokens=self.hparams.max_new_tokens,
            num_beams=self.hparams.num_beams,
            # sharded parameters are all-gathered in every forward: ranks keep stepping until all are done
            synced_gpus=parameters_are_sharded(self.trainer.strategy) and self.trainer.world_size > 1,
        )
        return self.model.tokenizer.batch_decode(generated, skip_special_tokens=True)

    def on_test_epoch_start(self) -> None:
        self._test_records = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        hyps = self.decode_batch(batch)
        duplicates = batch.get("duplicates") or [False] * len(hyps)
        for key, ref, hyp, corpus, n, repeat in zip(
            batch["keys"],
            batch["references"],
            hyps,
            batch["corpora"],
            batch["audio_samples"].tolist(),
            duplicates,
        ):
            if repeat:  # pads this rank's pass to the others' batch count; scored where it was read first
                continue
            self._test_records.append(
                {
                    "key": key,
                    "corpus": corpus,
                    "reference": ref,
                    "hypothesis": hyp.strip(),
                    "duration_s": n / SAMPLE_RATE_HZ,
                }
            )

    def on_test_epoch_end(self) -> None:
        records = [r for part in gather_objects(self._test_records) for r in part]
        self.test_records = records  # every rank's, each utterance once
        result = corpus_wer([r["reference"] for r in records], [r["hypothesis"] for r in records])
        self.test_metrics = {"wer": result.wer, **result.to_dict()}
        self.log("test/wer", result.wer, rank_zero_only=True)
        if self.trainer.is_global_zero:
            out_dir = Path(self.hparams.predictions_dir or self.trainer.log_dir or ".")
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / "predictions_test.jsonl", "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            (out_dir / "wer_test.json").write_text(json.dumps(self.test_metrics, indent=2))
            self.test_metrics["predictions_path"] = str(out_dir / "predictions_test.jsonl")
