"""Model-FLOPs / MFU accounting: hand-worked counts on the tiny model, freezing, padding, Σsᵢ²."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from aero_lightning.data.chat import encode_chat
from aero_lightning.data.packing import collate_packed, collate_padded
from aero_lightning.model.flops import (
    PEAK_FLOPS_BF16,
    batch_lengths,
    batch_targets,
    count_params,
    mfu,
    peak_flops,
    step_flops,
)
from aero_lightning.model.freeze import freeze

# The tiny config of tests/conftest.py, written out (checked against the loaded model in _check_config).
N_MELS, ENC_D, ENC_LAYERS, ENC_FFN = 80, 64, 2, 128  # Whisper encoder: 2 heads of 32
STACK_K, PROJ_HIDDEN = 4, 128  # MLPStackProjector(stack_factor=4, hidden_dim=128)
LLM_D, LLM_LAYERS, HEADS, KV_HEADS, LLM_FFN, VOCAB = 64, 2, 4, 2, 128, 300  # Qwen2, tied LM head
HEAD_DIM = LLM_D // HEADS

# Matmul weights (elements), by hand.
ENC_LAYER = 4 * ENC_D * ENC_D + 2 * ENC_D * ENC_FFN  # q, k, v, out_proj + fc1, fc2
ENC_LINEAR = ENC_LAYERS * ENC_LAYER  # 65 536
ENC_STEM = (
    N_MELS * ENC_D * 3 * 2 + ENC_D * ENC_D * 3 * 1
)  # conv1 (k=3) at 2 positions/frame, conv2 at 1: 43 008
PROJ = STACK_K * ENC_D * PROJ_HIDDEN + PROJ_HIDDEN * LLM_D  # fc1 on k stacked frames, fc2: 40 960
LLM_LAYER = (
    LLM_D * HEADS * HEAD_DIM  # q_proj
    + 2 * LLM_D * KV_HEADS * HEAD_DIM  # k_proj, v_proj (GQA: 2 kv heads)
    + HEADS * HEAD_DIM * LLM_D  # o_proj
    + 3 * LLM_D * LLM_FFN  # gate, up, down (SwiGLU)
)
HEAD = VOCAB * LLM_D  # the tied LM head, applied at target positions only: 19 200
LLM_LINEAR = LLM_LAYERS * LLM_LAYER + HEAD  # input embedding excluded: 92 928
# lmms-engine's LLM count from the config: every layer weight, plus input embedding and LM head (2·V·h)
LMMS_N = (
    LLM_LAYERS * (3 * LLM_D * LLM_FFN + LLM_D * (2 * HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM)) + 2 * HEAD
)


def _check_config(model) -> None:
    enc, llm = model.encoder.config, model.llm.config
    assert (enc.num_mel_bins, enc.d_model, enc.encoder_layers, enc.encoder_ffn_dim) == (
        N_MELS,
        ENC_D,
        ENC_LAYERS,
        ENC_FFN,
    )
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads) == (LLM_D, LLM_LAYERS, HEADS)
    assert (llm.num_key_value_heads, llm.intermediate_size, llm.vocab_size) == (KV_HEADS, LLM_FFN, VOCAB)
    assert llm.tie_word_embeddings
    assert (model.projector.downsample, model.projector.fc1.out_features) == (STACK_K, PROJ_HIDDEN)


FRAMES = [50, 13]  # encoder frames of two windows
DOCS = [40, 25]  # LLM tokens of two documents
PROJ_TOKENS = 13 + 4  # ceil(50 / 4) + ceil(13 / 4)


TARGETS = 12  # positions the loss projects to the vocabulary (of the 65 LLM tokens)


def test_hand_worked_count_all_trainable(make_model):
    model = make_model()
    _check_config(model)
    assert ENC_LINEAR == 65_536 and ENC_STEM == 43_008 and PROJ == 40_960 and LLM_LINEAR == 92_928
    assert HEAD == 19_200 and LMMS_N == 112_128
    params = count_params(model)
    flops = step_flops(params, FRAMES, DOCS, target_tokens=TARGETS)
    enc_attn = 12 * ENC_LAYERS * ENC_D * (50**2 + 13**2)
    llm_attn = 12 * LLM_LAYERS * HEADS * HEAD_DIM * (40**2 + 25**2)
    encoder = 6 * (ENC_LINEAR + ENC_STEM) * (50 + 13) + enc_attn
    projector = 6 * PROJ * PROJ_TOKENS
    head = 6 * HEAD * TARGETS  # the LM head at target positions only
    llm = 6 * (LLM_LINEAR - HEAD) * (40 + 25) + llm_attn + head
    lmms = 6 * LMMS_N * (40 + 25) + 12 * (40**2 + 25**2) * HEAD_DIM * HEADS * LLM_LAYERS
    assert flops == {
        "encoder": encoder,
        "projector": projector,
        "llm": llm,
        "total": encoder + projector + llm,
        "encoder_attention": enc_attn,
        "llm_attention": llm_attn,
        "llm_head": head,
        "lmms_engine": lmms,
    }
    assert flops["total"] == 82_861_056 and flops["lmms_engine"] == 47_147_520  # the same sums, as literals
    # no target count: the head at every real token (a forward that returns full logits), the old figure
    everywhere = step_flops(params, FRAMES, DOCS)
    assert everywhere["llm_head"] == 6 * HEAD * 65 and everywhere["total"] == 88_966_656
    assert everywhere["lmms_engine"] == lmms  # lmms-engine's count has no notion of targets
    with pytest.raises(ValueError, match="target_tokens must be in"):
        step_flops(params, FRAMES, DOCS, target_tokens=66)


def test_lmms_engine_count_is_its_formula_on_the_config(make_model):
    """lmms-engine's FlopsCounter._estimate_qwen2_flops, written out on the tiny Qwen2 config: it counts neither
    the encoder nor the projector, counts frozen weights as trainable, and the embedding too."""
    params = count_params(make_model(freeze=["^encoder\\.", "^llm\\."]))
    assert params.llm.trainable == params.llm.head_trainable == 0 and params.llm.frozen == LLM_LINEAR - HEAD
    assert params.lmms_engine.dense == LMMS_N and params.lmms_engine.attn == HEAD_DIM * HEADS * LLM_LAYERS
    flops = step_flops(params, [1500], [100])  # a long audio window does not change it
    assert flops["lmms_engine"] == 6 * 112_128 * 100 + 12 * 100**2 * 128 == 82_636_800


def test_frozen_encoder_costs_forward_only(make_model):
    model = make_model()
    trained = step_flops(count_params(model), FRAMES, DOCS)
    freeze(model, ["^encoder\\."])
    params = count_params(model)
    assert (params.encoder.trainable, params.encoder.frozen) == (0, ENC_LINEAR)
    assert (params.encoder.stem_trainable, params.encoder.stem_frozen) == (0, ENC_STEM)
    assert (params.encoder.trainable_layers, params.encoder.frozen_layers) == (0, ENC_LAYERS)
    frozen = step_flops(params, FRAMES, DOCS)
    enc_attn = 4 * ENC_LAYERS * ENC_D * (50**2 + 13**2)  # a third of fwd+bwd
    assert frozen["encoder_attention"] == enc_attn
    assert frozen["encoder"] == 2 * (ENC_LINEAR + ENC_STEM) * 63 + enc_attn
    assert frozen["projector"] == trained["projector"] and frozen["llm"] == trained["llm"]
    assert trained["encoder"] - frozen["encoder"] == 4 * (
        ENC_LINEAR + ENC_STEM
    ) * 63 + 8 * ENC_LAYERS * ENC_D * (50**2 + 13**2)


def test_frozen_llm_layers_are_counted_per_layer(make_model):
    model = make_model(freeze=["^llm\\.model\\.layers\\.0\\."])
    params = count_params(model)
    assert (params.llm.trainable_layers, params.llm.frozen_layers) == (1, 1)
    assert (params.llm.trainable, params.llm.frozen) == (LLM_LINEAR - HEAD - LLM_LAYER, LLM_LAYER)
    assert (params.llm.head_trainable, params.llm.head_frozen) == (HEAD, 0)
    flops = step_flops(params, [], [10])
    assert flops["llm_attention"] == (12 + 4) * LLM_D * 10**2
    assert flops["llm"] == (6 * (LLM_LINEAR - LLM_LAYER) + 2 * LLM_LAYER) * 10 + flops["llm_attention"]
    assert flops["encoder"] == flops["projector"] == 0  # a text-only step


def _encoded(tokenizer, counter, make_samples, durations):
    out = []
    for s in make_samples(durations):
        enc = encode_chat(tokenizer, s["messages"], [counter(len(s["waveform"]))])
        out.append(s | {"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def test_padding_does_not_count(make_model, make_samples):
    model = make_model()
    counter = model.audio_token_counter()
    samples = _encoded(model.tokenizer, counter, make_samples, [0.7, 2.3, 31.0, 1.1])
    packed = collate_packed(samples, counter)
    padded = collate_padded(samples, counter, pad_id=model.tokenizer.pad_token_id)
    assert not bool(padded["attention_mask"].all())  # there is padding to ignore
    frames, docs = batch_lengths(packed, counter)
    assert (frames, docs) == batch_lengths(padded, counter)
    assert docs == [len(s["input_ids"]) for s in samples]
    assert frames == [35, 115, 1500, 50, 55]  # ceil(ceil(samples / 160) / 2) per 30 s window
    params = count_params(model)
    assert step_flops(params, *batch_lengths(packed, counter)) == step_flops(params, *batch_lengths(padded))
    # counting the padded rows in full would be more
    rows, width = padded["input_ids"].shape
    assert step_flops(params, frames, [width] * rows)["llm"] > step_flops(params, frames, docs)["llm"]


def test_attention_is_sum_of_squares(make_model):
    params = count_params(make_model())
    two = step_flops(params, [], [10, 10])
    one = step_flops(params, [], [20])
    assert two["llm_attention"] == 12 * LLM_LAYERS * LLM_D * (10**2 + 10**2) == 307_200
    assert one["llm_attention"] == 12 * LLM_LAYERS * LLM_D * 20**2 == 614_400
    assert one["llm"] - two["llm"] == 307_200  # the parameter term is the same 20 tokens
    # encoder windows likewise
    assert step_flops(params, [10, 10], [])["encoder_attention"] == 12 * ENC_LAYERS * ENC_D * 200


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # the longest matching key wins
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312e12
    assert peak_flops("NVIDIA L40S", torch.float16) == 362e12
    assert peak_flops("NVIDIA B200") == 2.25e15
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA GeForce GTX 1080") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "32-true") is None
    assert peak_flops("cpu", override=1e12) == 1e12
    with pytest.raises(ValueError):
        peak_flops("cpu", override=0.0)
    assert all(v > 1e14 for v in PEAK_FLOPS_BF16.values())
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)


def test_count_params_matches_the_model(make_model):
    model = make_model(freeze=["^encoder\\."])
    params = count_params(model)
    # every 2-D weight except the embedding tables; the tied LM head is not listed separately (shared tensor)
    named = dict(model.named_parameters())
    matrices = {n: p for n, p in named.items() if p.ndim == 2 and "embed" not in n}
    assert (
        "llm.lm_head.weight" not in named
        and model.llm.lm_head.weight is named["llm.model.embed_tokens.weight"]
    )
    head = model.llm.lm_head.weight.numel()

    def total(prefix: str, trainable: bool) -> int:
        return sum(
            p.numel() for n, p in matrices.items() if n.startswith(prefix) and p.requires_grad == trainable
        )

    assert (params.encoder.trainable, params.encoder.frozen) == (0, total("encoder.", False))
    assert (params.projector.trainable, params.projector.frozen) == (total("projector.", True), 0)
    assert (params.llm.trainable, params.llm.frozen) == (total("llm.", True), 0)  # the head apart:
    assert (params.llm.head_trainable, params.llm.head_frozen) == (head, 0)
    conv1, conv2 = named["encoder.encoder.conv1.weight"], named["encoder.encoder.conv2.weight"]
    assert params.encoder.stem_frozen == conv1.numel() * model.encoder.encoder.conv2.stride[0] + conv2.numel()
    assert (params.encoder.layers, params.llm.layers) == (ENC_LAYERS, LLM_LAYERS)
    assert (params.encoder.attn_width, params.llm.attn_width) == (ENC_D, LLM_D)
    assert params.projector.layers == 0 and params.projector_downsample == STACK_K
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert linears == ENC_LINEAR + PROJ + LLM_LINEAR


def test_forward_flops_match_flop_counter(make_model, make_samples, make_batch):
    """FlopCounterMode counts matmuls, convolutions and (here, eager) attention matmuls on a real forward.

    With everything frozen, step_flops is the forward count (2N per token, 4·L·d·s² attention). A single
    1.0 s clip (100 mel frames, 50 encoder frames, 13 audio tokens) in a batch of one has no padding, so the
    two agree exactly: FlopCounterMode, like our convention, ignores biases, norms, activations, softmax and
    the embedding lookup, and counts attention as full s² matmuls (eager attention materialises the causal
    s x s scores). Tolerance: exact (sdpa on CPU dispatches to a kernel FlopCounterMode does not count).
    """
    eager = {"attn_implementation": "eager"}
    model = make_model(
        encoder_kwargs=eager, llm_kwargs=eager, freeze=["^encoder\\.", "^projector\\.", "^llm\\."]
    )
    model.eval()
    batch = make_batch(model, make_samples([1.0]))
    assert batch["input_features"].shape[-1] == 100 and batch["attention_mask"].all()
    expected = step_flops(count_params(model), *batch_lengths(batch, model.audio_token_counter()))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            feature_lengths=batch["feature_lengths"],
        )
    assert counter.get_total_flops() == expected["total"]
    by_module = counter.get_flop_counts()
    assert sum(by_module["AeroModel.llm"].values()) == expected["llm"]
    assert sum(by_module["AeroModel.encoder"].values()) == expected["encoder"]


def test_training_flops_match_flop_counter(make_model, make_samples, make_batch):
    """Forward + backward of the fully trainable model: 6N per token and 12·L·d·s² attention, measured.

    FlopCounterMode sees every weight and input gradient autograd computes (2N each, and 8·L·d·s² for the
    attention backward). The only difference from the 6N convention is conv1's input gradient, which autograd
    skips because the log-mel input needs none: ``2 * conv1 weights * mel frames`` FLOPs. Tolerance: exact.
    """
    eager = {"attn_implementation": "eager"}
    model = make_model(encoder_kwargs=eager, llm_kwargs=eager).train()
    batch = make_batch(model, make_samples([1.0]))
    mel_frames = int(batch["feature_lengths"][0])
    assert mel_frames == batch["input_features"].shape[-1] == 100
    expected = step_flops(count_params(model), *batch_lengths(batch))
    with FlopCounterMode(display=False) as counter:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            feature_lengths=batch["feature_lengths"],
            labels=batch["labels"],
        )
        out.loss.backward()
    conv1_input_grad = 2 * (N_MELS * ENC_D * 3) * mel_frames
    assert expected["total"] - counter.get_total_flops() == conv1_input_grad


def test_training_loss_path_projects_target_positions_only(make_model, make_samples, make_batch):
    """The training forward (``return_logits=False``) applies the LM head to the target positions only, which is
    what step_flops counts with ``target_tokens=batch_targets(batch)``. FlopCounterMode also sees the hardware
    extra of the chunked loss, whose head matmul is recomputed in backward (``2·V·d`` per target), and misses
    conv1's input gradient as above; everything else agrees exactly."""
    eager = {"attn_implementation": "eager"}
    model = make_model(encoder_kwargs=eager, llm_kwargs=eager).train()
    batch = make_batch(model, make_samples([1.0]))
    targets = batch_targets(batch)
    assert (
        0 < targets < batch["attention_mask"].sum() - 20
    )  # the audio and prompt positions are most of the row
    expected = step_flops(count_params(model), *batch_lengths(batch), target_tokens=targets)
    with FlopCounterMode(display=False) as counter:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            feature_lengths=batch["feature_lengths"],
            labels=batch["labels"],
            return_logits=False,
        )
        (out.loss_sum / out.num_target_tokens).backward()
    assert int(out.num_target_tokens) == targets
    conv1_input_grad = 2 * (N_MELS * ENC_D * 3) * int(batch["feature_lengths"][0])
    recompute = 2 * HEAD * targets
    assert counter.get_total_flops() - expected["total"] == recompute - conv1_input_grad


def test_count_params_uses_the_full_size_of_partitioned_weights(make_model):
    """Under DeepSpeed ZeRO-3 a partitioned parameter's data is empty outside its module's forward and its full
    size is ``ds_numel``: the counts are those of the whole model (the two-process ZeRO-3 run in
    tests/test_strategies.py checks the same on real partitions)."""
    model = make_model()
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    params = count_params(model)
    assert (params.encoder.trainable, params.encoder.stem_trainable) == (ENC_LINEAR, ENC_STEM)
    assert (params.projector.trainable, params.llm.trainable) == (PROJ, LLM_LINEAR - HEAD)
    assert params.llm.head_trainable == HEAD and params.encoder.frozen == params.llm.frozen == 0
