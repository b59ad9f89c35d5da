"""AeroModel end to end on tiny real components: shapes, gradients, slots, freezing, persistence, generation."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.build import from_pretrained, load_weights_from, save_pretrained
from aero_lightning.model.encoders import PaddingFreeWhisperEncoder, WhisperAudioEncoder
from aero_lightning.model.freeze import unfreeze
from aero_lightning.model.projector import AvgPoolProjector, MLPStackProjector


def _forward(model: AeroModel, batch: dict, **overrides):
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "input_features": batch["input_features"],
        "feature_lengths": batch["feature_lengths"],
        "labels": batch["labels"],
    }
    kwargs.update(overrides)
    return model(**kwargs)


def _unfreeze(model: AeroModel, patterns: list[str]) -> list[str]:
    names = unfreeze(model, patterns, model.fixed_parameters)
    model.refresh_frozen_components()
    return names


# ---------------------------------------------------------------------------------------------- forward


def test_forward_backward_shapes_and_gradients(model, make_samples, make_batch):
    batch = make_batch(model, make_samples([0.7, 2.3, 31.0]))
    assert batch["window_lengths"].tolist() == [11200, 36800, 480000, 16000]
    out = _forward(model, batch)
    batch_size, seq_len = batch["input_ids"].shape
    assert out.logits.shape == (batch_size, seq_len, model.llm.config.vocab_size)
    assert torch.isfinite(out.loss)
    assert int(out.num_target_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    out.loss.backward()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    assert any(n.startswith("llm.") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert no_grad == []
    for name in ("encoder.encoder.conv1.weight", "projector.fc1.weight", "llm.model.embed_tokens.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_audio_slot_mismatch_raises(model, make_samples, make_batch):
    batch = make_batch(model, make_samples([0.7, 2.3]))
    ids = batch["input_ids"].clone()
    first_slot = (ids[0] == model.audio_token_id).nonzero()[0, 0]
    ids[0, first_slot] = model.tokenizer.pad_token_id  # one slot fewer than audio embeddings
    with pytest.raises(ValueError, match="mismatch"):
        _forward(model, batch, input_ids=ids)
    with pytest.raises(ValueError, match="mismatch"):  # one window fewer than the prompts expect
        _forward(
            model,
            batch,
            input_features=batch["input_features"][:1],
            feature_lengths=batch["feature_lengths"][:1],
        )
    with pytest.raises(ValueError, match="no audio"):
        _forward(model, batch, input_features=None, feature_lengths=None)


# --------------------------------------------------------------------------------------- token counting

COUNT_LENGTHS = [1, 159, 160, 161, 16000, 479_999, 480_000, 480_001]


@pytest.mark.parametrize(
    "projector",
    [
        functools.partial(MLPStackProjector, stack_factor=4, hidden_dim=128),
        functools.partial(AvgPoolProjector, pool=2),
    ],
    ids=["mlp_stack4", "avgpool2"],
)
def test_audio_token_counter_matches_embed_audio(make_model, projector):
    model = make_model(projector=projector).eval()
    counter = model.audio_token_counter()
    rng = np.random.default_rng(0)
    clip_windows = [counter.window_lengths(n) for n in COUNT_LENGTHS]
    assert [sum(w) for w in clip_windows] == COUNT_LENGTHS
    lengths = torch.tensor([w for windows in clip_windows for w in windows])  # (W,)
    audio = torch.from_numpy(
        (0.1 * rng.standard_normal((len(lengths), int(lengths.max())))).astype(np.float32)
    )
    with torch.no_grad():
        features, feature_lengths = model.compute_features(audio, lengths)  # one batched log-mel call
        start = 0
        for n, windows in zip(COUNT_LENGTHS, clip_windows):
            idx = slice(start, start + len(windows))
            start += len(windows)
            frames = int(feature_lengths[idx].max())
            embeddings = model.embed_audio(
                features[idx, :, :frames], feature_lengths[idx]
            )  # (N_audio, D_llm)
            assert embeddings.shape == (counter(n), model.llm.config.hidden_size), n


def test_audio_token_counter_arithmetic():
    stack4 = AudioTokenCounter(encoder_downsample=2, projector_downsample=4)
    avgpool2 = AudioTokenCounter(encoder_downsample=2, projector_downsample=2)
    # 480000 samples -> 3000 log-mel frames -> 1500 encoder frames -> 375 (stack 4) / 750 (avg-pool 2) tokens
    assert stack4.tokens_per_window(480_000) == 375
    assert avgpool2.tokens_per_window(480_000) == 750
    fifteen_minutes = 15 * 60 * 16000
    assert fifteen_minutes == 14_400_000
    assert stack4.window_lengths(fifteen_minutes) == [480_000] * 30
    assert stack4(fifteen_minutes) == 30 * 375
    assert avgpool2(fifteen_minutes) == 30 * 750 == 22_500
    assert [stack4(n) for n in (1, 159, 160, 161, 320, 321)] == [1, 1, 1, 1, 1, 1]
    assert [avgpool2(n) for n in (1, 160, 320, 321, 640, 641)] == [1, 1, 1, 1, 1, 2]
    assert stack4(480_001) == 375 + 1
    with pytest.raises(ValueError):
        stack4(0)


# ---------------------------------------------------------------------------------------------- freezing


def _components_in_eval(model: AeroModel, name: str) -> bool:
    return not any(m.training for m in getattr(model, name).modules())


def test_freeze_encoder_and_llm(make_model):
    model = make_model(freeze=["^encoder\\.", "^llm\\."])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("projector.") for n in trainable)
    assert {n for n, _ in model.projector.named_parameters()} == {
        n.removeprefix("projector.") for n in trainable
    }
    model.train()
    assert _components_in_eval(model, "encoder") and _components_in_eval(model, "llm")
    assert all(m.training for m in model.projector.modules())
    model.eval()
    model.train(True)
    assert _components_in_eval(model, "encoder") and _components_in_eval(model, "llm")


def test_freeze_pattern_matching_nothing_raises(make_model):
    with pytest.raises(ValueError, match="match no parameter"):
        make_model(freeze=["^encoder\\.", "^decoder\\."])


def test_unfreeze_makes_matching_frozen_parameters_trainable_and_leaves_eval_mode(make_model):
    model = make_model(freeze=["^encoder\\.", "^llm\\."]).train()
    table = "encoder.encoder.embed_positions.weight"  # fixed by the adapter (sinusoids), not by freeze
    encoder_names = sorted(n for n, _ in model.named_parameters() if n.startswith("encoder.") and n != table)
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert _unfreeze(model, ["^encoder\\."]) == encoder_names
    frozen_after = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_after == frozen_before - set(encoder_names)
    assert table in frozen_after and any(n.startswith("llm.") for n in frozen_after)
    assert all(m.training for m in model.encoder.modules())
    assert _components_in_eval(model, "llm")
    with pytest.raises(ValueError, match=r"\['\^encoder\\\\.'\] match no frozen parameter"):
        _unfreeze(model, ["^encoder\\.", "^llm\\."])  # the encoder is trainable now


def test_ctc_term_is_skipped_while_encoder_and_head_are_frozen(make_model, make_samples, make_batch):
    model = make_model(ctc_weight=0.3, freeze=["^encoder\\.", "^ctc_head\\."]).train()
    batch = make_batch(model, make_samples([0.7, 2.3]))
    assert _forward(model, batch).ctc_loss is None  # no gradient could reach a weight
    _unfreeze(model, ["^ctc_head\\."])
    assert _forward(model, batch).ctc_loss > 0


def test_frozen_encoder_and_llm_with_gradient_checkpointing(make_model, make_samples, make_batch):
    model = make_model(freeze=["^encoder\\.", "^llm\\."], gradient_checkpointing=True).train()
    batch = make_batch(model, make_samples([0.7, 2.3]))
    _forward(model, batch).loss.backward()
    assert model.projector.fc1.weight.grad.abs().sum() > 0
    assert model.projector.fc2.weight.grad.abs().sum() > 0
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


def test_frozen_encoder_with_checkpointed_llm_trains_every_llm_layer(make_model, make_samples, make_batch):
    """transformers issues 21381 / 23170: reentrant checkpointing after a frozen module yields no gradients."""
    model = make_model(freeze=["^encoder\\."], gradient_checkpointing=True).train()
    assert model.llm.is_activation_checkpointing and model.llm.model.training
    batch = make_batch(model, make_samples([0.7, 2.3]))
    _forward(model, batch).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    for layer in model.llm.model.layers:
        assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.projector.fc1.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make_model, make_samples, make_batch):
    samples = make_samples([0.7, 2.3])
    results = []
    for checkpointing in (False, True):
        model = make_model(gradient_checkpointing=checkpointing).train()
        if checkpointing:
            assert model.llm.is_activation_checkpointing
            assert all(layer.gradient_checkpointing for layer in model.encoder.encoder.layers)
        out = _forward(model, make_batch(model, samples))
        out.loss.backward()
        results.append(
            (out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        )
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        assert grads_ckpt[name] is not None, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ architecture


def test_check_architecture_names_mismatching_field(make_model):
    with pytest.raises(ValueError, match="d_model") as err:
        make_model(encoder_kwargs={"expect": {"d_model": 1280, "num_mel_bins": 80}})
    assert "num_mel_bins" not in str(err.value)  # only mismatching fields are listed
    with pytest.raises(ValueError, match="hidden_size"):
        make_model(llm_kwargs={"expect": {"hidden_size": 1536}})
    make_model(
        encoder_kwargs={"expect": {"d_model": 64, "num_mel_bins": 80}},
        llm_kwargs={"expect": {"hidden_size": 64}},
    )


# ------------------------------------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    ("projector", "padding_free"),
    [
        (functools.partial(MLPStackProjector, stack_factor=4, hidden_dim=128), True),
        (functools.partial(AvgPoolProjector, pool=2), False),
    ],
    ids=["mlp_stack4", "avgpool2_padded"],
)
def test_save_and_load_pretrained_roundtrip(
    make_model, make_samples, make_batch, tmp_path, projector, padding_free
):
    model = make_model(projector=projector, encoder_kwargs={"padding_free": padding_free}).eval()
    with torch.no_grad():  # make the projector distinguishable from a fresh init
        for p in model.projector.parameters():
            p.add_(0.5)
    batch = make_batch(model, make_samples([0.7, 2.3]))
    with torch.no_grad():
        expected = _forward(model, batch).logits
    save_pretrained(model, tmp_path / "aero")
    loaded = from_pretrained(tmp_path / "aero").eval()
    assert type(loaded.projector) is type(model.projector)
    assert loaded.projector.downsample == model.projector.downsample
    assert loaded.encoder.padding_free == padding_free
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    with torch.no_grad():
        actual = _forward(loaded, batch).logits
    assert torch.equal(actual, expected)


def test_from_pretrained_without_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="aero_config.json"):
        from_pretrained(tmp_path)


def test_whisper_encoder_loads_from_encoder_only_and_full_checkpoints(tiny_dir, tmp_path):
    reference = PaddingFreeWhisperEncoder.from_pretrained(tiny_dir / "encoder")
    full = WhisperForConditionalGeneration(reference.config)
    full.model.encoder.load_state_dict(reference.state_dict())
    full.save_pretrained(tmp_path / "whisper_full")

    features = torch.randn(2, reference.config.num_mel_bins, 400)
    feature_lengths = torch.tensor([400, 123])
    expected_sd = reference.state_dict()
    outputs = []
    for folder in (tiny_dir / "encoder", tmp_path / "whisper_full"):
        _, info = PaddingFreeWhisperEncoder.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"], (folder, info["missing_keys"])
        encoder = WhisperAudioEncoder.from_pretrained(str(folder)).eval()
        state = encoder.encoder.state_dict()
        assert state.keys() == expected_sd.keys()
        assert all(torch.equal(state[k], expected_sd[k]) for k in state), folder
        with torch.no_grad():
            outputs.append(encoder(features, feature_lengths)[0])
    assert torch.equal(outputs[0], outputs[1])


# -------------------------------------------------------------------------------------------- generation


def _sharpen(model: AeroModel, scale: float = 20.0) -> None:
    """Scale the random LLM's matrices so greedy decoding varies from step to step (not one repeated token)."""
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.ndim >= 2:
                p.mul_(scale)


def test_generate_shape(model, make_samples, make_batch):
    model.eval()
    batch = make_batch(model, make_samples([0.7, 2.3, 5.1]), for_generation=True)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    generated = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        batch["input_features"],
        batch["feature_lengths"],
        max_new_tokens=6,
    )
    assert generated.dim() == 2 and generated.shape[0] == 3
    assert 1 <= generated.shape[1] <= 6


def test_greedy_generate_batch_equals_single(model, make_samples, make_batch):
    """Left padding must not change greedy results: same tokens and scores as each prompt decoded alone."""
    model.eval()
    _sharpen(model)
    samples = make_samples([0.7, 2.3, 5.1])

    def decode(batch_samples):
        batch = make_batch(model, batch_samples, for_generation=True)
        return model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["input_features"],
            batch["feature_lengths"],
            max_new_tokens=8,
            output_scores=True,
            return_dict_in_generate=True,
        )

    together = decode(samples)
    assert (
        len(set(together.sequences[:, 0].tolist()) | set(together.sequences[0].tolist())) > 1
    )  # not degenerate
    for i, sample in enumerate(samples):
        alone = decode([sample])
        n = alone.sequences.shape[1]
        assert torch.equal(together.sequences[i, :n], alone.sequences[0]), i
        for step, (scores_batch, scores_alone) in enumerate(zip(together.scores[:n], alone.scores)):
            torch.testing.assert_close(
                scores_batch[i], scores_alone[0], rtol=1e-4, atol=1e-4, msg=f"{i} {step}"
            )


# ------------------------------------------------------------------------------------------ auxiliary CTC


def test_ctc_loss_off_by_default(model, make_samples, make_batch):
    out = _forward(model, make_batch(model, make_samples([1.0, 2.0])))
    assert out.ctc_loss is None


def test_ctc_loss_equals_per_row_reference(make_model, make_samples, make_batch):
    model = make_model(ctc_weight=0.5)
    # the 31 s clip has two windows: its CTC input is the concatenation of both windows' frames
    batch = make_batch(model, make_samples([1.3, 31.0, 1.7]))
    out = _forward(model, batch)
    assert out.ctc_loss is not None and torch.isfinite(out.ctc_loss)

    # reference: each clip alone through the encoder, its frames through the CTC head
    total, n_targets = 0.0, 0
    for sample in make_samples([1.3, 31.0, 1.7]):
        single = make_batch(model, [sample])
        hidden, lengths = model.encoder(single["input_features"], single["feature_lengths"])
        frames = torch.cat([h[:n] for h, n in zip(hidden, lengths.tolist())])  # (T, D)
        labels = single["labels"][0]
        target = labels[(labels != -100) & (labels != model.end_of_turn_id)]
        log_probs = model.ctc_head(frames).float().log_softmax(-1)[:, None]  # (T, 1, V)
        total = total + torch.nn.functional.ctc_loss(
            log_probs,
            target[None],
            [len(frames)],
            [len(target)],
            blank=model.tokenizer.pad_token_id,
            reduction="sum",
        )
        n_targets += len(target)
    torch.testing.assert_close(out.ctc_loss, total / n_targets, rtol=1e-4, atol=1e-5)

    # CTC alone trains the encoder and its head, and nothing after the encoder
    out.ctc_loss.backward()
    assert model.encoder.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.ctc_head.weight.grad.abs().sum() > 0
    assert model.projector.fc1.weight.grad is None


def test_ctc_only_loss_is_the_ctc_loss_and_freezes_projector_and_llm(make_model, make_samples, make_batch):
    batch = make_batch(make_model(ctc_weight=0.5), make_samples([1.3, 2.1]))
    hybrid = _forward(make_model(ctc_weight=0.5), batch)
    model = make_model(ctc_weight=1.0, ctc_only=True)
    out = _forward(model, batch)
    labels = batch["labels"]
    n_ctc_targets = int(((labels != -100) & (labels != model.end_of_turn_id)).sum())
    assert int(out.ctc_target_tokens) == n_ctc_targets
    # same seed, same encoder and head: the per-token loss is the hybrid model's CTC term
    torch.testing.assert_close(out.ctc_loss, hybrid.ctc_loss, rtol=1e-5, atol=1e-6)
    assert out.loss_sum is None and out.logits is None  # the LLM is not run
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.projector.parameters())
    out.ctc_loss.backward()
    assert model.encoder.encoder.conv1.weight.grad.abs().sum() > 0


def test_ctc_only_needs_a_ctc_weight(make_model):
    with pytest.raises(ValueError, match="ctc_weight"):
        make_model(ctc_only=True)


def test_init_from_copies_only_the_included_weights(make_model, tmp_path):
    source = make_model(ctc_weight=1.0)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, ckpt)

    fresh = make_model(ctc_weight=1.0)
    target = make_model(ctc_weight=1.0, init_from={"ckpt": str(tmp_path / "run"), "include": [r"^encoder\."]})
    for name, value in target.state_dict().items():
        expected = source.state_dict()[name] if name.startswith("encoder.") else fresh.state_dict()[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)

    with pytest.raises(ValueError, match="matches no weight"):
        load_weights_from(target, ckpt, [r"^no_such_module\."])
