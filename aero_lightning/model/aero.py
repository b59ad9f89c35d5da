"""AeroModel: audio encoder -> projector -> causal LLM.

Audio is cut into 30 s windows, encoded (padding-free by default), projected per window, and the projected
embeddings of all windows of all samples, in order, fill the ``<|AUDIO|>`` slots of the LLM's input embeddings
(:func:`~aero_lightning.model.splice.splice_audio`). The LLM is any HF ``AutoModelForCausalLM`` (Qwen2.5 in the
Aero recipe). :mod:`aero_lightning.model.build` loads the components and builds this class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.chat import AUDIO_TOKEN, IGNORE_INDEX, transcript_documents
from aero_lightning.data.features import pcm_windows
from aero_lightning.model.attention import packed_attention_kwargs
from aero_lightning.model.ctc import ctc_loss_sum
from aero_lightning.model.freeze import enable_activation_checkpointing, frozen_components
from aero_lightning.model.freeze import freeze as freeze_parameters
from aero_lightning.model.liger import apply_liger, liger_available, liger_options, linear_cross_entropy_sum
from aero_lightning.model.lora import apply_lora, base_weight_names, lora_options
from aero_lightning.model.projector import Projector
from aero_lightning.model.splice import splice_audio

COMPONENTS = ("encoder", "projector", "llm")


@dataclass
class AeroOutput:
    """Forward result: summed losses with their target counts, so callers normalise over a whole global batch.

    Attributes:
        logits: ``(B, L, V)``, or None when the loss was computed without full logits.
        loss_sum: summed LM cross-entropy over the target tokens (float32 scalar); None without labels and in
            ``ctc_only`` mode.
        num_target_tokens: LM target tokens (long scalar).
        ctc_loss_sum: summed CTC negative log-likelihood over documents (:func:`~aero_lightning.model.ctc.ctc_loss_sum`),
            when the model's ``ctc_weight > 0`` and a trainable weight gets its gradient, or in ``ctc_only`` mode.
        ctc_target_tokens: CTC target tokens (long scalar).
        target_losses: ``(N_t,)`` detached LM loss of each target position (``labels[:, 1:] != -100``, row-major),
            for per-task and per-corpus logging; None when not computed (full logits, Liger's fused loss).
    """

    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_target_tokens: torch.Tensor | None = None
    ctc_loss_sum: torch.Tensor | None = None
    ctc_target_tokens: torch.Tensor | None = None
    target_losses: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor | None:
        """Mean LM token loss of this batch (``loss_sum / num_target_tokens``)."""
        return None if self.loss_sum is None else self.loss_sum / self.num_target_tokens.clamp_min(1)

    @property
    def ctc_loss(self) -> torch.Tensor | None:
        """Mean CTC loss per target token of this batch; 0 for a batch without CTC targets (no transcript)."""
        if self.ctc_loss_sum is None:
            return None
        return self.ctc_loss_sum / self.ctc_target_tokens.clamp_min(1)


@dataclass
class EncodedAudio:
    """Encoder and projector outputs of a batch of windows.

    Attributes:
        audio_embeds: ``(N, D_llm)`` projected audio of every window, concatenated in window order.
        hidden: ``(W, S, D_enc)`` encoder frames, valid up to ``frame_lengths``.
        frame_lengths: ``(W,)`` valid encoder frames per window.
        tokens_per_window: ``(W,)`` projected tokens per window.
    """

    audio_embeds: torch.Tensor
    hidden: torch.Tensor
    frame_lengths: torch.Tensor
    tokens_per_window: torch.Tensor


class AeroModel(nn.Module):
    """Encoder -> projector -> causal LM.

    Args:
        encoder: audio encoder adapter (:class:`~aero_lightning.model.encoders.WhisperAudioEncoder` or
            :class:`~aero_lightning.model.ssl_encoders.SSLAudioEncoder`); it supplies its own feature extractor.
        projector: a :class:`Projector` from encoder width to the LLM hidden size.
        llm: HF causal LM.
        tokenizer: the LLM's tokenizer, with a chat template and the audio special tokens
            (:func:`~aero_lightning.model.build.ensure_audio_tokens`).
        freeze: regexes over parameter names (``"^encoder\\."``, ``"^llm\\."``); matching parameters get
            ``requires_grad=False`` and fully frozen components stay in eval mode.
        gradient_checkpointing: non-reentrant activation checkpointing in encoder and LLM layers.
        end_of_turn_token: the chat template's end-of-turn token (trained, and stops generation).
        ctc_weight: weight of an auxiliary CTC loss from a linear head on the encoder frames to the reply tokens,
            blank = the pad token (:mod:`aero_lightning.model.ctc`). 0 (the default, and Aero's recipe) builds no
            head.
        liger: Liger kernels on the LLM (GPU, extra ``gpu``): ``true``/``false`` or ``{enabled, rope, rms_norm,
            swiglu, fused_linear_cross_entropy}`` (:mod:`aero_lightning.model.liger`); unavailable kernels fall back
            to PyTorch with a warning.
        loss_chunk_tokens: target positions projected to the vocabulary at once by the loss (no full logits).
        ctc_only: encoder CTC pre-training: the LLM is not run, the CTC term is the whole loss, and projector and
            LLM are frozen. A later run starts from the encoder with ``init_from``. Needs ``ctc_weight > 0``.
        lora: LoRA adapters (``model.lora``: ``{target_modules, r, alpha, dropout}``,
            :func:`~aero_lightning.model.lora.lora_options`), added after ``freeze``
            (:func:`~aero_lightning.model.lora.apply_lora`): the adapters train, the wrapped layers' base weights
            stay frozen for good (they join :attr:`fixed_parameters`), every other parameter keeps what ``freeze``
            decided. None (or ``target_modules: null``) adds none.

    Attributes:
        fixed_parameters: names of parameters that ``freeze`` / ``module.unfreeze`` never touch: frozen by a
            component itself (Whisper's sinusoid table) or the base weights of LoRA-wrapped layers.
        lora: the validated LoRA options, None without adapters.
        lora_layers: names of the LoRA-wrapped layers.

    Raises:
        ValueError: ``ctc_only`` with ``ctc_weight == 0``, or a tokenizer without ``<|AUDIO|>``; ``ctc_only`` with
            LoRA adapters outside the encoder (they would get no gradient).
        UserValueError: for a bad ``lora`` (see :func:`~aero_lightning.model.lora.lora_options` and
            :func:`~aero_lightning.model.lora.apply_lora`).
    """

    def __init__(
        self,
        encoder: nn.Module,
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
        lora: Mapping | None = None,
    ):
        super().__init__()
        if ctc_only and ctc_weight <= 0:
            raise ValueError(
                "model.ctc_only=true trains the CTC head alone: set model.ctc_weight > 0 (e.g. 1.0)"
            )
        self.encoder, self.projector, self.llm, self.tokenizer = encoder, projector, llm, tokenizer
        self.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        if self.audio_token_id in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {AUDIO_TOKEN}: add it with build.ensure_audio_tokens")
        self.end_of_turn_token = end_of_turn_token
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn_token)
        self.ctc_only = bool(ctc_only)
        self.ctc_weight = float(ctc_weight)
        if self.ctc_weight > 0:
            self.ctc_head = nn.Linear(encoder.hidden_size, llm.get_output_embeddings().weight.shape[0])
        self.feature_extractor = encoder.build_feature_extractor()  # log-mel, or waveforms as they are
        self.freeze_patterns = list(freeze)
        if self.ctc_only:  # nothing reaches them: frozen, so DDP sees no unused trainable parameters
            self.freeze_patterns += [p for p in (r"^projector\.", r"^llm\.") if p not in self.freeze_patterns]
        # frozen by the components themselves (Whisper's sinusoid table): model.freeze / unfreeze never touch these
        self.fixed_parameters = {n for n, p in self.named_parameters() if not p.requires_grad}
        if self.freeze_patterns:
            freeze_parameters(self, self.freeze_patterns)
        self.lora = lora_options(lora)
        self.lora_layers = self._add_lora() if self.lora else []
        self.refresh_frozen_components()
        if gradient_checkpointing:
            enable_activation_checkpointing(self.llm)
            enable_activation_checkpointing(self.encoder.encoder)
        self.liger = liger_options(liger)
        kernels = {k: v for k, v in self.liger.items() if k != "fused_linear_cross_entropy"}
        if any(kernels.values()) and not apply_liger(self.llm, **kernels):
            self.liger = dict.fromkeys(self.liger, False)
        self.liger["fused_linear_cross_entropy"] &= liger_available()
        self.loss_chunk_tokens = int(loss_chunk_tokens)

    def _add_lora(self) -> list[str]:
        """Wrap the ``lora.target_modules`` layers (:func:`~aero_lightning.model.lora.apply_lora`); the base weights
        of the wrapped layers join :attr:`fixed_parameters`, under their new names."""
        fixed = {id(p) for n, p in self.named_parameters() if n in self.fixed_parameters}
        layers = apply_lora(self, self.lora)
        if self.ctc_only:
            outside = [n for n in layers if not n.startswith("encoder.")]
            if outside:
                raise ValueError(
                    f"model.ctc_only trains the encoder alone, but model.lora adapts {outside[:2]}: their adapters "
                    "would get no gradient; use model/lora=none or target encoder layers only"
                )
        kept = {n for n, p in self.named_parameters() if id(p) in fixed}
        self.fixed_parameters = kept | base_weight_names(self)
        return layers

    def refresh_frozen_components(self) -> None:
        """Record which components are fully frozen (after a freeze or unfreeze) and set their train/eval mode."""
        self.frozen_components = frozen_components(self, COMPONENTS)
        self.train(self.training)

    def train(self, mode: bool = True) -> AeroModel:
        """Like ``nn.Module.train``, but fully frozen components stay in eval mode (no dropout)."""
        super().train(mode)
        for name in getattr(self, "frozen_components", ()):
            getattr(self, name).eval()
        return self

    def audio_token_counter(self) -> AudioTokenCounter:
        """The picklable function from clip length (samples) to LLM audio tokens for this model."""
        return AudioTokenCounter(projector_downsample=self.projector.downsample)

    # ------------------------------------------------------------------ audio
    def compute_features(self, audio_pcm: torch.Tensor, window_lengths: torch.Tensor):
        """Encoder input of 30 s windows on the model's device, computed in float32 (log-mel for Whisper, the
        waveform for SSL encoders).

        Args:
            audio_pcm: ``(S,)`` int16 16 kHz PCM of all windows back to back (the collated ``audio_pcm``), or
                ``(W, N)`` float waveforms, zero-padded.
            window_lengths: ``(W,)`` samples per window.

        Returns:
            ``input_features`` (``(W, num_mel_bins, T)`` log-mel or ``(W, N)`` waveforms) and their ``(W,)`` lengths.
        """
        windows = pcm_windows(audio_pcm, window_lengths) if audio_pcm.dim() == 1 else audio_pcm  # (W, N)
        return self.feature_extractor(windows, window_lengths)

    def encode_audio(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> EncodedAudio:
        """Encode and project windows (see :class:`EncodedAudio`)."""
        hidden, frame_lengths = self.encoder(input_features, feature_lengths)  # (W, S, D_enc), (W,)
        return self.project_audio(hidden, frame_lengths)

    def project_audio(self, hidden: torch.Tensor, frame_lengths: torch.Tensor) -> EncodedAudio:
        """Project encoder frames of windows (computed now, or read from an encoder cache).

        Args:
            hidden: ``(W, S, D_enc)`` encoder frames, valid up to ``frame_lengths`` (the rest is ignored).
            frame_lengths: ``(W,)`` valid frames per window.

        Returns:
            :class:`EncodedAudio`.
        """
        projected, tokens = self.projector(hidden, frame_lengths)  # (W, S', D_llm), (W,)
        valid = (
            torch.arange(projected.shape[1], device=projected.device)[None, :] < tokens[:, None]
        )  # (W, S')
        return EncodedAudio(projected[valid], hidden, frame_lengths, tokens)  # (N, D_llm) in window order

    def embed_audio(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor:
        """``(N_audio, D_llm)`` projected audio of all windows, concatenated in order."""
        return self.encode_audio(input_features, feature_lengths).audio_embeds

    def build_inputs_embeds(self, input_ids: torch.Tensor, encoded: EncodedAudio | None) -> torch.Tensor:
        """``(B, L, D_llm)`` LLM input embeddings of ``input_ids (B, L)`` with the audio in its slots.

        Raises:
            ValueError: on an audio/slot count mismatch, or slots without audio.
        """
        inputs_embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, D)
        if encoded is None:
            if bool((input_ids == self.audio_token_id).any()):
                raise ValueError("input_ids hold <|AUDIO|> slots but no audio was given")
            return inputs_embeds
        return splice_audio(inputs_embeds, input_ids, encoded.audio_embeds, self.audio_token_id)  # (B, L, D)

    def _ctc_applies(self) -> bool:
        # with the encoder and the head frozen (the first phase of module.unfreeze) the CTC term has no gradient:
        # skipping it saves the CTC forward, about a tenth of a demo step on CPU
        return self.ctc_only or (
            self.ctc_weight > 0
            and (self.ctc_head.weight.requires_grad or "encoder" not in self.frozen_components)
        )

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
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_frame_lengths: torch.Tensor | None = None,
        ctc_documents: Sequence[bool] | None = None,
    ) -> AeroOutput:
        """Teacher-forced forward pass, on a padded batch or on one packed row of documents.

        Args:
            input_ids: ``(B, L)`` token ids with ``<|AUDIO|>`` slots; for a packed batch ``(1, L)`` documents
                back to back.
            attention_mask: ``(B, L)`` 1 for real tokens, 0 for padding; None for a packed batch.
            input_features: ``(W, ...)`` encoder input of the batch's windows, in slot order
                (:meth:`compute_features`); None for text-only batches.
            feature_lengths: ``(W,)`` valid frames (or samples) per window.
            labels: ``(B, L)`` target ids, -100 where no loss is taken (unshifted: position t is predicted from
                positions < t).
            position_ids: ``(B, L)`` explicit positions; in a packed batch they restart at 0 in every document.
            cu_seqlens: ``(D+1,)`` document boundaries of a packed row (attention kernels and the CTC term).
            return_logits: False (training) computes the loss from the final hidden states without full
                ``(B, L, V)`` logits (:func:`~aero_lightning.model.liger.linear_cross_entropy_sum`).
            encoder_hidden_states: ``(W, S, D_enc)`` encoder frames of the batch's windows from an encoder cache
                (:mod:`aero_lightning.data.encoder_cache`), in place of ``input_features``: the encoder is not run.
            encoder_frame_lengths: ``(W,)`` valid frames per window of ``encoder_hidden_states``.
            ctc_documents: one bool per document: whether its reply is a CTC target (a transcript; see
                :func:`~aero_lightning.data.chat.transcript_documents`); None: every document with audio.

        Returns:
            :class:`AeroOutput`.

        Raises:
            ValueError: if both ``input_features`` and ``encoder_hidden_states`` are given.
        """
        if encoder_hidden_states is not None:
            if input_features is not None:
                raise ValueError("give input_features or cached encoder_hidden_states, not both")
            encoded = self.project_audio(encoder_hidden_states, encoder_frame_lengths)
        else:
            encoded = None if input_features is None else self.encode_audio(input_features, feature_lengths)
        inputs_embeds = self.build_inputs_embeds(input_ids, encoded)  # (B, L, D)
        out = AeroOutput()
        if not self.ctc_only:
            kwargs = {
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                "use_cache": False,  # transformers honours packed position_ids only without a cache
                **(packed_attention_kwargs(cu_seqlens) if cu_seqlens is not None else {}),
            }
            if labels is not None and not return_logits:
                hidden = self.llm.base_model(**kwargs).last_hidden_state  # (B, L, D)
                per_target: list = []
                out.loss_sum, out.num_target_tokens = linear_cross_entropy_sum(
                    hidden[:, :-1],  # (B, L-1, D) predicts labels[:, 1:]
                    self.llm.get_output_embeddings(),  # the module: ZeRO-3 gathers its weight in its hooks
                    labels[:, 1:],
                    chunk_tokens=self.loss_chunk_tokens,
                    use_liger=self.liger["fused_linear_cross_entropy"],
                    token_losses=per_target,
                )
                if per_target:
                    out.target_losses = torch.cat(per_target)  # (N_t,)
            else:
                out.logits = self.llm(**kwargs).logits  # (B, L, V)
                if labels is None:
                    return out
                shift_labels = labels[:, 1:].to(out.logits.device)  # (B, L-1)
                out.loss_sum = nn.functional.cross_entropy(
                    out.logits[:, :-1].float().flatten(0, 1),  # (B*(L-1), V)
                    shift_labels.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                out.num_target_tokens = (shift_labels != IGNORE_INDEX).sum()
        if labels is not None and encoded is not None and self._ctc_applies():
            out.ctc_loss_sum, out.ctc_target_tokens = ctc_loss_sum(
                self.ctc_head(encoded.hidden),  # (W, S, V)
                encoded.frame_lengths,
                encoded.tokens_per_window,
                input_ids,
                labels,
                self.audio_token_id,
                self.end_of_turn_id,
                blank_id=self.tokenizer.pad_token_id,
                cu_seqlens=cu_seqlens,
                documents=ctc_documents,
            )
        return out

    def forward_batch(self, batch: Mapping, return_logits: bool = False) -> AeroOutput:
        """Features + :meth:`forward` on a collated batch (padded or packed, see :mod:`aero_lightning.data.packing`).

        Args:
            batch: ``input_ids``, ``labels``, ``audio_pcm``, ``window_lengths`` and ``attention_mask`` (padded)
                or ``position_ids`` + ``cu_seqlens`` (packed), already on the model's device. A batch of cached
                encoder outputs (``data.encoder_cache``) holds ``encoder_states`` and ``encoder_frame_lengths``
                instead of ``audio_pcm``: no log-mel, no encoder.
            return_logits: see :meth:`forward` (False: loss only, no full logits).
        """
        features, lengths, hidden, frame_lengths = None, None, None, None
        if batch.get("encoder_states") is not None:
            hidden, frame_lengths = self.unpack_encoder_states(
                batch["encoder_states"], batch["encoder_frame_lengths"]
            )
        elif batch["window_lengths"].numel():  # a text-only batch has no audio
            features, lengths = self.compute_features(batch["audio_pcm"], batch["window_lengths"])
        return self(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),  # absent for packed batches
            input_features=features,
            feature_lengths=lengths,
            labels=batch.get("labels"),
            position_ids=batch.get("position_ids"),
            cu_seqlens=batch.get("cu_seqlens"),
            return_logits=return_logits,
            encoder_hidden_states=hidden,
            encoder_frame_lengths=frame_lengths,
            # only transcripts are CTC targets: a label, answer or caption is not what the audio says
            ctc_documents=transcript_documents(batch["tasks"]) if "tasks" in batch else None,
        )

    def unpack_encoder_states(
        self, states: torch.Tensor, frame_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached encoder frames of a batch as the encoder would have returned them.

        Args:
            states: ``(N, D_enc)`` valid frames of every window, back to back (the collated ``encoder_states``, in
                the cache's storage dtype).
            frame_lengths: ``(W,)`` frames per window, summing to ``N``.

        Returns:
            ``(W, S, D_enc)`` frames zero-padded to the longest window ``S``, in the projector's dtype, and
            ``(W,)`` lengths.

        Raises:
            ValueError: if the lengths do not add up to ``N`` or the width is not the encoder's.
        """
        lengths = frame_lengths.tolist()
        if sum(lengths) != states.shape[0] or states.shape[-1] != self.encoder.hidden_size:
            raise ValueError(
                f"encoder_states {tuple(states.shape)} do not hold {sum(lengths)} frames of width "
                f"{self.encoder.hidden_size}"
            )
        dtype = next(self.projector.parameters()).dtype
        hidden = nn.utils.rnn.pad_sequence(list(states.split(lengths)), batch_first=True)  # (W, S, D_enc)
        return hidden.to(dtype), frame_lengths

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
        encoded = None if input_features is None else self.encode_audio(input_features, feature_lengths)
        tok = self.tokenizer
        eos = [i for i in {self.end_of_turn_id, tok.eos_token_id} if i is not None]
        return self.llm.generate(
            inputs_embeds=self.build_inputs_embeds(input_ids, encoded),  # (B, L, D)
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
            **generate_kwargs,
        )
