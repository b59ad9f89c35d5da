"""Packed attention: a packed row equals its documents run alone, in the encoder and the LLM."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

from aero_lightning.data.packing import collate_packed, collate_padded
from aero_lightning.model import attention

DURATIONS = [0.7, 2.3, 1.1]


def _encoded(model, make_encoded, durations=DURATIONS):
    return make_encoded(model.tokenizer, model.audio_token_counter(), durations)


def _packed_forward(model, samples):
    batch = collate_packed(samples, model.audio_token_counter())
    return model.forward_batch(batch, return_logits=True), batch


def _alone_forward(model, sample):
    batch = collate_padded([sample], model.audio_token_counter(), pad_id=model.tokenizer.pad_token_id)
    return model.forward_batch(batch, return_logits=True)


def _pair(make_model, backend):
    packed = make_model(attn_implementation=backend)
    reference = make_model(attn_implementation="sdpa")
    reference.load_state_dict(packed.state_dict())
    for m in (packed, reference):
        m.train()
        m.encoder.encoder.config.dropout = 0.0
    return packed, reference


@pytest.mark.parametrize("backend", ["varlen", "sdpa", "eager"])
def test_packed_logits_loss_and_grads_equal_documents_alone(make_model, make_encoded, backend):
    packed_model, reference = _pair(make_model, backend)
    samples = _encoded(packed_model, make_encoded)
    out, batch = _packed_forward(packed_model, samples)
    out.loss_sum.backward()
    cu = batch["cu_seqlens"].tolist()
    total = 0.0
    for d, s in enumerate(samples):
        alone = _alone_forward(reference, s)
        torch.testing.assert_close(out.logits[0, cu[d] : cu[d + 1]], alone.logits[0], atol=1e-5, rtol=1e-5)
        alone.loss_sum.backward()  # gradients accumulate over the documents
        total += float(alone.loss_sum.detach())
    assert float(out.loss_sum.detach()) == pytest.approx(total, rel=1e-5)
    grads = dict(reference.named_parameters())
    checked = 0
    for name, p in packed_model.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked > 20  # encoder, projector and LLM weights all got gradients


def test_encoder_packed_windows_equal_windows_alone(make_model, make_encoded):
    packed_model, reference = _pair(make_model, "varlen")
    packed_model.eval()
    reference.eval()
    batch = collate_padded(
        _encoded(packed_model, make_encoded, [0.7, 31.0, 2.3]), packed_model.audio_token_counter(), 0
    )
    feats, lens = packed_model.compute_features(batch["audio_pcm"], batch["window_lengths"])
    hidden, out_lens = packed_model.encoder(feats, lens)  # packed: one row, window cu_seqlens
    for w in range(feats.shape[0]):
        alone, alone_len = reference.encoder(feats[w : w + 1, :, : int(lens[w])], lens[w : w + 1])
        n = int(out_lens[w])
        assert n == int(alone_len[0])
        torch.testing.assert_close(hidden[w, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_perturbing_one_document_changes_no_other(make_model, make_encoded):
    model = make_model(attn_implementation="varlen").eval()
    samples = _encoded(model, make_encoded)
    base, batch = _packed_forward(model, samples)
    changed = [dict(s) for s in samples]
    changed[1]["waveform"] = changed[1]["waveform"][::-1].copy()  # same length, different audio
    changed[1]["input_ids"] = list(changed[1]["input_ids"])
    changed[1]["input_ids"][-3] = (changed[1]["input_ids"][-3] + 1) % 50 + 10  # and a different reply token
    other, _ = _packed_forward(model, changed)
    cu = batch["cu_seqlens"].tolist()
    assert torch.equal(base.logits[0, cu[0] : cu[1]], other.logits[0, cu[0] : cu[1]])
    assert torch.equal(base.logits[0, cu[2] : cu[3]], other.logits[0, cu[2] : cu[3]])
    assert not torch.allclose(base.logits[0, cu[1] : cu[2]], other.logits[0, cu[1] : cu[2]])


def test_varlen_backend_builds_no_dense_mask(make_model, make_encoded, monkeypatch):
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, "cu_seq_lens_q" in kwargs, query.shape[2]))
        return attention.varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "varlen", spy)
    model = make_model(attn_implementation="varlen").eval()
    samples = _encoded(model, make_encoded)
    out, batch = _packed_forward(model, samples)
    n_layers = model.encoder.config.encoder_layers + model.llm.config.num_hidden_layers
    assert len(seen) == n_layers
    assert all(mask is None and has_cu for mask, has_cu, _ in seen)
    assert seen[-1][2] == batch["input_ids"].shape[1]  # the LLM saw the whole packed row at once


def test_varlen_without_cu_seqlens_is_sdpa(make_model, make_samples, make_batch):
    """Padded batches and generation take transformers' sdpa path, masks included."""
    varlen = make_model(attn_implementation="varlen").eval()
    sdpa = make_model(attn_implementation="sdpa").eval()
    sdpa.load_state_dict(varlen.state_dict())
    batch = make_batch(varlen, make_samples([0.7, 2.3, 1.1]))
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "feature_lengths", "labels")}
    a, b = varlen(**kw), sdpa(**kw)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(a.logits[mask], b.logits[mask], atol=1e-5, rtol=1e-5)


def test_packed_attention_rejects_a_batch_dimension():
    q = torch.zeros(2, 2, 4, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="batch 1"):
        attention.varlen_attention_forward(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 4]))


def test_frozen_encoder_and_llm_packed_checkpointed_train_the_projector(make_model, make_encoded):
    """tiny-audio setting on the training path: packed row, varlen, checkpointing, chunked loss."""
    model = make_model(
        attn_implementation="varlen", freeze=["^encoder\\.", "^llm\\."], gradient_checkpointing=True
    ).train()
    batch = collate_packed(_encoded(model, make_encoded), model.audio_token_counter())
    out = model.forward_batch(batch)  # the training path: chunked loss, no logits
    out.loss.backward()
    assert model.projector.fc1.weight.grad.abs().sum() > 0 and model.projector.fc2.weight.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "flash_attention_2"])
def test_gpu_packed_backend_matches_per_document_reference(make_model, make_encoded, backend):
    """On CUDA in bf16 the packed kernels (torch varlen / flash-attn) match one SDPA call per document."""
    if backend == "flash_attention_2":
        pytest.importorskip("flash_attn")
    fast = make_model(attn_implementation=backend).cuda().to(torch.bfloat16).eval()
    samples = _encoded(fast, make_encoded)
    batch = {
        k: v.cuda() if torch.is_tensor(v) else v
        for k, v in collate_packed(samples, fast.audio_token_counter()).items()
    }
    feats, lens = fast.compute_features(batch["audio_pcm"], batch["window_lengths"])
    kw = dict(input_ids=batch["input_ids"], input_features=feats.to(torch.bfloat16), feature_lengths=lens,
              labels=batch["labels"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])  # fmt: skip
    out = fast(**kw)
    fast.llm.config._attn_implementation = "sdpa"  # the dense per-document reference on the same weights
    fast.encoder.encoder.config._attn_implementation = "sdpa"
    ref = fast(**kw)
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), atol=5e-2, rtol=5e-2)


def test_autocast_keeps_the_packed_llm_on_the_fused_kernel(make_model, make_encoded, monkeypatch):
    """Under autocast Qwen2's rotary output is fp32 while v is bf16: q, k, v must be cast to the autocast dtype, or
    every layer silently leaves the one fused varlen call for the per-document loop (plus a host sync).

    The fused kernel is CUDA-only, so it is stood in for by a recording reference on the CPU."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append((q.dtype, k.dtype, v.dtype, tuple(cu_q.tolist())))
        lengths = torch.diff(cu_q).tolist()
        outs = [
            torch.nn.functional.scaled_dot_product_attention(
                qd.transpose(0, 1),
                kd.transpose(0, 1),
                vd.transpose(0, 1),
                is_causal=True,
                scale=scale,
                enable_gqa=enable_gqa,
            ).transpose(0, 1)
            for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths))
        ]
        return torch.cat(outs)  # (L, H, d)

    # loading an exported model (remote code) registers its own copy of this module's "varlen": use ours
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.VARLEN, attention.varlen_attention_forward)
    monkeypatch.setattr(attention, "varlen_attn", fake_varlen)
    monkeypatch.setattr(attention, "_varlen_kernel_applies", lambda q, dropout: q.dtype == torch.bfloat16)
    model = make_model(attn_implementation="varlen").eval()
    batch = collate_packed(_encoded(model, make_encoded), model.audio_token_counter())
    features, lengths = model.compute_features(batch["audio_pcm"], batch["window_lengths"])
    encoded = model.encode_audio(features, lengths)
    inputs_embeds = model.build_inputs_embeds(batch["input_ids"], encoded)
    cu = tuple(batch["cu_seqlens"].tolist())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.llm(
            inputs_embeds=inputs_embeds,
            position_ids=batch["position_ids"],
            use_cache=False,
            **attention.packed_attention_kwargs(batch["cu_seqlens"]),
        )
    # one fused call per decoder layer over the whole row, all in bf16
    assert calls == [(torch.bfloat16,) * 3 + (cu,)] * model.llm.config.num_hidden_layers
