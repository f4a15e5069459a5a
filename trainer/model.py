"""M2SE, the Multimodal Mixup Sequence Encoder (PAPER.md section 2), and its two training losses.

Item side, per modality: masked attention pooling over the item's vectors, then a MoE adaptor.
Sequence side: item drop and complementary mixup (pre-training only), then ONE causal SASRec-style
Transformer shared by the text and the image sequence (run as one batch of 2B sequences).

Two fixes of the original code: the poolers receive gradients (the original copied their output
into an embedding table through `.data`), and padding slots are masked out of the pooling softmax.

Efficiency: pooling and adaptor run once per *distinct* item of a batch (pre-training) or once per
item of the catalogue (fine-tuning, whose softmax needs every item anyway), and sequence positions
look the result up. The adaptor's dropout is therefore drawn per item per batch, where the original
draws it per occurrence; input and target positions of a batch share the draw.

Sequences are left-aligned (position 0 = oldest item, padding at the end), so a causal mask alone
keeps every valid position from attending to padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import M2SEConfig
from trainer.data import FeatureStack
from trainer.layers import Dropout, TransformerLayer
from trainer.objectives import cmcl_loss, full_softmax_loss, nip_loss

MODS = ("text", "image")


# --------------------------------------------------------------------------- augmentations


def item_drop(
    inputs: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each valid position with probability p (never position 0) and compact the sequence.

    Args:
        inputs: [B, L] left-aligned item ids, 0 = padding.
    Returns:
        dropped: [B, L] the kept items, left-aligned, 0-padded.
        pos_map: [B, L] for every original position t, the compact position of the last kept
            input at or before t: the output there is what sees "the prefix up to t" after the drop.
    """
    valid = inputs > 0
    keep = torch.rand(inputs.shape, generator=generator, device=inputs.device) >= p
    keep = keep & valid
    keep[:, 0] = valid[:, 0]
    csum = keep.long().cumsum(1)  # [B, L]
    pos_map = (csum - 1).clamp(min=0)
    dropped = torch.zeros_like(inputs)
    b, t = keep.nonzero(as_tuple=True)
    dropped[b, csum[b, t] - 1] = inputs[b, t]
    return dropped, pos_map


def complementary_mixup(
    text: torch.Tensor,
    image: torch.Tensor,
    valid: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Swap the modalities at Bernoulli(p) positions of valid items (PAPER.md 2.4).

    mixed_text = image * m + text * (1 - m); mixed_image = text * m + image * (1 - m), m = 0 on
    padding: a swapped position of one sequence mirrors the same position of the other.

    Args:
        text, image: [B, L, H] adapted item features. valid: [B, L] bool.
    Returns:
        (mixed_text, mixed_image, m) with m: [B, L] float.
    """
    m = (torch.rand(valid.shape, generator=generator, device=valid.device) < p) & valid
    mf = m.unsqueeze(-1).to(text.dtype)  # [B, L, 1]
    return image * mf + text * (1 - mf), text * mf + image * (1 - mf), m.float()


# --------------------------------------------------------------------------- item side


class AttentionPooling(nn.Module):
    """Linear(d, k) -> act -> Linear(k, 1), softmax over an item's valid slots, weighted sum."""

    def __init__(self, dim: int, hidden: int, act: str = "relu") -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.act = nn.ReLU() if act == "relu" else nn.Tanh()
        self.score = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, S, d], mask: [N, S] -> pooled [N, d] (zeros where no slot is valid), weights [N, S]."""
        if x.shape[1] == 1:
            # One slot (e.g. one poster per item): the softmax over it is 1 wherever it is valid,
            # whatever the pooler's weights, so pooling is the identity (exact, and the pooler
            # gets no gradient either way); skipping it also spares the adaptor's input gradient.
            w = mask.to(x.dtype)
            return x[:, 0] * w, w
        energy = self.score(self.act(self.proj(x))).squeeze(-1)  # [N, S]
        energy = energy.float().masked_fill(~mask, float("-inf"))
        has_any = mask.any(-1, keepdim=True)
        energy = torch.where(has_any, energy, torch.zeros_like(energy))
        w = torch.softmax(energy, dim=-1) * mask  # [N, S]; zero rows for items without vectors
        pooled = (w.unsqueeze(-1).to(x.dtype) * x).sum(1)
        return pooled, w


class MoEAdaptor(nn.Module):
    """n_experts x (Linear(d, h) -> Dropout -> LayerNorm), mixed by softmax(x @ W_gate)."""

    def __init__(
        self, dim: int, hidden: int, n_experts: int, dropout: float, eps: float, init_std: float
    ) -> None:
        super().__init__()
        self.n_experts, self.hidden, self.eps = n_experts, hidden, eps
        self.experts = nn.Linear(dim, n_experts * hidden)  # the experts' Linear(d, h), side by side
        self.dropout = Dropout(dropout)
        self.ln_weight = nn.Parameter(torch.ones(n_experts, hidden))
        self.ln_bias = nn.Parameter(torch.zeros(n_experts, hidden))
        self.gate = nn.Parameter(
            torch.zeros(dim, n_experts)
        )  # zeros: uniform mixing at start (as the original)
        nn.init.normal_(self.experts.weight, std=init_std)
        nn.init.zeros_(self.experts.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, d] -> [N, h]."""
        z = self.experts(x).view(*x.shape[:-1], self.n_experts, self.hidden)  # [N, E, h]
        z = (
            F.layer_norm(self.dropout(z), (self.hidden,), eps=self.eps) * self.ln_weight
            + self.ln_bias
        )
        g = torch.softmax((x @ self.gate).float(), dim=-1).to(z.dtype)  # [N, E]
        return (g.unsqueeze(-1) * z).sum(-2)


# --------------------------------------------------------------------------- sequence side


@dataclass
class LossOutput:
    """Total loss and each term (every term is logged)."""

    loss: torch.Tensor
    terms: dict[str, float]
    n_targets: int


class M2SE(nn.Module):
    """The encoder. `feats` (the FeatureStacks) are passed to each call, never copied in."""

    def __init__(
        self, cfg: M2SEConfig, n_items: int, dim: int, max_len: int = 50, id_embedding: bool = False
    ) -> None:
        super().__init__()
        self.cfg, self.n_items, self.dim, self.max_len = cfg, n_items, dim, max_len
        self.mods = MODS if cfg.modalities == "both" else (cfg.modalities,)
        H = cfg.hidden_size
        self.pool = nn.ModuleDict(
            {m: AttentionPooling(dim, cfg.pool_hidden, cfg.pool_act) for m in self.mods}
        )
        self.adaptor = nn.ModuleDict(
            {
                m: MoEAdaptor(
                    dim,
                    H,
                    cfg.n_experts,
                    cfg.adaptor_dropout,
                    cfg.layer_norm_eps,
                    cfg.initializer_range,
                )
                for m in self.mods
            }
        )
        self.position = nn.Embedding(max_len, H)
        self.ln = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.n_layers)])
        self.item_embedding: nn.Embedding | None = None
        self._init_sequence_weights()
        if id_embedding:
            self.add_item_embedding()

    def _init_sequence_weights(self) -> None:
        std = self.cfg.initializer_range
        for mod in [self.position, *self.layers, *self.pool.values()]:
            for sub in mod.modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(sub.weight, std=std)
                    if isinstance(sub, nn.Linear) and sub.bias is not None:
                        nn.init.zeros_(sub.bias)

    def add_item_embedding(self) -> None:
        """Transductive fine-tuning: a trainable item-ID embedding (row 0 = padding)."""
        emb = nn.Embedding(self.n_items + 1, self.cfg.hidden_size, padding_idx=0)
        std = self.cfg.id_init_std
        nn.init.normal_(emb.weight, std=self.cfg.initializer_range if std is None else std)
        with torch.no_grad():
            emb.weight[0].zero_()
        self.item_embedding = emb.to(self.position.weight.device)

    # ------------------------------------------------------------------ item side

    def item_features(
        self, feats: dict[str, FeatureStack], ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Adapted features of items `ids` [U] -> {modality: [U, H]} (pool + MoE, no ID embedding)."""
        out = {}
        for m in self.mods:
            stack = feats[m]
            x = stack.vectors[ids].float()  # [U, S, d]
            pooled, _ = self.pool[m](x, stack.mask[ids])
            out[m] = self.adaptor[m](pooled)
        return out

    def all_item_features(
        self, feats: dict[str, FeatureStack], chunk: int = 65536
    ) -> dict[str, torch.Tensor]:
        """item_features of every item 0..n_items, computed `chunk` items at a time."""
        dev = feats[self.mods[0]].vectors.device
        parts: dict[str, list[torch.Tensor]] = {m: [] for m in self.mods}
        for s in range(0, self.n_items + 1, chunk):
            ids = torch.arange(s, min(s + chunk, self.n_items + 1), device=dev)
            for m, t in self.item_features(feats, ids).items():
                parts[m].append(t)
        return {m: torch.cat(p) for m, p in parts.items()}

    def candidates(
        self, tables: dict[str, torch.Tensor], ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised candidate vectors, modalities concatenated: [U, H * n_mods].

        q @ candidates.T = sum over modalities of cos(h_m, e_m(item)) (PAPER.md 4).
        """
        parts = []
        for m in self.mods:
            e = tables[m] if ids is None else tables[m][ids]
            if self.item_embedding is not None:
                e = e + (self.item_embedding.weight if ids is None else self.item_embedding(ids))
            parts.append(F.normalize(e.float(), dim=-1))
        return torch.cat(parts, -1)

    # ------------------------------------------------------------------ sequence side

    def encode(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """x: [B, L, H] item features of left-aligned `inputs` [B, L] -> outputs [B, L, H]."""
        L = x.shape[1]
        h = x + self.position.weight[:L].unsqueeze(0)
        if self.item_embedding is not None:
            h = h + self.item_embedding(inputs)
        h = self.drop(self.ln(h))
        for layer in self.layers:
            h = layer(h)
        return h

    def sequence_outputs(
        self,
        seqs: dict[str, torch.Tensor],
        inputs: torch.Tensor,
        b: torch.Tensor,
        pos: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Encode each modality's sequence (one shared pass) and gather rows (b, pos) -> {m: [N, H]}."""
        mods = list(seqs)
        B = inputs.shape[0]
        out = self.encode(
            torch.cat([seqs[m] for m in mods]), inputs.repeat(len(mods), 1)
        )  # [B * n_mods, L, H]
        return {m: out[i * B + b, pos] for i, m in enumerate(mods)}

    def user_vectors(
        self, tables: dict[str, torch.Tensor], inputs: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Evaluation: [B, H * n_mods] normalised output at each sequence's last valid position."""
        seqs = {m: tables[m][inputs] for m in self.mods}
        b = torch.arange(inputs.shape[0], device=inputs.device)
        outs = self.sequence_outputs(seqs, inputs, b, lengths - 1)
        return torch.cat([F.normalize(outs[m].float(), dim=-1) for m in self.mods], -1)

    # ------------------------------------------------------------------ losses

    def pretrain_loss(
        self,
        feats: dict[str, FeatureStack],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        tau: float,
        cmcl_weight: float,
        use_cmcl: bool = True,
        cmcl_rows: int = 1024,
        loss_block: int = 1 << 22,
        nip_image: bool = True,
    ) -> LossOutput:
        """NIP per modality + lambda * CMCL (PAPER.md 3); `nip_image=False` drops the image NIP
        term (ablation).

        Args:
            inputs: [B, L] left-aligned items. targets: [B, L] the item following each position
                (0 = no target at this position).
        """
        B, L = inputs.shape
        dev = inputs.device
        if self.training and self.cfg.item_drop_max > 0:
            p = float(torch.rand(()) * self.cfg.item_drop_max)
            inputs, pos_map = item_drop(inputs, p)
        else:
            pos_map = torch.arange(L, device=dev).expand(B, L)
        b, t = (targets > 0).nonzero(as_tuple=True)  # N target rows
        tgt = targets[b, t]  # [N]
        pos = pos_map[b, t]  # output position that sees the prefix up to t
        ids, inv = torch.unique(torch.cat([inputs.flatten(), tgt]), return_inverse=True)
        tables = self.item_features(feats, ids)  # {m: [U, H]}
        inp_local, tgt_local = inv[: B * L].view(B, L), inv[B * L :]
        seqs = {m: tables[m][inp_local] for m in self.mods}  # [B, L, H]
        if len(self.mods) == 2 and self.cfg.mixup and self.training and self.cfg.mixup_max > 0:
            p = float(torch.rand(()) * self.cfg.mixup_max)
            seqs["text"], seqs["image"], _ = complementary_mixup(
                seqs["text"], seqs["image"], inputs > 0, p
            )
        outs = self.sequence_outputs(seqs, inputs, b, pos)
        hs = {m: F.normalize(outs[m].float(), dim=-1) for m in self.mods}
        terms: dict[str, torch.Tensor] = {}
        for m in self.mods:
            if m == "image" and not nip_image:
                continue
            e = F.normalize(tables[m][tgt_local].float(), dim=-1)  # [N, H]
            terms[f"nip_{m}"] = nip_loss(hs[m], e, tgt, tau, loss_block)
        use_cmcl = use_cmcl and len(self.mods) == 2 and cmcl_weight > 0
        if not terms and not use_cmcl:
            raise ValueError("pre-training has no loss term: NIP-image is off and CMCL is off")
        loss = sum(terms.values(), torch.zeros((), device=dev))
        if use_cmcl:
            rows = torch.arange(len(tgt), device=dev)
            if len(rows) > cmcl_rows:
                rows = torch.randperm(len(tgt), device=dev)[:cmcl_rows]
            terms["cmcl"] = cmcl_loss(hs["text"][rows], hs["image"][rows], tgt[rows], tau)
            loss = loss + cmcl_weight * terms["cmcl"]
        return LossOutput(loss, {k: float(v.detach()) for k, v in terms.items()}, int(len(tgt)))

    def finetune_loss(
        self,
        feats: dict[str, FeatureStack],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        tau: float,
        loss_block: int = 1 << 22,
    ) -> LossOutput:
        """Cross-entropy over all items of (sum of per-modality cosines) / tau (PAPER.md 4)."""
        tables = self.all_item_features(feats)  # {m: [n + 1, H]}
        b, t = (targets > 0).nonzero(as_tuple=True)
        tgt = targets[b, t]
        seqs = {m: tables[m][inputs] for m in self.mods}
        outs = self.sequence_outputs(seqs, inputs, b, t)
        q = torch.cat(
            [F.normalize(outs[m].float(), dim=-1) for m in self.mods], -1
        )  # [N, H * n_mods]
        cand = self.candidates(tables)[1:]  # [n_items, H * n_mods]
        ce = full_softmax_loss(q, cand, tgt, tau, loss_block)
        return LossOutput(ce, {"ce": float(ce.detach())}, int(len(tgt)))
