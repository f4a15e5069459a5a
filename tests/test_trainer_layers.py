"""The shared layers: CPU dropout, causal attention with dropout, the one-slot pooling shortcut."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.config import M2SEConfig
from trainer.layers import Dropout, TransformerLayer, causal_attention, dropout
from trainer.model import AttentionPooling


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_zeroes_a_fraction_p_and_keeps_the_mean(p: float) -> None:
    torch.manual_seed(0)
    x = torch.full((400, 500), 3.0, requires_grad=True)
    y = dropout(x, p, True)
    zero = (y == 0).float().mean().item()
    assert zero == pytest.approx(p, abs=0.005)
    assert sorted(torch.unique(y).tolist()) == [0.0, pytest.approx(3.0 / (1 - p))]
    assert y.mean().item() == pytest.approx(3.0, rel=0.01)
    y.sum().backward()  # the gradient is the same mask, scaled
    assert torch.equal(x.grad == 0, y == 0)
    assert x.grad[y != 0].unique().tolist() == [pytest.approx(1 / (1 - p))]


def test_dropout_is_the_identity_in_eval_and_at_p_zero_and_drops_all_at_one() -> None:
    x = torch.randn(5, 7)
    layer = Dropout(0.5).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


def test_causal_attention_matches_sdpa_and_never_looks_ahead_with_dropout() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 4) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention(q, k, v, 0.3, False), ref, atol=1e-6)
    assert torch.allclose(causal_attention(q, k, v, 0.0, True), ref, atol=1e-6)
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = causal_attention(q, k2, v2, 0.3, True)
    out[:, :, 2].sum().backward()  # position 2 attends to 0..2 only
    assert torch.equal(k2.grad[:, :, 3:], torch.zeros_like(k2.grad[:, :, 3:]))
    assert torch.equal(v2.grad[:, :, 3:], torch.zeros_like(v2.grad[:, :, 3:]))
    assert v2.grad[:, :, :3].abs().sum() > 0


def test_transformer_layer_trains_with_dropout_and_is_deterministic_in_eval() -> None:
    torch.manual_seed(0)
    layer = TransformerLayer(M2SEConfig(hidden_dropout=0.5, attn_dropout=0.5))
    x = torch.randn(4, 5, 64)
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # two dropout draws
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_one_slot_pooling_is_the_identity_and_equals_the_general_path() -> None:
    torch.manual_seed(0)
    pool = AttentionPooling(8, 4)
    x = torch.randn(5, 1, 8)
    mask = torch.tensor([[True], [False], [True], [True], [False]])
    pooled, w = pool(x, mask)
    assert torch.equal(pooled[0], x[0, 0]) and torch.equal(pooled[1], torch.zeros(8))
    assert w.squeeze(1).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    # The general path (a second, padding slot) gives the same pooled vectors and weights.
    pad = torch.cat([x, torch.randn(5, 1, 8)], 1)
    pad_mask = torch.cat([mask, torch.zeros(5, 1, dtype=torch.bool)], 1)
    pooled2, w2 = pool(pad, pad_mask)
    assert torch.allclose(pooled, pooled2) and torch.equal(w[:, 0], w2[:, 0])
