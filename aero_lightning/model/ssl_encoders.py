"""Self-supervised speech encoders (HuBERT, wav2vec 2.0) as AeroModel audio encoders.

HF ``HubertModel`` / ``Wav2Vec2Model`` (Hsu et al. 2021, arXiv:2106.07447; Baevski et al. 2020, arXiv:2006.11477)
read the raw 16 kHz waveform through a strided conv stack (7 convs, total stride 320 samples, receptive field 400)
and give 50 frames per second, the rate of Whisper's encoder. :class:`SSLAudioEncoder` makes them drop-in for the
Whisper adapter: windows in, ``(W, S, D)`` frames and ``(W,)`` valid lengths out, with exactly as many frames per
window as Whisper would give (:func:`aero_lightning.data.audio_tokens.samples_encoder_frames`), so the audio token
count and the data pipeline's token budgets hold unchanged. Each window is zero-padded on the right to the length
the conv stack needs for that many frames.

The encoders take waveforms, not log-mel: their feature extractor (:class:`WaveformWindows`) hands the 30 s
waveform windows through unchanged, and the adapter normalises each window (:func:`normalize_windows`).
:func:`aero_lightning.model.build.build_aero_model` picks this adapter for ``model.encoder.type`` ``hubert`` or
``wav2vec2``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from aero_lightning.data.audio_tokens import samples_encoder_frames

logger = logging.getLogger(__name__)

SSL_TYPES = ("hubert", "wav2vec2")


def conv_geometry(kernels: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
    """Receptive field and total stride (samples) of a stack of unpadded 1-D convolutions.

    Args:
        kernels: kernel size of each conv, input side first (wav2vec 2.0: 10, 3, 3, 3, 3, 2, 2).
        strides: stride of each conv (5, 2, 2, 2, 2, 2, 2).

    Returns:
        ``(receptive_field, stride)``: ``n = receptive_field + (F - 1) * stride`` samples give exactly ``F`` output
        frames (400 and 320 for wav2vec 2.0 / HuBERT).
    """
    field, jump = 1, 1
    for k, s in zip(kernels, strides):
        field += (k - 1) * jump
        jump *= s
    return field, jump


def normalize_windows(waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero-mean unit-variance normalisation of each window over its valid samples; samples past a window's
    length become 0.

    The formula of ``transformers.Wav2Vec2FeatureExtractor(do_normalize=True)`` (``zero_mean_unit_var_norm``:
    ``(x - mean) / sqrt(var + 1e-7)`` with the population variance, padding set to 0), in torch: the
    :class:`SSLAudioEncoder` of training and the exported feature extractor (aero_lightning/hf) both call this
    function, so they give the same numbers for the same windows.

    Args:
        waveforms: ``(W, N)`` float 16 kHz windows; what lies past a window's length is ignored.
        lengths: ``(W,)`` valid samples per window, >= 1.

    Returns:
        ``(W, N)`` float32.
    """
    x = waveforms.float()
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]  # (W, N)
    x = x * valid
    count = lengths.to(device=x.device, dtype=x.dtype)[:, None]  # (W, 1)
    mean = x.sum(-1, keepdim=True) / count
    var = ((x - mean) * valid).pow(2).sum(-1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + 1e-7) * valid


class WaveformWindows(nn.Module):
    """Feature extractor for waveform encoders: returns the 30 s windows unchanged.

    ``AeroModel.compute_features`` then hands the encoder ``(W, N)`` float32 waveforms and ``(W,)`` sample counts.
    """

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, N)`` waveforms and ``(W,)`` valid samples, unchanged (waveforms as float32, lengths as int64)."""
        return waveforms.float(), lengths.to(device=waveforms.device, dtype=torch.long)


class _FlopsConfig:
    """The HF config, plus the Whisper names ``aero_lightning.model.flops.count_params`` reads."""

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        if name == "encoder_layers":
            return self._config.num_hidden_layers
        if name == "d_model":
            return self._config.hidden_size
        return getattr(self._config, name)


class SSLAudioEncoder(nn.Module):
    """HuBERT / wav2vec 2.0 adapter with the Whisper adapter's interface: waveform windows in, 50 Hz frames out.

    Args:
        encoder: a loaded HF ``HubertModel`` or ``Wav2Vec2Model``.
        normalize: zero-mean unit-variance normalisation of each window over its valid samples
            (:func:`normalize_windows`), as ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does for the large
            checkpoints (``hubert-large-ll60k``, ``wav2vec2-large-lv60``). A model exported to transformers
            (aero_lightning/hf) builds this adapter with ``normalize=False``: its feature extractor normalises.

    The attention mask marks each window's valid samples, so frames never attend to another window's padding;
    checkpoints whose conv stack uses group norm over time (``feat_extract_norm="group"``, the base models) still
    see padding in that norm, so windows padded in a batch differ slightly from windows run alone (HF documents the
    same). :meth:`from_pretrained` turns LayerDrop off and SpecAugment off by default (and then freezes the unused
    ``masked_spec_embed``): both leave parameters without a gradient in some steps, which DDP and ZeRO reject.
    """

    def __init__(self, encoder: PreTrainedModel, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize
        self.receptive_field, self.stride = conv_geometry(
            encoder.config.conv_kernel, encoder.config.conv_stride
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        normalize: bool = True,
        attn_implementation: str = "sdpa",
        torch_dtype: str | torch.dtype | None = None,
        spec_augment: bool = False,
    ) -> SSLAudioEncoder:
        """Load a HuBERT or wav2vec 2.0 checkpoint (hub id or local folder) with ``AutoModel``.

        Args:
            name_or_path: hub id (``facebook/hubert-large-ll60k``) or folder.
            normalize: see the class.
            attn_implementation: transformers attention backend of the encoder.
            torch_dtype: storage dtype (None: the checkpoint's).
            spec_augment: keep the checkpoint's SpecAugment masking in training mode (``mask_time_prob``);
                LayerDrop is always off.

        Raises:
            OSError: from transformers when the id or folder cannot be found.
            ValueError: if the checkpoint is not a HuBERT / wav2vec 2.0 model.
        """
        config = AutoConfig.from_pretrained(name_or_path)
        if config.model_type not in SSL_TYPES:
            raise ValueError(
                f"{name_or_path} is a '{config.model_type}' model; SSLAudioEncoder takes {SSL_TYPES}"
            )
        config.layerdrop = 0.0
        config.apply_spec_augment = bool(spec_augment) and config.apply_spec_augment
        kwargs = {"config": config, "attn_implementation": attn_implementation}
        if torch_dtype is not None:
            kwargs["dtype"] = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        encoder = AutoModel.from_pretrained(name_or_path, **kwargs)
        spec_embed = getattr(encoder, "masked_spec_embed", None)
        if spec_embed is not None and not config.apply_spec_augment:
            spec_embed.requires_grad_(False)  # never used without SpecAugment: no gradient, not trained
        return cls(encoder, normalize=normalize)

    @property
    def config(self) -> _FlopsConfig:
        return _FlopsConfig(self.encoder.config)

    @property
    def hidden_size(self) -> int:
        """Output width."""
        return self.encoder.config.hidden_size

    def output_lengths(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        """Frames per window of ``num_samples`` samples (Whisper's count,
        :func:`~aero_lightning.data.audio_tokens.samples_encoder_frames`)."""
        return samples_encoder_frames(num_samples)

    def build_feature_extractor(self) -> WaveformWindows:
        """The module that turns ``(W, N)`` waveform windows into this encoder's input: the waveforms themselves."""
        return WaveformWindows()

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode waveform windows.

        Args:
            waveforms: ``(W, N)`` float 16 kHz windows, N <= 480 000 samples; samples past a window's length are
                ignored.
            lengths: ``(W,)`` valid samples per window, >= 1.

        Returns:
            ``(W, S, D)`` hidden states with ``S = max(frames)`` and ``(W,)`` valid frames
            ``frames = samples_encoder_frames(lengths)``; rows are valid up to their frame count.
        """
        device = waveforms.device
        lengths = lengths.to(device=device, dtype=torch.long)
        frames = samples_encoder_frames(lengths)  # (W,)
        needed = self.receptive_field + (frames - 1) * self.stride  # (W,) samples giving exactly `frames`
        total = int(needed.max())  # the usual conv stack (400, 320) needs 80 + 320 * frames > n samples
        x = waveforms.float()
        if self.normalize:
            x = normalize_windows(x, lengths)  # (W, N), zero past each length
        else:
            x = x * (torch.arange(x.shape[1], device=device)[None, :] < lengths[:, None])
        x = nn.functional.pad(x[:, :total], (0, max(0, total - x.shape[1])))  # (W, total)
        idx = torch.arange(total, device=device)[None, :]
        attention_mask = (idx < needed[:, None]).long()  # (W, total): what the conv stack may use
        dtype = next(self.encoder.parameters()).dtype
        hidden = self.encoder(x.to(dtype), attention_mask=attention_mask).last_hidden_state  # (W, S, D)
        return hidden, frames
