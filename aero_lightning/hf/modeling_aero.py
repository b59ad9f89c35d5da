"""transformers model of an exported Aero audio LLM (copied into the export folder as remote code).

Audio encoder -> projector -> causal LM, with the projected audio scattered into the ``<|AUDIO|>`` slots of the LLM's
input embeddings, exactly as :class:`aero_lightning.model.aero.AeroModel` does at inference
(:func:`aero_lightning.model.splice.splice_audio`). The encoder is the one the model was trained with, chosen by
``config.encoder_config.model_type``: Whisper (padding-free 30 s windows of log-mel) or HuBERT / wav2vec 2.0 (30 s
windows of the normalised waveform). The encoder, projector, attention and chat modules are copies of
aero_lightning's own files (the exporter rewrites their ``aero_lightning`` imports into relative ones), so the
exported model computes what the trained one computes; the weights are one ``model.safetensors`` with AeroModel's
parameter names.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from aero_lightning.eval.repetition_guard import RepetitionGuard, repetition_guard_from
from aero_lightning.hf.configuration_aero import AeroConfig
from aero_lightning.model.encoders import PaddingFreeWhisperEncoder, WhisperAudioEncoder
from aero_lightning.model.projector import AvgPoolProjector, MLPStackProjector
from aero_lightning.model.splice import splice_audio
from aero_lightning.model.ssl_encoders import SSL_TYPES, SSLAudioEncoder


def build_projector(spec: dict, encoder_dim: int, llm_dim: int) -> nn.Module:
    """The projector of ``spec`` (``{"type": "mlp_stack" | "avgpool_linear", ...}``).

    Raises:
        ValueError: for an unknown projector type.
    """
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "mlp_stack":
        return MLPStackProjector(encoder_dim=encoder_dim, llm_dim=llm_dim, **spec)
    if kind == "avgpool_linear":
        return AvgPoolProjector(encoder_dim=encoder_dim, llm_dim=llm_dim, **spec)
    raise ValueError(f"unknown projector type {kind!r}; expected 'mlp_stack' or 'avgpool_linear'")


class AeroPreTrainedModel(PreTrainedModel):
    """Base class: config class, attention capabilities."""

    config_class = AeroConfig
    base_model_prefix = "aero"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = False
    _no_split_modules = [
        "WhisperEncoderLayer",
        "HubertEncoderLayer",
        "HubertEncoderLayerStableLayerNorm",
        "Wav2Vec2EncoderLayer",
        "Wav2Vec2EncoderLayerStableLayerNorm",
        "Qwen2DecoderLayer",
    ]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


def build_encoder(config: AeroConfig) -> nn.Module:
    """The audio encoder adapter for ``config.encoder_config`` (its ``model_type`` picks it).

    Whisper: :class:`WhisperAudioEncoder` with the export's ``padding_free``; HuBERT / wav2vec 2.0:
    :class:`SSLAudioEncoder` with ``normalize=False``, since the export's feature extractor hands it windows already
    normalised.

    Raises:
        ValueError: for another encoder architecture.
    """
    enc_config = config.encoder_config
    enc_config._attn_implementation = config.encoder_attn_implementation
    if enc_config.model_type == "whisper":
        return WhisperAudioEncoder(PaddingFreeWhisperEncoder(enc_config), padding_free=config.padding_free)
    if enc_config.model_type in SSL_TYPES:
        return SSLAudioEncoder(AutoModel.from_config(enc_config), normalize=False)
    raise ValueError(
        f"encoder_config.model_type is {enc_config.model_type!r}; expected 'whisper' or one of {SSL_TYPES}"
    )


class AeroForConditionalGeneration(AeroPreTrainedModel):
    """Audio LLM: ``encoder`` (Whisper, HuBERT or wav2vec 2.0 on 30 s windows) -> ``projector`` -> ``llm`` (causal
    LM).

    Args:
        config: :class:`AeroConfig`.
    """

    def __init__(self, config: AeroConfig):
        super().__init__(config)
        self.encoder = build_encoder(config)
        self.projector = build_projector(
            config.projector, self.encoder.hidden_size, config.text_config.hidden_size
        )
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        if getattr(config, "llm_generation_config", None):
            self.llm.generation_config = GenerationConfig.from_dict(dict(config.llm_generation_config))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None,
        feature_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """LLM input embeddings with the projected audio in the ``<|AUDIO|>`` slots.

        Args:
            input_ids: ``(B, L)`` prompt ids.
            input_features: the feature extractor's windows of all clips, in slot order: ``(W, num_mel_bins, T)``
                log-mel (Whisper) or ``(W, N)`` normalised waveforms (HuBERT, wav2vec 2.0).
            feature_lengths: ``(W,)`` valid log-mel frames or samples per window.

        Returns:
            ``(B, L, D_llm)``.

        Raises:
            ValueError: if the slot count differs from the number of audio embeddings.
        """
        inputs_embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, D)
        if input_features is None:
            if bool((input_ids == self.config.audio_token_id).any()):
                raise ValueError("input_ids hold <|AUDIO|> slots but no audio features were given")
            return inputs_embeds
        dtype = next(self.encoder.parameters()).dtype
        hidden, enc_lengths = self.encoder(input_features.to(dtype), feature_lengths)  # (W, S, D_enc)
        projected, proj_lengths = self.projector(hidden, enc_lengths)  # (W, S', D_llm)
        valid = torch.arange(projected.shape[1], device=projected.device)[None, :] < proj_lengths[:, None]
        audio = projected[valid]  # (N_audio, D_llm), window order
        return splice_audio(inputs_embeds, input_ids, audio, self.config.audio_token_id)  # (B, L, D)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Teacher-forced forward pass (logits, and the mean token loss when ``labels`` are given).

        Args:
            input_ids: ``(B, L)``; attention_mask: ``(B, L)``; input_features / feature_lengths: see
                :meth:`build_inputs_embeds`; labels: ``(B, L)`` with -100 where no loss is taken.
        """
        inputs_embeds = self.build_inputs_embeds(input_ids, input_features, feature_lengths)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def guard_settings(self, override=None) -> RepetitionGuard | None:
        """The repetition guard in effect: ``override`` (False: none, True: defaults, a mapping of settings) or,
        when None, the config's ``repetition_guard``."""
        return repetition_guard_from(self.config.repetition_guard if override is None else override)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        repetition_guard=None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Decode replies for left-padded prompts; ``generate_kwargs`` go to the LLM's ``generate``
        (``max_new_tokens``, ``num_beams``, ...; greedy unless ``do_sample=True``).

        The repetition guard (:meth:`guard_settings`; aero_lightning/eval/repetition_guard.py) is added to the
        stopping criteria, so a reply that loops ends within tens of tokens instead of at ``max_new_tokens``.

        Args:
            input_ids, attention_mask, input_features, feature_lengths: as for :meth:`forward`.
            repetition_guard: None (the config's), False (off), True or a mapping of guard settings.

        Returns:
            ``(B, T_new)`` new token ids (the prompt is not repeated).
        """
        inputs_embeds = self.build_inputs_embeds(input_ids, input_features, feature_lengths)
        guard = self.guard_settings(repetition_guard)
        if guard is not None:
            criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
            num_beams = generate_kwargs.get("num_beams") or self.llm.generation_config.num_beams or 1
            criteria.append(guard.criterion(num_beams))
            generate_kwargs["stopping_criteria"] = criteria
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("eos_token_id", list(self.config.stop_token_ids))
        generate_kwargs.setdefault("pad_token_id", self.config.generation_pad_token_id)
        return self.llm.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
