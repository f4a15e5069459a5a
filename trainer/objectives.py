"""Pre-training and fine-tuning objectives as pure functions (PAPER.md sections 3-4).

All similarities are cosines (inputs are L2-normalised by the caller) divided by tau.

Same-target masking: in a batch, two rows whose target is the same item are not negatives of
each other. The original code sets such logits to 0 (so each still adds exp(0) = 1 to the
denominator); here they are removed (-inf), which is what "masked" means in the paper.

NIP with distinct candidates: the paper's in-batch negatives of row i are the targets of the other
rows. Several rows often share a target; their target embeddings are identical, so the batch is
scored against its *distinct* target items with a log-count offset: a negative item u that is the
target of c_u rows contributes c_u * exp(s_iu / tau), exactly as c_u duplicate columns would. The
row's own target counts once (its other rows are same-target masked). This is the same loss as the
N x N formulation, with a U x N matrix (U = distinct targets), and it lets the all-positions mode
use tens of thousands of target rows per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _BlockSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of softmax(q @ c.T * inv_tau + bias), computed block by block.

    The gradient is formed in the forward pass, one [rows, U] logit block at a time, so memory
    stays at one block whatever N and U are, and each block costs three matrix products (the
    logits and the two gradients) instead of the four of a recomputing checkpoint.
    """

    @staticmethod
    def forward(ctx, q, c, labels, log_counts, inv_tau, rows, mm_dtype):  # type: ignore[override]
        n = q.shape[0]
        gq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        gc = torch.zeros(c.shape, dtype=torch.float32, device=c.device)
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        cm = c.detach().to(mm_dtype)
        for s in range(0, n, rows):
            qr = (q[s : s + rows].detach().float() * inv_tau).to(
                mm_dtype
            )  # [r, D], 1/tau folded in
            lab = labels[s : s + rows]
            ar = torch.arange(len(lab), device=q.device)
            z = (qr @ cm.T).float()  # [r, U] logits
            if log_counts is not None:
                z.add_(log_counts[None, :])
                # The row's own target counts once: remove its log-count at the label column.
                z[ar, lab] -= log_counts[lab]
            p = torch.softmax(z, dim=1)  # one fused pass; logits are bounded (cosines / tau)
            total += -torch.log(p[ar, lab].double().clamp_min(1e-300)).sum()
            p[ar, lab] -= 1.0  # d(loss_row)/d(logits) = softmax - onehot
            g = p.to(mm_dtype)
            gq[s : s + rows] = (g @ cm).float() * (inv_tau / n)
            gc += (g.T @ qr).float() * (1.0 / n)
        ctx.save_for_backward(gq, gc)
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        gq, gc = ctx.saved_tensors
        return grad * gq, grad * gc, None, None, None, None, None


def chunked_cross_entropy(
    q: torch.Tensor,
    c: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    block: int = 1 << 22,
    log_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax cross-entropy of logits q @ c.T / tau (+ log_counts) over all candidates.

    Memory stays at one block of about `block` logits (rows = block // U) however many rows and
    candidates there are. Under autocast the products run in bfloat16, the softmax in float32.

    Args:
        q: [N, D] queries. c: [U, D] candidates. labels: [N] column of each row's positive.
        log_counts: optional [U] log multiplicity of each candidate (see module docstring).
    Returns:
        scalar mean loss (float32).
    """
    n = q.shape[0]
    if n == 0:
        return q.sum() * 0.0
    dev = q.device.type
    mm_dtype = torch.bfloat16 if torch.is_autocast_enabled(dev) else torch.float32
    rows = max(1, block // max(1, c.shape[0]))
    lc = None if log_counts is None else log_counts.float()
    return _BlockSoftmaxCE.apply(q, c, labels, lc, 1.0 / tau, rows, mm_dtype)


def nip_loss(
    h: torch.Tensor,
    target_emb: torch.Tensor,
    targets: torch.Tensor,
    tau: float,
    block: int = 1 << 22,
) -> torch.Tensor:
    """Modality-specific next-item prediction, InfoNCE with in-batch negatives.

    Args:
        h: [N, H] L2-normalised sequence outputs, one row per (sample, target).
        target_emb: [N, H] L2-normalised adapted feature of each row's target item (rows with the
            same target must hold the same vector).
        targets: [N] target item ids (same-target masking).
    Returns:
        scalar: mean over rows of -log softmax of the positive among the batch's targets.
    """
    uniq, inv, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    # One representative row per distinct target.
    first = torch.full_like(uniq, targets.numel()).scatter_reduce(
        0, inv, torch.arange(targets.numel(), device=targets.device), reduce="amin"
    )
    cand = target_emb[first]  # [U, H]
    return chunked_cross_entropy(h, cand, inv, tau, block, counts.float().log())


def cmcl_loss(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-modality contrastive loss: symmetric NT-Xent between paired rows of a and b.

    The positive of a_i is b_i; its negatives are b_j and a_j (j != i) of the other rows, both
    modalities, except rows with the same target (masked). The two directions are averaged.

    Args:
        a, b: [N, H] L2-normalised outputs of the text and image sequences of the same rows.
        targets: [N] target item of each row.
    """
    n = a.shape[0]
    if n == 0:
        return a.sum() * 0.0
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    masked = (targets[:, None] == targets[None, :]) & ~eye  # [N, N] same target, other row
    ninf = torch.finfo(torch.float32).min
    ab = (a @ b.T).float() / tau  # [N, N] cross-modality; diagonal = positives
    aa = (a @ a.T).float() / tau
    bb = (b @ b.T).float() / tau
    ab = ab.masked_fill(masked, ninf)
    aa = aa.masked_fill(masked | eye, ninf)
    bb = bb.masked_fill(masked | eye, ninf)
    labels = torch.arange(n, device=a.device)
    loss_a = F.cross_entropy(torch.cat([ab, aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([ab.T, bb], 1), labels)
    return (loss_a + loss_b) / 2


def full_softmax_loss(
    q: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor, tau: float, block: int = 1 << 22
) -> torch.Tensor:
    """Fine-tuning: cross-entropy over ALL items (no sampled negatives).

    Args:
        q: [N, D] L2-normalised user vectors (text and image halves concatenated, so that
            q @ cand.T = cos_text + cos_image).
        cand: [n_items, D] L2-normalised candidate vectors of items 1..n_items.
        targets: [N] target items in 1..n_items.
    """
    return chunked_cross_entropy(q, cand, targets - 1, tau, block)
