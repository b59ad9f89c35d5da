"""AeroModel: audio encoder -> projector -> causal LLM.

Audio is cut into 30 s windows, encoded (padding-free by default), projected per window, and the projected
embeddings of all windows of all samples — in order — are scattered into the ``<|AUDIO|>`` slots of the LLM's
input embeddings. The LLM is any HF ``AutoModelForCausalLM`` (Qwen2.5 in the Aero recipe).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from aero_lightning.data.chat import AUDIO_SPECIAL_TOKENS, AUDIO_TOKEN, IGNORE_INDEX
from aero_lightning.data.features import HOP_LENGTH, WINDOW_SAMPLES, LogMelSpectrogram
from aero_lightning.model.attention import packed_attention_kwargs
from aero_lightning.model.encoders import WhisperAudioEncoder
from aero_lightning.model.liger import apply_liger, liger_available, liger_options, linear_cross_entropy_sum
from aero_lightning.model.projector import PROJECTORS, Projector, projector_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioTokenCounter:
    """Number of LLM audio tokens for a clip, as a pure function of its length (picklable for data workers).

    ``num_samples`` -> 30 s windows -> ``ceil(n / 160)`` log-mel frames -> encoder ``ceil(T / encoder_downsample)``
    frames -> projector ``ceil(S / projector_downsample)`` tokens, summed over windows.

    Attributes:
        encoder_downsample: encoder frames per log-mel frame (2 for Whisper's strided conv).
        projector_downsample: encoder frames per LLM token (2 for Aero's avg-pool, k for frame stacking).
        window_samples: samples per window (480 000 = 30 s at 16 kHz).
        hop_length: samples per log-mel frame (160).
    """

    encoder_downsample: int = 2
    projector_downsample: int = 2
    window_samples: int = WINDOW_SAMPLES
    hop_length: int = HOP_LENGTH

    def window_lengths(self, num_samples: int) -> list[int]:
        """Samples in each 30 s window of a clip of ``num_samples`` samples (last window may be short)."""
        if num_samples <= 0:
            raise ValueError(f"audio must have at least one sample, got {num_samples}")
        full, rest = divmod(int(num_samples), self.window_samples)
        return [self.window_samples] * full + ([rest] if rest else [])

    def tokens_per_window(self, window_samples: int) -> int:
        frames = -(-window_samples // self.hop_length)
        enc = -(-frames // self.encoder_downsample)
        return -(-enc // self.projector_downsample)

    def __call__(self, num_samples: int) -> int:
        """Audio tokens for a clip of ``num_samples`` samples at 16 kHz."""
        return sum(self.tokens_per_window(w) for w in self.window_lengths(num_samples))


@dataclass
class AeroOutput:
    """Forward result.

    Attributes:
        logits: ``(B, L, V)``.
        loss_sum: summed token cross-entropy over target tokens (scalar), or None without labels.
        num_target_tokens: number of target tokens (scalar long), or None.
        ctc_loss: auxiliary CTC loss per target token (scalar), when the model's ``ctc_weight > 0`` and the CTC
            head or the encoder is trainable (with both frozen the term has no gradient and is not computed).
    """

    logits: torch.Tensor
    loss_sum: torch.Tensor | None = None
    num_target_tokens: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor | None:
        """Mean token loss of this batch (``loss_sum / num_target_tokens``)."""
        if self.loss_sum is None:
            return None
        return self.loss_sum / self.num_target_tokens.clamp_min(1)


def ensure_audio_tokens(tokenizer, llm: PreTrainedModel) -> None:
    """Add the audio special tokens to ``tokenizer`` if missing, and grow the LLM's embeddings to fit.

    Qwen2.5's tokenizer has no audio tokens (Qwen2-Audio's has); its embedding matrix is padded to 151 936 rows, so
    the new ids usually fit without resizing.
    """
    missing = [
        t
        for t in AUDIO_SPECIAL_TOKENS
        if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
    ]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
        logger.info("added audio special tokens %s to the tokenizer", missing)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))


def check_architecture(name: str, config, expect: dict | None) -> None:
    """Check a loaded component's config against the architecture the experiment config states.

    Raises:
        ValueError: listing every mismatching field, e.g. a Whisper-small checkpoint under an experiment that
            expects Whisper-large-v3's ``d_model: 1280``.
    """
    wrong = {
        k: (v, getattr(config, k, None)) for k, v in (expect or {}).items() if getattr(config, k, None) != v
    }
    if wrong:
        detail = ", ".join(f"{k}: expected {v[0]}, checkpoint has {v[1]}" for k, v in wrong.items())
        raise ValueError(f"model.{name} checkpoint does not match model.{name}.expect ({detail})")


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing: the reentrant variant gives no gradients when the checkpointed
    layer's inputs do not require grad (frozen first layers; transformers issues 21381, 23170)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _match_parameters(
    patterns: Sequence[str], named: Iterable[tuple[str, nn.Parameter]]
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The parameters whose name matches any regex in ``patterns``, and the patterns that matched none."""
    compiled = [re.compile(p) for p in patterns]
    hits = dict.fromkeys(patterns, 0)
    found = {}
    for name, param in named:
        matched = [p.pattern for p in compiled if p.search(name)]
        for pattern in matched:
            hits[pattern] += 1
        if matched:
            found[name] = param
    return found, [p for p, n in hits.items() if n == 0]


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, value)


class AeroModel(nn.Module):
    """Encoder -> projector -> causal LM.

    Args:
        encoder: audio encoder adapter (:class:`WhisperAudioEncoder`).
        projector: a :class:`Projector` from encoder width to the LLM hidden size.
        llm: HF causal LM.
        tokenizer: the LLM's tokenizer, with a chat template and the audio special tokens.
        freeze: regexes over parameter names (``"^encoder\\."``, ``"^llm\\."``); matching parameters get
            ``requires_grad=False`` and fully frozen top-level components stay in eval mode.
        gradient_checkpointing: non-reentrant activation checkpointing in encoder and LLM layers.
        end_of_turn_token: the chat template's end-of-turn token (trained, and stops generation).
        ctc_weight: weight of an auxiliary CTC loss (Graves et al. 2006) from a linear head on the encoder frames
            (50 Hz) to the assistant reply tokens, blank = the pad token: hybrid CTC/attention training
            (Watanabe et al. 2017, https://doi.org/10.1109/JSTSP.2017.2763455). It lets an encoder trained from
            scratch (the CPU demo) learn the acoustics in minutes; meant for ASR data. 0 (the default, and Aero's
            recipe) disables it and builds no head.
        liger: Liger kernels on the LLM (GPU, extra ``gpu``): ``true``/``false`` or ``{enabled, rope, rms_norm,
            swiglu, fused_linear_cross_entropy}`` (:mod:`aero_lightning.model.liger`); unavailable kernels fall back
            to PyTorch with a warning.
        loss_chunk_tokens: target positions projected to the vocabulary at once by the loss (no full logits).
        ctc_only: encoder CTC pre-training: the LLM is not run, the loss is the CTC loss alone (``loss_sum`` = CTC
            per target token x target tokens, so the training loop and validation loss are unchanged), and
            projector and LLM are frozen. A later run starts from the encoder with ``init_from``. Needs
            ``ctc_weight > 0``.

    Raises:
        ValueError: ``ctc_only`` with ``ctc_weight == 0``.
    """

    def __init__(
        self,
        encoder: WhisperAudioEncoder,
        projector: Projector,
        llm: PreTrainedModel,
        tokenizer,
        freeze: Sequence[str] = (),
        gradient_checkpointing: bool = False,
        end_of_turn_token: str = "<|im_end|>",
        ctc_weight: float = 0.0,
        liger: Mapping | bool | None = None,
        loss_chunk_tokens: int = 4096,
        ctc_only: bool = False,
    ):
        super().__init__()
        if ctc_only and ctc_weight <= 0:
            raise ValueError(
                "model.ctc_only=true trains the CTC head alone: set model.ctc_weight > 0 (e.g. 1.0)"
            )
        self.ctc_only = bool(ctc_only)
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        ensure_audio_tokens(tokenizer, llm)
        self.ctc_weight = float(ctc_weight)
        if self.ctc_weight > 0:  # sized after ensure_audio_tokens may have grown the vocabulary
            self.ctc_head = nn.Linear(encoder.hidden_size, llm.get_output_embeddings().weight.shape[0])
        self.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        self.end_of_turn_token = end_of_turn_token
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn_token)
        self.feature_extractor = LogMelSpectrogram(num_mel_bins=encoder.num_mel_bins)
        self.freeze_patterns = list(freeze)
        if self.ctc_only:  # nothing reaches them: frozen, so DDP sees no unused trainable parameters
            self.freeze_patterns += [p for p in (r"^projector\.", r"^llm\.") if p not in self.freeze_patterns]
        self._frozen_components: list[str] = []
        # frozen by the components themselves (Whisper's sinusoid table): model.freeze / unfreeze never touch these
        self._fixed_parameters = {n for n, p in self.named_parameters() if not p.requires_grad}
        self.apply_freeze(self.freeze_patterns)
        if gradient_checkpointing:
            _enable_checkpointing(self.llm)
            _enable_checkpointing(self.encoder.encoder)
        self.liger = liger_options(liger)
        kernels = {k: v for k, v in self.liger.items() if k != "fused_linear_cross_entropy"}
        if any(kernels.values()) and not apply_liger(self.llm, **kernels):
            self.liger = dict.fromkeys(self.liger, False)
        self.liger["fused_linear_cross_entropy"] = (
            self.liger["fused_linear_cross_entropy"] and liger_available()
        )
        self.loss_chunk_tokens = int(loss_chunk_tokens)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(
        cls,
        encoder: dict,
        llm: dict,
        projector: Callable[..., Projector],
        freeze: Sequence[str] = (),
        gradient_checkpointing: bool = False,
        end_of_turn_token: str = "<|im_end|>",
        ctc_weight: float = 0.0,
        attn_implementation: str | None = None,
        liger: Mapping | bool | None = None,
        loss_chunk_tokens: int = 4096,
        ctc_only: bool = False,
        init_from: Mapping | None = None,
    ) -> AeroModel:
        """Load encoder and LLM with ``from_pretrained`` (hub id or local folder) and build a fresh projector.

        Args:
            encoder: ``{"name_or_path", "padding_free", "attn_implementation", "torch_dtype"}``.
            llm: ``{"name_or_path", "attn_implementation", "torch_dtype", "tokenizer"}`` (``tokenizer`` defaults to
                ``name_or_path``).
            projector: a callable ``projector(encoder_dim=..., llm_dim=...)`` (a Hydra ``_partial_`` config).
            freeze, gradient_checkpointing, end_of_turn_token, ctc_weight, liger, loss_chunk_tokens, ctc_only: see
                the class.
            init_from: ``{"ckpt": PATH, "include": [regex, ...]}``: then copy the matching weights from an earlier
                run (:meth:`load_weights_from`), e.g. the encoder of a ``ctc_only`` pre-training run.
            attn_implementation: attention backend of both encoder and LLM (``varlen``, ``flash_attention_2``,
                ``sdpa``, ``eager``; see :mod:`aero_lightning.model.attention`); None keeps each component's own
                ``attn_implementation`` (default ``sdpa``).

        Raises:
            OSError: from transformers when a hub id or folder cannot be loaded.
        """
        enc = WhisperAudioEncoder.from_pretrained(
            encoder["name_or_path"],
            padding_free=encoder.get("padding_free", True),
            attn_implementation=attn_implementation or encoder.get("attn_implementation", "sdpa"),
            torch_dtype=encoder.get("torch_dtype"),
        )
        llm_kwargs = {"attn_implementation": attn_implementation or llm.get("attn_implementation", "sdpa")}
        if llm.get("torch_dtype") is not None:
            llm_kwargs["dtype"] = _dtype(llm["torch_dtype"])
        lm = AutoModelForCausalLM.from_pretrained(llm["name_or_path"], **llm_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(llm.get("tokenizer") or llm["name_or_path"])
        check_architecture("encoder", enc.config, encoder.get("expect"))
        check_architecture("llm", lm.config, llm.get("expect"))
        proj = projector(encoder_dim=enc.hidden_size, llm_dim=lm.config.hidden_size)
        model = cls(
            enc,
            proj,
            lm,
            tokenizer,
            freeze,
            gradient_checkpointing,
            end_of_turn_token,
            ctc_weight,
            liger=liger,
            loss_chunk_tokens=loss_chunk_tokens,
            ctc_only=ctc_only,
        )
        if init_from and init_from.get("ckpt"):
            model.load_weights_from(init_from["ckpt"], init_from.get("include") or [r"^encoder\."])
        return model

    def load_weights_from(self, ckpt: str | Path, include: Sequence[str]) -> list[str]:
        """Copy the weights whose names match any regex in ``include`` from an earlier training run.

        Args:
            ckpt: a Lightning ``.ckpt`` of :class:`~aero_lightning.lit_module.AeroLitModule` or its run folder
                (``checkpoints/last.ckpt``).
            include: regexes over this model's parameter and buffer names (``"^encoder\\."``, ``"^ctc_head\\."``).

        Returns:
            The names copied.

        Raises:
            FileNotFoundError: if ``ckpt`` does not exist.
            ValueError: if a pattern matches no weight of the checkpoint, or a matching weight's shape differs.
        """
        from aero_lightning.model.loading import lightning_model_weights, resolve_checkpoint  # imports us

        path = resolve_checkpoint(ckpt)
        if path.is_dir():
            raise ValueError(
                f"init_from needs a Lightning checkpoint of a training run, got the folder {path}"
            )
        source, _ = lightning_model_weights(path)
        own = self.state_dict()
        patterns = [re.compile(p) for p in include]
        picked = {k: v for k, v in source.items() if k in own and any(p.search(k) for p in patterns)}
        for p in patterns:
            if not any(p.search(k) for k in picked):
                raise ValueError(f"init_from: {p.pattern!r} matches no weight of {path}")
        wrong = [k for k, v in picked.items() if v.shape != own[k].shape]
        if wrong:
            raise ValueError(
                f"init_from: shapes differ for {wrong[:4]}: {path} was trained with another architecture"
            )
        self.load_state_dict(picked, strict=False)
        logger.info("init_from %s: copied %d tensors matching %s", path, len(picked), list(include))
        return sorted(picked)

    def apply_freeze(self, patterns: Sequence[str]) -> None:
        """Set ``requires_grad=False`` on parameters whose name matches any regex in ``patterns``.

        Raises:
            ValueError: if a pattern matches no parameter (a typo would silently train everything).
        """
        found, unused = _match_parameters(patterns, self.named_parameters())
        if unused:
            raise ValueError(
                f"freeze patterns {unused} match no parameter; names look like 'encoder.encoder.conv1.weight'"
            )
        for param in found.values():
            param.requires_grad_(False)
        self._update_frozen_components()

    def unfreezable_parameters(self, patterns: Sequence[str]) -> dict[str, nn.Parameter]:
        """The frozen parameters that :meth:`unfreeze` with ``patterns`` would make trainable, by name.

        Parameters that a component fixes itself (Whisper's sinusoid position table) are never included.

        Raises:
            ValueError: if a pattern matches no such parameter.
        """
        frozen = (
            (name, param)
            for name, param in self.named_parameters()
            if not param.requires_grad and name not in self._fixed_parameters
        )
        found, unused = _match_parameters(patterns, frozen)
        if unused:
            raise ValueError(f"unfreeze patterns {unused} match no frozen parameter (frozen by model.freeze)")
        return found

    def unfreeze(self, patterns: Sequence[str]) -> list[str]:
        """Set ``requires_grad=True`` on the frozen parameters whose name matches any regex in ``patterns``.

        The inverse of :meth:`apply_freeze`, for a schedule that trains a part only after some steps
        (``module.unfreeze`` in :class:`~aero_lightning.lit_module.AeroLitModule`). Parameters that a component
        fixes itself (Whisper's sinusoid position table) stay frozen. Components that become trainable leave eval
        mode if the model is in training mode.

        Returns:
            The names of the parameters made trainable, sorted.

        Raises:
            ValueError: if a pattern matches no frozen parameter.
        """
        found = self.unfreezable_parameters(patterns)
        for param in found.values():
            param.requires_grad_(True)
        self._update_frozen_components()
        return sorted(found)

    def _update_frozen_components(self) -> None:
        self._frozen_components = [
            name
            for name, module in (("encoder", self.encoder), ("projector", self.projector), ("llm", self.llm))
            if all(not p.requires_grad for p in module.parameters())
        ]
        self.train(self.training)

    def train(self, mode: bool = True) -> AeroModel:
        """Like ``nn.Module.train``, but fully frozen components stay in eval mode (no dropout)."""
        super().train(mode)
        for name in self._frozen_components:
            getattr(self, name).eval()
        return self

    # ------------------------------------------------------------------ audio
    def audio_token_counter(self) -> AudioTokenCounter:
        """The picklable function from clip length (samples) to LLM audio tokens for this model."""
        return AudioTokenCounter(encoder_downsample=2, projector_downsample=self.projector.downsample)

    def compute_features(self, audio_windows: torch.Tensor, window_lengths: torch.Tensor):
        """Log-mel of 30 s windows on the model's device.

        Args:
            audio_windows: ``(W, N)`` float waveforms at 16 kHz, N <= 480 000 samples.
            window_lengths: ``(W,)`` valid samples per window.

        Returns:
            ``input_features (W, num_mel_bins, T)`` and ``feature_lengths (W,)``.
        """
        return self.feature_extractor(audio_windows, window_lengths)

    def embed_audio(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Encode and project windows; return the valid embeddings of all windows concatenated in order.

        Args:
            input_features: ``(W, num_mel_bins, T)`` log-mel windows.
            feature_lengths: ``(W,)`` valid frames.

        Returns:
            ``(N_audio, D_llm)`` embeddings, ``N_audio = sum over windows of projected lengths``.
        """
        return self._encode(input_features, feature_lengths)[0]

    def _encode(self, input_features, feature_lengths):
        hidden, enc_lengths = self.encoder(input_features, feature_lengths)  # (W, S, D_enc)
        projected, proj_lengths = self.projector(hidden, enc_lengths)  # (W, S', D_llm)
        valid = torch.arange(projected.shape[1], device=projected.device)[None, :] < proj_lengths[:, None]
        return projected[valid], (
            hidden,
            enc_lengths,
            proj_lengths,
        )  # (N_audio, D_llm), row-major = window order

    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None,
        feature_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """LLM input embeddings with projected audio scattered into the ``<|AUDIO|>`` slots.

        Args:
            input_ids: ``(B, L)``.
            input_features, feature_lengths: see :meth:`embed_audio`; None for text-only batches.

        Returns:
            ``(B, L, D_llm)``.

        Raises:
            ValueError: if the number of ``<|AUDIO|>`` slots differs from the number of audio embeddings.
        """
        return self._inputs_embeds_and_audio(input_ids, input_features, feature_lengths)[0]

    def _inputs_embeds_and_audio(self, input_ids, input_features, feature_lengths):
        embed = self.llm.get_input_embeddings()
        slots = input_ids == self.audio_token_id  # (B, L)
        inputs_embeds = embed(input_ids)  # (B, L, D)
        num_slots = int(slots.sum())
        if input_features is None:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} <|AUDIO|> slots but no audio was given")
            return inputs_embeds, None
        audio, encoded = self._encode(input_features, feature_lengths)
        audio = audio.to(inputs_embeds.dtype)  # (N, D)
        if audio.shape[0] != num_slots:
            raise ValueError(
                f"audio/slot count mismatch: {audio.shape[0]} audio embeddings for {num_slots} <|AUDIO|> slots in "
                "input_ids; the prompt must be built with this model's audio_token_counter()"
            )
        return inputs_embeds.masked_scatter(slots[..., None], audio), encoded

    def _ctc_loss(
        self, encoded, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CTC between each document's encoder frames and its reply tokens (the -100-free labels minus the
        end-of-turn token); summed over documents, divided by the number of target tokens. Documents are the rows
        of a padded batch, or the ``cu_seqlens`` segments of a packed row."""
        if cu_seqlens is not None:
            bounds = cu_seqlens.tolist()
            docs = [(input_ids[0, a:b], labels[0, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            docs = list(zip(input_ids, labels))
        hidden, enc_lengths, proj_lengths = encoded
        # windows are in document order: walk them until each document's <|AUDIO|> slot count is reached
        slots = [int((ids == self.audio_token_id).sum()) for ids, _ in docs]
        proj = proj_lengths.tolist()
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < enc_lengths[:, None]
        log_probs = self.ctc_head(hidden).float().log_softmax(-1)  # (W, S, V)
        rows, targets, w = [], [], 0
        for b, n_slots in enumerate(slots):
            start, acc = w, 0
            while acc < n_slots:
                acc += proj[w]
                w += 1
            lab = docs[b][1]
            target = lab[self._ctc_targets(lab)]
            if n_slots and len(target):
                rows.append(log_probs[start:w][valid[start:w]])  # (frames_b, V)
                targets.append(target.to(hidden.device))
        if not rows:
            return hidden.sum() * 0.0
        target_lengths = torch.tensor([len(t) for t in targets], device=hidden.device)
        loss = nn.functional.ctc_loss(
            nn.utils.rnn.pad_sequence(rows),  # (T_max, B', V)
            torch.cat(targets),
            torch.tensor([len(r) for r in rows], device=hidden.device),
            target_lengths,
            blank=self.tokenizer.pad_token_id,
            reduction="sum",
            zero_infinity=True,
        )
        return loss / target_lengths.sum()

    def _ctc_reaches_a_trainable_weight(self) -> bool:
        # with the encoder and the head frozen (the first phase of module.unfreeze) the CTC term has no gradient:
        # skipping it saves the CTC forward, about a tenth of a demo step on CPU
        return self.ctc_head.weight.requires_grad or "encoder" not in self._frozen_components

    def _ctc_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Mask of the CTC targets in ``labels``: the reply tokens without the end-of-turn token."""
        return (labels != IGNORE_INDEX) & (labels != self.end_of_turn_id)

    # ------------------------------------------------------------------ LM
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> AeroOutput:
        """Teacher-forced forward pass, on a padded batch or on one packed row of documents.

        Args:
            input_ids: ``(B, L)`` token ids with ``<|AUDIO|>`` slots; for a packed batch ``(1, L)`` documents
                back to back.
            attention_mask: ``(B, L)`` 1 for real tokens, 0 for padding; None for a packed batch.
            input_features: ``(W, num_mel_bins, T)`` log-mel windows of the batch's audio, in slot order.
            feature_lengths: ``(W,)`` valid frames per window.
            labels: ``(B, L)`` target ids, -100 where no loss is taken (unshifted: position t is predicted from
                positions < t).
            position_ids: ``(B, L)`` optional explicit positions; for a packed batch they restart at 0 in every
                document, which confines attention to the document (transformers builds the per-document mask
                from them when ``attention_mask`` is None and ``use_cache=False``).
            cu_seqlens: ``(D+1,)`` document boundaries of a packed row (attention kernels and the CTC head).
            return_logits: False (training) computes the loss from the final hidden states without full
                ``(B, L, V)`` logits (:func:`~aero_lightning.model.liger.linear_cross_entropy_sum`); ``logits`` is
                then None.

        Returns:
            :class:`AeroOutput` with the summed loss and the target-token count, so callers can normalise over a
            whole global batch.
        """
        inputs_embeds, encoded = self._inputs_embeds_and_audio(input_ids, input_features, feature_lengths)
        if self.ctc_only and labels is not None and encoded is not None:
            ctc = self._ctc_loss(encoded, input_ids, labels, cu_seqlens)
            n = self._ctc_targets(labels).sum()
            return AeroOutput(logits=None, loss_sum=ctc * n, num_target_tokens=n)
        packed = packed_attention_kwargs(cu_seqlens) if cu_seqlens is not None else {}
        kwargs = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
            **packed,
        }
        if labels is not None and not return_logits:
            hidden = self.llm.base_model(**kwargs).last_hidden_state  # (B, L, D)
            logits = None
            loss_sum, num_targets = linear_cross_entropy_sum(
                hidden[:, :-1],
                self.llm.get_output_embeddings().weight,
                labels[:, 1:],
                chunk_tokens=self.loss_chunk_tokens,
                use_liger=self.liger["fused_linear_cross_entropy"],
            )
        else:
            logits = self.llm(**kwargs).logits  # (B, L, V)
            if labels is None:
                return AeroOutput(logits=logits)
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss_sum = nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            num_targets = (shift_labels != IGNORE_INDEX).sum()
        ctc = None
        if self.ctc_weight > 0 and encoded is not None and self._ctc_reaches_a_trainable_weight():
            ctc = self._ctc_loss(encoded, input_ids, labels, cu_seqlens)
        return AeroOutput(logits=logits, loss_sum=loss_sum, num_target_tokens=num_targets, ctc_loss=ctc)

    def forward_batch(self, batch: Mapping, return_logits: bool = False) -> AeroOutput:
        """Log-mel + :meth:`forward` on a collated batch (padded or packed, see :mod:`aero_lightning.data.packing`).

        Args:
            batch: ``input_ids``, ``labels``, ``audio_windows``, ``window_lengths`` and ``attention_mask`` (padded)
                or ``position_ids`` + ``cu_seqlens`` (packed), already on the model's device.
            return_logits: see :meth:`forward` (False: loss only, no full logits).

        Returns:
            :class:`AeroOutput`.
        """
        feats, feat_lengths = self.compute_features(batch["audio_windows"], batch["window_lengths"])
        return self(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),  # absent for packed batches
            input_features=feats,
            feature_lengths=feat_lengths,
            labels=batch.get("labels"),
            position_ids=batch.get("position_ids"),
            cu_seqlens=batch.get("cu_seqlens"),
            return_logits=return_logits,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Decode replies for left-padded prompts (built with ``add_generation_prompt=True``).

        Args:
            input_ids: ``(B, L)`` left-padded prompt ids.
            attention_mask: ``(B, L)``.
            input_features, feature_lengths: audio windows, as in :meth:`forward`.
            max_new_tokens: generation budget per sample.
            num_beams: 1 for greedy decoding.

        Returns:
            ``(B, T_new)`` generated ids (prompt excluded), padded with the pad token.
        """
        inputs_embeds = self.build_inputs_embeds(input_ids, input_features, feature_lengths)
        tok = self.tokenizer
        eos = [i for i in {self.end_of_turn_id, tok.eos_token_id} if i is not None]
        return self.llm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
            **generate_kwargs,
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write ``encoder/``, ``llm/`` (with tokenizer), ``projector.safetensors`` and ``aero_config.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.encoder.save_pretrained(out / "encoder")
        self.llm.save_pretrained(out / "llm")
        self.tokenizer.save_pretrained(out / "llm")
        save_file(
            {k: v.contiguous() for k, v in self.projector.state_dict().items()},
            str(out / "projector.safetensors"),
        )
        config = {
            "projector": projector_spec(self.projector),
            "padding_free": self.encoder.padding_free,
            "end_of_turn_token": self.end_of_turn_token,
        }
        (out / "aero_config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, attn_implementation: str = "sdpa") -> AeroModel:
        """Load a folder written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: if ``aero_config.json`` is missing.
        """
        path = Path(path)
        cfg_file = path / "aero_config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(
                f"{cfg_file} not found: {path} is not a folder written by AeroModel.save_pretrained"
            )
        cfg = json.loads(cfg_file.read_text())
        proj_cfg = dict(cfg["projector"])
        proj_cls = PROJECTORS[proj_cfg.pop("type")]

        def projector(encoder_dim: int, llm_dim: int) -> Projector:
            return proj_cls(encoder_dim=encoder_dim, llm_dim=llm_dim, **proj_cfg)

        model = cls.from_components(
            encoder={
                "name_or_path": str(path / "encoder"),
                "padding_free": cfg["padding_free"],
                "attn_implementation": attn_implementation,
            },
            llm={"name_or_path": str(path / "llm"), "attn_implementation": attn_implementation},
            projector=projector,
            end_of_turn_token=cfg.get("end_of_turn_token", "<|im_end|>"),
        )
        model.projector.load_state_dict(load_file(str(path / "projector.safetensors")))
        return model
