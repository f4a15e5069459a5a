"""M2SE pieces on hand-built tensors: pooling, MoE, mixup, item drop, causal encoder, switches."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import M2SEConfig
from trainer.data import FeatureStack
from trainer.model import M2SE, AttentionPooling, MoEAdaptor, complementary_mixup, item_drop


def _pool_2d() -> AttentionPooling:
    pool = AttentionPooling(2, 2, "relu")
    with torch.no_grad():
        pool.proj.weight.copy_(torch.eye(2))
        pool.proj.bias.zero_()
        pool.score.weight.fill_(1.0)
        pool.score.bias.zero_()
    return pool  # energy(x) = relu(x1) + relu(x2)


def test_pooling_hand_computed_and_ignores_padding() -> None:
    pool = _pool_2d()
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # slot 3 is padding
    mask = torch.tensor([[True, True, False]])
    pooled, w = pool(x, mask)
    w1, w2 = math.e / (math.e + math.e**2), math.e**2 / (math.e + math.e**2)
    assert w[0].tolist() == pytest.approx([w1, w2, 0.0], rel=1e-6)
    assert pooled[0].tolist() == pytest.approx([w1 * 1.0, w2 * 2.0], rel=1e-6)
    # Whatever sits in the padding slot changes nothing.
    x2 = x.clone()
    x2[0, 2] = torch.tensor([-50.0, 1e4])
    assert torch.equal(pool(x2, mask)[0], pooled)


def test_pooling_item_without_vectors_is_zero_and_finite() -> None:
    pool = _pool_2d()
    x = torch.randn(2, 3, 2)
    mask = torch.tensor([[False, False, False], [True, False, False]])
    pooled, w = pool(x, mask)
    assert torch.equal(pooled[0], torch.zeros(2)) and torch.equal(w[0], torch.zeros(3))
    assert torch.allclose(pooled[1], x[1, 0]) and w[1, 0].item() == pytest.approx(1.0)
    pooled.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_moe_with_zero_gate_is_mean_of_experts() -> None:
    torch.manual_seed(0)
    moe = MoEAdaptor(dim=6, hidden=4, n_experts=3, dropout=0.2, eps=1e-12, init_std=0.5).eval()
    x = torch.randn(5, 6)
    z = moe.experts(x).view(5, 3, 4)
    z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-12)
    assert torch.allclose(moe(x), z.mean(1), atol=1e-5)
    # A gate favouring expert 2 moves the output to that expert's LayerNorm output.
    with torch.no_grad():
        moe.gate[:, 2] = 100.0
    x_pos = x.abs()  # x @ gate large and positive for expert 2
    zp = moe.experts(x_pos).view(5, 3, 4)
    zp = (zp - zp.mean(-1, keepdim=True)) / torch.sqrt(
        zp.var(-1, unbiased=False, keepdim=True) + 1e-12
    )
    assert torch.allclose(moe(x_pos), zp[:, 2], atol=1e-4)


def test_mixup_mirrors_swapped_positions_and_never_touches_padding() -> None:
    B, L, H = 4, 6, 3
    text = torch.arange(B * L * H, dtype=torch.float32).view(B, L, H)
    image = -text - 1000.0
    lengths = torch.tensor([6, 4, 1, 3])
    valid = torch.arange(L)[None, :] < lengths[:, None]
    g = torch.Generator().manual_seed(3)
    mt, mi, m = complementary_mixup(text, image, valid, 0.5, g)
    mb = m.bool()
    assert mb.any() and (valid & ~mb).any()  # some swapped, some kept
    assert not (mb & ~valid).any()
    # Swapped positions mirror each other; the others keep their own modality.
    assert torch.equal(mt[mb], image[mb]) and torch.equal(mi[mb], text[mb])
    assert torch.equal(mt[~mb], text[~mb]) and torch.equal(mi[~mb], image[~mb])
    # p = 1 swaps every valid position and still no padding position.
    mt1, mi1, m1 = complementary_mixup(text, image, valid, 1.0)
    assert torch.equal(m1.bool(), valid)
    assert torch.equal(mt1[~valid], text[~valid]) and torch.equal(mi1[~valid], image[~valid])


def test_item_drop_compacts_keeps_first_and_maps_prefixes() -> None:
    inputs = torch.tensor([[5, 6, 7, 8, 9, 0], [3, 4, 0, 0, 0, 0]])
    same, pm = item_drop(inputs, 0.0)
    assert torch.equal(same, inputs)
    assert pm.tolist() == [[0, 1, 2, 3, 4, 4], [0, 1, 1, 1, 1, 1]]  # padding maps to the last item
    only_first, pm1 = item_drop(inputs, 1.0)
    assert only_first.tolist() == [[5, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0]]
    assert pm1.tolist() == [[0] * 6, [0] * 6]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 100, (64, 12))
    x[:, 9:] = 0
    d, pm = item_drop(x, 0.4, g)
    for b in range(64):
        kept = [int(v) for v in d[b] if v > 0]
        orig = [int(v) for v in x[b] if v > 0]
        assert kept[0] == orig[0]
        it = iter(orig)
        assert all(k in it for k in kept)  # an ordered subsequence
        assert (d[b, len(kept) :] == 0).all()
        for t in range(9):  # output at pm[t] sees exactly the kept items of prefix [0..t]
            assert (
                kept[: int(pm[b, t]) + 1]
                == [v for v in kept if v in orig[: t + 1]][: int(pm[b, t]) + 1]
            )
    assert (d > 0).sum() < (x > 0).sum()


def _feats(n_items: int, d: int, seed: int = 0) -> dict[str, FeatureStack]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, S in (("text", 3), ("image", 2)):
        v = torch.randn(n_items + 1, S, d, generator=g).half()
        mask = torch.rand(n_items + 1, S, generator=g) < 0.7
        mask[:, 0] = True
        v[0], mask[0] = 0, False
        out[m] = FeatureStack(v, mask)
    return out


def test_causal_encoder_ignores_later_positions() -> None:
    torch.manual_seed(0)
    model = M2SE(M2SEConfig(), n_items=10, dim=8).eval()
    x = torch.randn(2, 7, 64)
    inputs = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [3, 3, 0, 0, 0, 0, 0]])
    out = model.encode(x, inputs)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 3, 64)
    out2 = model.encode(x2, inputs)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6)
    assert not torch.allclose(out[:, 4], out2[:, 4])


def test_pretrain_and_finetune_losses_reach_the_poolers() -> None:
    torch.manual_seed(0)
    feats = _feats(12, 8)
    inputs = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    targets = torch.tensor([[2, 3, 4, 9, 0], [6, 7, 1, 0, 0], [9, 10, 11, 12, 1]])
    model = M2SE(M2SEConfig(), n_items=12, dim=8, max_len=5).train()
    out = model.pretrain_loss(feats, inputs, targets, 0.07, 0.01)
    assert set(out.terms) == {"nip_text", "nip_image", "cmcl"} and out.n_targets == 12
    out.loss.backward()
    for m in ("text", "image"):
        assert model.pool[m].proj.weight.grad.abs().sum() > 0
        assert model.pool[m].score.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.add_item_embedding()
    ft = model.finetune_loss(feats, inputs, targets, 0.07)
    ft.loss.backward()
    assert model.pool["text"].proj.weight.grad.abs().sum() > 0
    assert model.item_embedding.weight.grad[1:].abs().sum() > 0
    assert model.item_embedding.weight.grad[0].abs().sum() == 0  # padding row


def test_ablation_switches() -> None:
    torch.manual_seed(0)
    feats = _feats(6, 4)
    inputs = torch.tensor([[1, 2, 3], [4, 5, 0]])
    targets = torch.tensor([[2, 3, 4], [5, 6, 0]])
    text_only = M2SE(M2SEConfig(modalities="text"), n_items=6, dim=4, max_len=3)
    assert set(text_only.pool) == {"text"}
    assert set(text_only.pretrain_loss(feats, inputs, targets, 0.07, 0.01).terms) == {"nip_text"}
    image_only = M2SE(M2SEConfig(modalities="image"), n_items=6, dim=4, max_len=3)
    assert set(image_only.pretrain_loss(feats, inputs, targets, 0.07, 0.01).terms) == {"nip_image"}
    both = M2SE(M2SEConfig(), n_items=6, dim=4, max_len=3)
    assert (
        "cmcl" not in both.pretrain_loss(feats, inputs, targets, 0.07, 0.01, use_cmcl=False).terms
    )
    # Mixup off, item drop off, eval mode: two calls give the same loss (no random augmentation
    # left but dropout, switched off by eval()); with mixup on in train mode they differ.
    quiet = M2SE(
        M2SEConfig(
            mixup=False,
            item_drop_max=0.0,
            hidden_dropout=0.0,
            attn_dropout=0.0,
            adaptor_dropout=0.0,
        ),
        6,
        4,
        3,
    ).train()
    a = quiet.pretrain_loss(feats, inputs, targets, 0.07, 0.01).loss
    b = quiet.pretrain_loss(feats, inputs, targets, 0.07, 0.01).loss
    assert a.item() == b.item()
    noisy = M2SE(
        M2SEConfig(
            mixup_max=0.99,
            item_drop_max=0.0,
            hidden_dropout=0.0,
            attn_dropout=0.0,
            adaptor_dropout=0.0,
        ),
        6,
        4,
        3,
    ).train()
    noisy.load_state_dict(quiet.state_dict())
    losses = {
        round(noisy.pretrain_loss(feats, inputs, targets, 0.07, 0.01).loss.item(), 6)
        for _ in range(6)
    }
    assert len(losses) > 1
    with pytest.raises(ValueError, match="modalities"):
        M2SEConfig(modalities="audio")


def test_the_id_embedding_starts_at_its_configured_scale() -> None:
    for std, want in ((None, 0.02), (0.5, 0.5)):
        m = M2SE(M2SEConfig(id_init_std=std), n_items=2000, dim=8, id_embedding=True)
        w = m.item_embedding.weight.detach()
        assert abs(float(w[1:].std()) - want) < 0.05 * want and not w[0].any()
