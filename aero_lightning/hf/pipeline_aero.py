"""``automatic-speech-recognition`` pipeline of an exported Aero audio LLM (copied into the export folder).

Usage::

    from transformers import pipeline
    asr = pipeline("automatic-speech-recognition", model="EXPORT_DIR", trust_remote_code=True)
    asr("speech.flac")                                   # {"text": "...", "stopped_by_repetition_guard": False}
    asr("speech.flac", num_beams=4, max_new_tokens=64)   # generation arguments pass through
    asr({"raw": waveform, "sampling_rate": 8000})        # arrays at any rate (resampled to 16 kHz)
    asr("meeting.flac", chunk_length_s=60, stride_length_s=5)  # overlapping chunks, texts merged

Audio files are read with libsndfile (``soundfile``: WAV, FLAC, OGG, MP3, ...) and resampled with ``soxr``, and
prompt and features are built by the export's :class:`AeroProcessor`, as aero_lightning's ``transcribe.py`` does,
so both give the same text for the same file. The pipeline decodes one input at a time.

Decoding follows ``transcribe.py`` (aero_lightning/eval/decode.py):

- Without ``max_new_tokens`` the budget scales with the duration (``AeroConfig`` documents the formula).
- The model's repetition guard (``AeroConfig.repetition_guard``; ``repetition_guard=False`` turns it off for a
  call) stops a reply that loops; the output's ``stopped_by_repetition_guard`` says so.
- A recording longer than one pass can hold (the LLM's context, at most ``AeroConfig.max_pass_s``) is cut into
  chunks. ``chunk_length_s`` sets the chunk length (recordings longer than it are chunked) and ``stride_length_s``
  the overlap on each side of a chunk, as in transformers' own ASR pipeline, whose chunk layout and merge rule
  these are (aero_lightning/eval/chunking.py); their defaults are the export's ``chunk_s`` and ``stride_s``
  (``stride_s``, not transformers' ``chunk_length_s / 6``, so that the same settings give ``transcribe.py``'s
  chunks). Each chunk is decoded alone and the chunk texts are merged on their overlapping words.
"""

from __future__ import annotations

import math

import torch
from transformers import Pipeline

from aero_lightning.data.chat import encode_chat
from aero_lightning.eval.chunking import max_pass_samples, merge_chunk_texts, plan_chunks
from aero_lightning.hf.processing_aero import TARGET_RATE_HZ, AeroProcessor, read_audio

__all__ = ["AeroASRPipeline", "read_audio"]


class AeroASRPipeline(Pipeline):
    """Speech recognition with an exported Aero model: ``{"text", "stopped_by_repetition_guard"}`` per input."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = True
    _load_tokenizer = True

    def _sanitize_parameters(
        self,
        prompt=None,
        max_new_tokens=None,
        num_beams=None,
        generate_kwargs=None,
        chunk_length_s=None,
        stride_length_s=None,
        repetition_guard=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"unknown arguments {sorted(kwargs)}; pass generation arguments as generate_kwargs={{}}"
            )
        preprocess = {}
        if prompt is not None:
            preprocess["prompt"] = prompt
        if chunk_length_s is not None:
            preprocess["chunk_length_s"] = float(chunk_length_s)
        if stride_length_s is not None:
            preprocess["stride_length_s"] = float(stride_length_s)
        forward = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            forward["max_new_tokens"] = int(max_new_tokens)
            preprocess["max_new_tokens"] = int(max_new_tokens)  # a fixed budget changes what one pass holds
        if num_beams is not None:
            forward["num_beams"] = int(num_beams)
        postprocess = {}
        if repetition_guard is not None:
            forward["repetition_guard"] = repetition_guard
            postprocess["repetition_guard"] = repetition_guard
        return preprocess, forward, postprocess

    @property
    def processor_(self) -> AeroProcessor:
        """The export's processor over the pipeline's feature extractor and tokenizer."""
        if getattr(self, "_aero_processor", None) is None:
            config = self.model.config
            self._aero_processor = AeroProcessor(
                self.feature_extractor,
                self.tokenizer,
                asr_prompt=config.asr_prompt,
                end_of_turn_token=config.end_of_turn_token,
            )
        return self._aero_processor

    def _default_budget(self, duration_s: float) -> int:
        c = self.model.config
        scaled = c.base_new_tokens + math.ceil(duration_s * c.chars_per_second / c.chars_per_token)
        return int(min(c.max_new_tokens_cap, max(1, scaled)))

    def _chunk_samples(self, prompt: str | None, chunk_length_s: float | None, max_new_tokens: int | None):
        """Samples per chunk: ``chunk_length_s`` (checked against what a pass holds) or the pass limit."""
        config = self.model.config
        messages = [
            {
                "role": "user",
                "content": [{"type": "audio"}, {"type": "text", "text": prompt or config.asr_prompt}],
            }
        ]
        template = encode_chat(
            self.tokenizer, messages, [1], config.end_of_turn_token, add_generation_prompt=True
        )
        limit = max_pass_samples(
            getattr(config.text_config, "max_position_embeddings", None),
            len(template.input_ids) - 1,  # the prompt without its one audio slot
            self.feature_extractor.num_audio_tokens,
            lambda n: max_new_tokens or self._default_budget(n / TARGET_RATE_HZ),
            round(config.max_pass_s * TARGET_RATE_HZ) if config.max_pass_s is not None else None,
        )
        chunk_s = chunk_length_s if chunk_length_s is not None else config.chunk_s
        if chunk_s is None:
            return limit
        chunk = round(chunk_s * TARGET_RATE_HZ)
        if limit is not None and chunk > limit:
            raise ValueError(
                f"chunk_length_s={chunk_s} s is longer than one pass holds ({limit / TARGET_RATE_HZ:.1f} s with "
                "this model's context, max_pass_s and token budget)"
            )
        return chunk

    def preprocess(
        self,
        inputs,
        prompt: str | None = None,
        chunk_length_s: float | None = None,
        stride_length_s: float | None = None,
        max_new_tokens: int | None = None,
    ) -> dict:
        wave = read_audio(inputs)
        chunk = self._chunk_samples(prompt, chunk_length_s, max_new_tokens)
        stride_s = stride_length_s if stride_length_s is not None else self.model.config.stride_s
        spans = (
            plan_chunks(wave.size, chunk, round(stride_s * TARGET_RATE_HZ))
            if chunk is not None and wave.size > chunk
            else [(0, wave.size)]
        )
        chunks = []
        for start, end in spans:
            piece = self.processor_(
                audio={"raw": wave[start:end], "sampling_rate": TARGET_RATE_HZ}, text=prompt
            )
            chunks.append(dict(piece) | {"duration_s": torch.tensor([(end - start) / TARGET_RATE_HZ])})
        return {"chunks": chunks}

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        tokens = []
        for chunk in model_inputs["chunks"]:
            chunk = dict(chunk)
            duration_s = float(chunk.pop("duration_s")[0])
            kwargs = dict(generate_kwargs)
            kwargs.setdefault("max_new_tokens", self._default_budget(duration_s))
            tokens.append(self.model.generate(**chunk, **kwargs)[0])  # (T_new,)
        return {"tokens": tokens}

    def postprocess(self, model_outputs: dict, repetition_guard=None) -> dict:
        guard = self.model.guard_settings(repetition_guard)
        stops = set(self.model.config.stop_token_ids or [])
        texts, stopped = [], False
        for row in model_outputs["tokens"]:
            row = row.tolist()
            end = next((j for j, t in enumerate(row) if t in stops), None)
            if guard is not None and guard.find_stop(row[:end] if end is not None else row) is not None:
                stopped = True
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        text = texts[0] if len(texts) == 1 else merge_chunk_texts(texts)
        return {"text": text, "stopped_by_repetition_guard": stopped}
