"""transformers configuration of an exported Aero audio LLM (copied into the export folder as remote code).

The config nests the audio encoder's config (``encoder_config``: Whisper, HuBERT or wav2vec 2.0) and the causal LM's
config (``text_config``, e.g. Qwen2) and adds the projector, the prompt and the generation budget used by the ASR
pipeline. The exporter copies the chat module beside it, so the export folder loads with ``trust_remote_code=True``
without aero_lightning installed.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT


class AeroConfig(PreTrainedConfig):
    """Config of :class:`AeroForConditionalGeneration`.

    Attributes:
        encoder_config: the audio encoder's config; its ``model_type`` picks the encoder: ``whisper`` (only the
            encoder is built), ``hubert`` or ``wav2vec2`` (the model without a CTC head).
        text_config: the causal LM's config (any ``AutoModelForCausalLM`` type; ``qwen2`` for Aero).
        projector: ``{"type": "mlp_stack", "stack_factor", "hidden_dim"}`` or ``{"type": "avgpool_linear",
            "pool"}``.
        padding_free: encode each 30 s window on its true length (as trained) instead of padding to 30 s (Whisper;
            HuBERT and wav2vec 2.0 always run on the true length).
        encoder_attn_implementation: attention backend of the encoder (``varlen``: packed windows, one SDPA call
            per window on CPU; ``sdpa``; ``eager``).
        end_of_turn_token: the chat template's end-of-turn token; it stops generation.
        audio_token_id: id of ``<|AUDIO|>``, the slot the projected audio embeddings fill.
        stop_token_ids: ids that end generation (end-of-turn and eos).
        generation_pad_token_id: id that pads finished rows during batched generation.
        llm_generation_config: the trained LLM's generation config (repetition penalty, ...), re-applied on load.
        asr_prompt: the instruction after the audio in the ASR pipeline.
        base_new_tokens, chars_per_second, chars_per_token, max_new_tokens_cap: the pipeline's default budget,
            ``min(cap, base + ceil(duration_s * chars_per_second / chars_per_token))`` new tokens.
        repetition_guard: ``{"max_ngram", "min_repeats", "min_tokens"}`` of the guard ``generate`` adds
            (aero_lightning/eval/repetition_guard.py); None: no guard.
        max_pass_s: longest recording the pipeline decodes in one pass, in seconds, further limited by the LLM's
            context; None: the context alone.
        chunk_s: the pipeline's default chunk length in seconds (None: the pass limit).
        stride_s: the pipeline's default overlap on each side of a chunk, in seconds.
    """

    model_type = "aero_audio_llm"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector: dict | None = None
    padding_free: bool = True
    encoder_attn_implementation: str = "sdpa"
    end_of_turn_token: str = "<|im_end|>"
    audio_token_id: int | None = None
    stop_token_ids: list[int] | None = None
    generation_pad_token_id: int | None = None
    llm_generation_config: dict | None = None
    asr_prompt: str = DEFAULT_ASR_PROMPT
    base_new_tokens: int = 16
    chars_per_second: float = 25.0
    chars_per_token: float = 4.0
    max_new_tokens_cap: int = 8192
    repetition_guard: dict | None = None
    max_pass_s: float | None = 900.0
    chunk_s: float | None = None
    stride_s: float = 5.0

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The causal LM's config (generation utilities read vocabulary and cache settings from it)."""
        if encoder:
            return self.encoder_config
        return self.text_config
