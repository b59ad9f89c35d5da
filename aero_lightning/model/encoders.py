"""Audio encoders that take variable-length 30 s windows.

The Whisper encoder (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision",
https://arxiv.org/abs/2212.04356) is trained on log-mel inputs padded to exactly 30 s (3000 frames), and
HF ``WhisperEncoder.forward`` rejects any other length. Audio language models that use it as a feature
extractor (Qwen2-Audio, Aero-1-Audio) do not need the padding: we run the encoder's own modules on each
window's true length — conv stem, positional embeddings sliced to that length, attention restricted to the
window — which removes up to 30x of encoder compute on short utterances.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids

from aero_lightning.data.audio_tokens import encoder_frames
from aero_lightning.data.features import LogMelSpectrogram
from aero_lightning.model.attention import PACKED_IMPLEMENTATIONS, packed_attention_kwargs

logger = logging.getLogger(__name__)


class PaddingFreeWhisperEncoder(WhisperEncoder):
    """HF ``WhisperEncoder`` that also accepts windows shorter than 30 s.

    The module tree and parameter names are exactly ``WhisperEncoder``'s, so ``from_pretrained`` loads either an
    encoder-only folder (this class's ``save_pretrained``) or the encoder of a full Whisper checkpoint
    (``openai/whisper-large-v3``: keys under ``model.encoder.``, stripped through ``base_model_prefix``).

    ``forward_windows`` is the padding-free path; the inherited ``forward`` is untouched (30 s only).

    A new (random-init) encoder gets Whisper's fixed sinusoidal position table (Radford et al. 2022, sec. 2.2;
    transformers' ``sinusoids``). transformers 5.x initialises it only for ``WhisperEncoder`` itself: a subclass
    defined outside the library keeps the ``N(0, 0.02)`` embedding init, which leaves self-attention nearly blind
    to order. ``from_pretrained`` then overwrites the table with the checkpoint's.
    """

    base_model_prefix = "model.encoder"

    def __init__(self, config: WhisperConfig):
        super().__init__(config)
        weight = self.embed_positions.weight
        if weight.device.type != "meta":  # from_pretrained builds on meta and loads the checkpoint's table
            with torch.no_grad():
                weight.copy_(sinusoids(*weight.shape).to(weight.dtype))

    def forward_windows(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor, padding_free: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of windows of different lengths.

        Args:
            input_features: ``(W, num_mel_bins, T)`` log-mel windows, ``T <= 3000`` frames. Padding-free, frames
                past a window's length are ignored (they may hold anything). Otherwise every frame is used as
                given: for HF's exact output pass the 3000 frames of ``LogMelSpectrogram(pad_to_window=True)``
                (the log-mel of the 30 s zero padding); a shorter input is zero-padded to 3000 frames.
            feature_lengths: ``(W,)`` valid frames per window, ``1 <= length <= T``.
            padding_free: if False, every window runs on 3000 frames and attends over all of them, exactly as HF
                ``WhisperEncoder`` does (use it for frozen encoders whose outputs must match the original); if
                True, each window is encoded on its true length only.

        Returns:
            ``hidden_states (W, S, d_model)`` with ``S`` the encoder frames of ``T_run`` log-mel frames and
            ``output_lengths (W,)`` those of ``feature_lengths`` (:func:`~aero_lightning.data.audio_tokens.encoder_frames`);
            rows are valid up to their output length (the rest is undefined).

        Raises:
            ValueError: if the windows are longer than 3000 frames or the mel bins do not match the config.
        """
        num_windows, num_mel_bins, num_frames = input_features.shape
        if num_mel_bins != self.config.num_mel_bins:
            raise ValueError(
                f"input_features has {num_mel_bins} mel bins but the encoder expects {self.config.num_mel_bins}; "
                "set model.feature_extractor num_mel_bins to the encoder's config.num_mel_bins."
            )
        max_frames = self.config.max_source_positions * 2
        if num_frames > max_frames:
            raise ValueError(
                f"windows of {num_frames} frames exceed the encoder's {max_frames}; split audio into 30 s windows."
            )
        feature_lengths = feature_lengths.to(input_features.device)
        frame_idx = torch.arange(num_frames, device=input_features.device)
        valid = frame_idx[None, :] < feature_lengths[:, None]  # (W, T)
        # the conv stem's dtype: under DeepSpeed bf16 the weights are bf16 with no autocast and log-mel is fp32
        if padding_free:
            x = (input_features * valid[:, None, :].to(input_features.dtype)).to(self.conv1.weight.dtype)
        else:  # HF's 30 s input: the frames are taken as given (the padding's log-mel is not zero)
            x = nn.functional.pad(input_features, (0, max_frames - num_frames)).to(self.conv1.weight.dtype)

        x = nn.functional.gelu(self.conv1(x))  # (W, D, T)
        if padding_free:
            # conv2 must not see conv1's response to the padding (gelu(bias) != 0) beyond the true length.
            x = x * valid[:, None, :].to(x.dtype)
        x = nn.functional.gelu(self.conv2(x))  # (W, D, S): S encoder frames
        x = x.permute(0, 2, 1)  # (W, S, D)
        seq_len = x.shape[1]
        # (S, D); the module call, not a weight read, so DeepSpeed ZeRO-3 gathers the table in its own hooks
        positions = self.embed_positions(torch.arange(seq_len, device=x.device))
        hidden_states = x + positions
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        output_lengths = encoder_frames(feature_lengths)  # (W,)
        if padding_free and self.config._attn_implementation in PACKED_IMPLEMENTATIONS:
            return self._packed_layers(hidden_states, output_lengths), output_lengths
        attention_mask = None
        if padding_free and bool((output_lengths < seq_len).any()):
            key_valid = torch.arange(seq_len, device=x.device)[None, :] < output_lengths[:, None]  # (W, S)
            # Boolean (W, 1, S, S) mask, True = attend; every query row has >= 1 valid key.
            attention_mask = key_valid[:, None, None, :].expand(num_windows, 1, seq_len, seq_len)
            if self.config._attn_implementation == "eager":
                attention_mask = torch.zeros(
                    attention_mask.shape, dtype=hidden_states.dtype, device=x.device
                ).masked_fill(~attention_mask, torch.finfo(hidden_states.dtype).min)

        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = layer(hidden_states, attention_mask)
        hidden_states = self.layer_norm(hidden_states)
        if not padding_free:
            hidden_states = hidden_states[:, : encoder_frames(num_frames)]
        return hidden_states, output_lengths

    def _packed_layers(self, hidden_states: torch.Tensor, output_lengths: torch.Tensor) -> torch.Tensor:
        """Run the transformer layers on the valid frames of all windows as one packed row.

        Args:
            hidden_states: ``(W, S, D)`` conv-stem output plus positions; rows valid up to ``output_lengths``.
            output_lengths: ``(W,)`` valid frames per window.

        Returns:
            ``(W, S, D)`` with the valid frames encoded (attention within each window only) and zeros elsewhere.
        """
        num_windows, seq_len, dim = hidden_states.shape
        valid = (
            torch.arange(seq_len, device=hidden_states.device)[None, :] < output_lengths[:, None]
        )  # (W, S)
        packed = hidden_states[valid][None]  # (1, sum(S_w), D): no padding frame enters a layer
        cu_seqlens = nn.functional.pad(output_lengths.cumsum(0), (1, 0))  # (W+1,)
        kwargs = packed_attention_kwargs(cu_seqlens, int(output_lengths.max()))
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            packed = layer(packed, None, **kwargs)
        packed = self.layer_norm(packed)
        out = packed.new_zeros(num_windows, seq_len, dim)
        out[valid] = packed[0]
        return out


class WhisperAudioEncoder(nn.Module):
    """Whisper-architecture audio encoder adapter: windows in, per-window frame embeddings out (50 Hz).

    Args:
        encoder: a loaded :class:`PaddingFreeWhisperEncoder`.
        padding_free: encode each window on its true length (default) instead of padding to 30 s.
    """

    def __init__(self, encoder: PaddingFreeWhisperEncoder, padding_free: bool = True):
        super().__init__()
        self.encoder = encoder
        self.padding_free = padding_free
        # Whisper's positional table is fixed sinusoids (WhisperEncoder.__init__ sets requires_grad False), but
        # transformers 5.x from_pretrained hands it back trainable; keep it fixed as the model was trained.
        encoder.embed_positions.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        padding_free: bool = True,
        attn_implementation: str = "sdpa",
        torch_dtype: str | torch.dtype | None = None,
    ) -> WhisperAudioEncoder:
        """Load the encoder of a Whisper checkpoint (hub id or local folder), full or encoder-only.

        Raises:
            OSError: from transformers when the id or folder cannot be found.
        """
        kwargs = {"attn_implementation": attn_implementation}
        if torch_dtype is not None:
            kwargs["dtype"] = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        encoder = PaddingFreeWhisperEncoder.from_pretrained(name_or_path, **kwargs)
        table = encoder.embed_positions.weight
        if table.device.type != "meta" and not torch.allclose(
            table.float(), sinusoids(*table.shape), atol=1e-2
        ):
            logger.warning(
                "%s: the encoder's position table is not Whisper's sinusoids (an encoder built from scratch "
                "before aero_lightning fixed its init keeps N(0, 0.02) positions); rebuild it, e.g. "
                "`python -m aero_lightning.model.tiny ... --overwrite` for the demo model",
                name_or_path,
            )
        return cls(encoder, padding_free=padding_free)

    @property
    def config(self) -> WhisperConfig:
        return self.encoder.config

    @property
    def hidden_size(self) -> int:
        """Output width ``d_model``."""
        return self.encoder.config.d_model

    @property
    def num_mel_bins(self) -> int:
        return self.encoder.config.num_mel_bins

    def output_lengths(self, feature_lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Encoder frames produced for ``feature_lengths`` log-mel frames
        (:func:`~aero_lightning.data.audio_tokens.encoder_frames`)."""
        return encoder_frames(feature_lengths)

    def build_feature_extractor(self) -> LogMelSpectrogram:
        """The module that turns ``(W, N)`` waveform windows into this encoder's input: Whisper log-mel, with the
        30 s padding's frames when the encoder is not padding-free."""
        return LogMelSpectrogram(num_mel_bins=self.num_mel_bins, pad_to_window=not self.padding_free)

    def forward(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode windows.

        Args:
            input_features: ``(W, num_mel_bins, T)`` log-mel, T <= 3000 frames.
            feature_lengths: ``(W,)`` valid frames per window.

        Returns:
            ``(W, S, d_model)`` hidden states and ``(W,)`` valid output frames.
        """
        return self.encoder.forward_windows(input_features, feature_lengths, padding_free=self.padding_free)
