"""SASRec with item IDs only: the standard ID baseline of the experiments (Kang & McAuley 2018,
as RecBole's SASRec with CE loss).

Item-ID embedding + learned positions -> the same causal post-LN Transformer as M2SE
(`TransformerLayer`) -> the output at each position scores every item by a dot product with the
(tied) item embedding; cross-entropy over all items. It reads no features: its `feats` argument
is accepted and ignored so that the Trainer, the evaluation and `recommend` drive it exactly as
they drive M2SE (same split, batches, early stopping and full-ranking metrics).

An item never seen in training keeps its random initial embedding: SASRec cannot score unseen
items, which is what the cold-start rows of the report show.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.config import M2SEConfig
from trainer.layers import Dropout, TransformerLayer
from trainer.model import LossOutput
from trainer.objectives import chunked_cross_entropy

TABLE = "id"  # the one "modality" of the tables dict


class SASRec(nn.Module):
    def __init__(self, cfg: M2SEConfig, n_items: int, max_len: int = 50) -> None:
        super().__init__()
        self.cfg, self.n_items, self.max_len = cfg, n_items, max_len
        H = cfg.hidden_size
        self.item_embedding = nn.Embedding(n_items + 1, H, padding_idx=0)
        self.position = nn.Embedding(max_len, H)
        self.ln = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.n_layers)])
        for sub in self.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                nn.init.normal_(sub.weight, std=cfg.initializer_range)
                if isinstance(sub, nn.Linear) and sub.bias is not None:
                    nn.init.zeros_(sub.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    # The M2SE interface -------------------------------------------------------------------

    def all_item_features(
        self, feats: object = None, chunk: int = 65536
    ) -> dict[str, torch.Tensor]:
        """{"id": [n_items + 1, H]} the item embedding table."""
        return {TABLE: self.item_embedding.weight}

    def candidates(
        self, tables: dict[str, torch.Tensor], ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Candidate vectors (not normalised: SASRec scores by dot product)."""
        e = tables[TABLE]
        return e if ids is None else e[ids]

    def encode(self, inputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """inputs [B, L] left-aligned ids, x [B, L, H] their embeddings -> outputs [B, L, H]."""
        L = inputs.shape[1]
        h = self.drop(self.ln(x + self.position.weight[:L].unsqueeze(0)))
        for layer in self.layers:
            h = layer(h)
        return h

    def user_vectors(
        self, tables: dict[str, torch.Tensor], inputs: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """[B, H] output at each sequence's last valid position."""
        out = self.encode(inputs, tables[TABLE][inputs])
        return out[torch.arange(inputs.shape[0], device=inputs.device), lengths - 1]

    def finetune_loss(
        self,
        feats: object,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        tau: float = 1.0,
        loss_block: int = 1 << 22,
    ) -> LossOutput:
        """Cross-entropy over all items of dot-product logits (tau is ignored: SASRec has none)."""
        out = self.encode(inputs, self.item_embedding(inputs))  # [B, L, H]
        b, t = (targets > 0).nonzero(as_tuple=True)
        q = out[b, t]  # [N, H]
        ce = chunked_cross_entropy(
            q, self.item_embedding.weight[1:], targets[b, t] - 1, 1.0, loss_block
        )
        return LossOutput(ce, {"ce": float(ce.detach())}, int(len(b)))
