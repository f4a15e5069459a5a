"""NIP, CMCL and the full softmax against direct re-computations on tiny hand-built batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.objectives import chunked_cross_entropy, cmcl_loss, full_softmax_loss, nip_loss


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def nip_direct(h: torch.Tensor, e: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's N x N InfoNCE, written out row by row: positive e_i, negatives e_j with t_j != t_i."""
    losses = []
    for i in range(len(h)):
        pos = math.exp(float(h[i] @ e[i]) / tau)
        den = pos + sum(
            math.exp(float(h[i] @ e[j]) / tau)
            for j in range(len(h))
            if j != i and targets[j] != targets[i]
        )
        losses.append(-math.log(pos / den))
    return torch.tensor(sum(losses) / len(losses))


def test_nip_two_rows_by_hand() -> None:
    # h = e1 direction, targets differ: loss_1 = -log(e^{1/t} / (e^{1/t} + e^{0/t})).
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    want = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    got = nip_loss(h, e, torch.tensor([3, 7]), tau)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # Same target for both rows: each row's only candidate is its positive -> loss exactly 0.
    same = nip_loss(h, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([3, 3]), tau)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_nip_equals_direct_recomputation_with_repeated_targets() -> None:
    targets = torch.tensor([5, 2, 5, 9, 2, 5, 1])
    table = {t: v for t, v in zip([1, 2, 5, 9], _unit(4, 8, seed=1), strict=True)}
    e = torch.stack([table[int(t)] for t in targets])  # rows with the same target share a vector
    h = _unit(len(targets), 8, seed=2)
    tau = 0.07
    got = nip_loss(h, e, targets, tau)
    want = nip_direct(h, e, targets, tau)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # Masking matters: without it (all other rows as negatives) the loss differs.
    unmasked = F.cross_entropy(h @ e.T / tau, torch.arange(len(h)))
    assert abs(unmasked.item() - got.item()) > 1e-3


def test_nip_gradients_match_autograd_of_direct_formula() -> None:
    targets = torch.tensor([4, 1, 4, 3])
    base = _unit(3, 6, seed=3)
    idx = torch.tensor([2, 0, 2, 1])
    h = _unit(4, 6, seed=4).requires_grad_()
    b1 = base.clone().requires_grad_()
    nip_loss(h, b1[idx], targets, 0.1).backward()
    h2 = h.detach().clone().requires_grad_()
    b2 = base.clone().requires_grad_()
    e = b2[idx]
    logits = h2 @ e.T / 0.1
    mask = (targets[:, None] == targets[None, :]) & ~torch.eye(4, dtype=torch.bool)
    F.cross_entropy(logits.masked_fill(mask, float("-inf")), torch.arange(4)).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5)
    assert torch.allclose(b1.grad, b2.grad, atol=1e-5)


def cmcl_direct(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor, tau: float) -> float:
    """Symmetric NT-Xent, row by row: anchor a_i, positive b_i, negatives a_j and b_j of other-target rows."""

    def one(x: torch.Tensor, y: torch.Tensor) -> float:
        total = 0.0
        for i in range(len(x)):
            pos = math.exp(float(x[i] @ y[i]) / tau)
            den = pos
            for j in range(len(x)):
                if j != i and targets[j] != targets[i]:
                    den += math.exp(float(x[i] @ y[j]) / tau) + math.exp(float(x[i] @ x[j]) / tau)
            total += -math.log(pos / den)
        return total / len(x)

    return (one(a, b) + one(b, a)) / 2


def test_cmcl_equals_direct_recomputation_with_same_target_masking() -> None:
    a, b = _unit(6, 5, seed=5), _unit(6, 5, seed=6)
    targets = torch.tensor([1, 2, 1, 3, 4, 2])
    got = cmcl_loss(a, b, targets, 0.07).item()
    assert got == pytest.approx(cmcl_direct(a, b, targets, 0.07), rel=1e-5)
    distinct = cmcl_loss(a, b, torch.arange(6), 0.07).item()
    assert distinct == pytest.approx(cmcl_direct(a, b, torch.arange(6), 0.07), rel=1e-5)
    assert distinct > got  # masking removes negatives, so the loss drops


def test_cmcl_by_hand_two_rows() -> None:
    # a_1 = b_1 = x, a_2 = b_2 = y with x . y = 0: denominator of row 1 = e^{1/t} + e^{0} + e^{0}.
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a = torch.stack([x, y])
    tau = 0.25
    want = -math.log(math.exp(4.0) / (math.exp(4.0) + 2.0))
    assert cmcl_loss(a, a.clone(), torch.tensor([0, 1]), tau).item() == pytest.approx(
        want, rel=1e-5
    )


def test_blockwise_softmax_matches_plain_cross_entropy_and_grads() -> None:
    q = _unit(37, 16, seed=7).requires_grad_()
    c = _unit(23, 16, seed=8).requires_grad_()
    labels = torch.randint(0, 23, (37,), generator=torch.Generator().manual_seed(0))
    loss = chunked_cross_entropy(q, c, labels, 0.07, block=23 * 5)  # 5 rows per block
    loss.backward()
    q2, c2 = q.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    ref = F.cross_entropy(q2 @ c2.T / 0.07, labels)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(q.grad, q2.grad, atol=1e-5) and torch.allclose(c.grad, c2.grad, atol=1e-5)


def test_full_softmax_scores_sum_of_modal_cosines() -> None:
    # Two modalities concatenated: q . c = cos_text + cos_image; items are 1-based.
    ht, hi = _unit(3, 4, seed=9), _unit(3, 4, seed=10)
    et, ei = _unit(5, 4, seed=11), _unit(5, 4, seed=12)
    targets = torch.tensor([1, 5, 3])
    got = full_softmax_loss(torch.cat([ht, hi], 1), torch.cat([et, ei], 1), targets, 0.07)
    logits = (ht @ et.T + hi @ ei.T) / 0.07
    assert got.item() == pytest.approx(F.cross_entropy(logits, targets - 1).item(), rel=1e-5)
