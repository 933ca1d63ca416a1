"""DUPN (Ni et al., "Perceive Your Users in Depth", KDD 2018): one user representation from the
behaviour sequence, shared by every task.

    behaviours (oldest first) --embed--> B x L x D --LSTM or transformer layer--> states B x L x H
    user features --user tower--> u                           (user profile and request context)
    attention: weight_t = softmax_t MLP([state_t, properties_t, u])      (masked over padding)
    user representation = [sum_t weight_t [state_t, behaviour_t], u]     (never sees the candidate)
    item features --item tower--> v
    task heads on [user representation, v]

A behaviour's vector is its group's embeddings side by side: the item's side information through
the candidate's own tables (`table: item_id`) and the behaviour's properties (type, scenario, age)
through tables of their own; the properties alone, with the states and u, score the attention,
as in the paper. The readout weighs the behaviours' own embeddings beside the states
(`with_behaviours`, on by default; the paper weighs the states only): they live in the candidate's
embedding space, so the heads can match the candidate against the history directly, which the
LSTM's states, a learned projection, make harder (docs/models.md has the ablation). `readout:
mean | last` replace the attention by the mean or the newest state.

The user part never reads an item feature, so serving can compute it once per request and score
every candidate with the item tower and the heads only (`user_part`, `item_part`, `task_logits`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from mtrec.data.batch import Batch
from mtrec.models.base import MultiTaskModel
from mtrec.models.layers import MLP
from mtrec.spec import DupnModel, ModelSpec, SequenceEncoder, SequenceReadout


def padded(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows (N x D values, B lengths) -> (B x L x D, left-aligned, zeros after each row's
    end; B x L mask of the real entries), L the longest row (at least 1)."""
    lengths = lengths.long()
    b = lengths.numel()
    width = max(int(lengths.max()) if b else 0, 1)
    row = torch.repeat_interleave(torch.arange(b, device=values.device), lengths)
    start = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(values.shape[0], device=values.device) - start[row]
    out = values.new_zeros(b, width, values.shape[1])
    out[row, pos] = values
    mask = torch.arange(width, device=values.device).unsqueeze(0) < lengths.unsqueeze(1)
    return out, mask


class _Transformer(nn.Module):
    """One transformer encoder layer over the behaviours, with a learned embedding of each
    behaviour's rank from the newest (0 = the newest), padding masked."""

    def __init__(self, in_dim: int, width: int, heads: int, max_len: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        self.recency = nn.Embedding(max_len, width)
        self.layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rank = (lengths.unsqueeze(1) - 1 - torch.arange(x.shape[1], device=x.device).unsqueeze(0)).clamp(min=0)
        h = self.proj(x) + self.recency(rank.clamp(max=self.recency.num_embeddings - 1))
        # a row without behaviours is all padding: torch returns finite states for it (masked after)
        return self.layer(h, src_key_padding_mask=~mask)


class DUPN(MultiTaskModel):
    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        m: DupnModel = spec.model
        f = spec.features
        group = m.group(spec)
        self.group = group.name
        self.readout = m.readout
        self.with_behaviours = m.with_behaviours
        # rows with one user context share its user part (False: every row computes its own; the
        # split-scoring benchmark's baseline)
        self.share_user_work = True
        user = set(m.user_features)
        self.user_sparse = [x.name for x in f.sparse if x.name in user]
        self.item_sparse = [x.name for x in f.sparse if x.name not in user]
        self.other_groups = [g.name for g in f.sequences if g.name != group.name]  # pooled, user side
        self.pooled_group_features = [x.name for g in f.sequences if g.name != group.name for x in g.features]
        self._sequence_inputs = {x.name for x in group.features}
        self._user_inputs = {*self.user_sparse, *self.pooled_group_features, *self._sequence_inputs}
        by_name = {x.name: x for x in f.embedded()}
        self._user_tables = sorted({f.table_of(by_name[n]).name for n in self._user_inputs})
        dense = [x.name for x, _ in f.dense_inputs()]  # a missing-indicator goes with its feature
        self.user_dense = [i for i, n in enumerate(dense) if n in user]
        self.item_dense = [i for i, n in enumerate(dense) if n not in user]
        dims = {x.name: f.table_of(x).dim for x in [*f.sparse, *f.sequence_features()]}
        user_in = sum(dims[n] for n in [*self.user_sparse, *self.pooled_group_features]) + len(self.user_dense)
        item_in = sum(dims[n] for n in self.item_sparse) + len(self.item_dense)
        # a behaviour's properties: its features whose tables no candidate feature reads
        item_tables = {f.table_of(x).name for x in f.sparse}
        self.properties, col = [], 0
        for x in group.features:
            if f.table_of(x).name not in item_tables:
                self.properties.append((col, col + dims[x.name]))
            col += dims[x.name]
        behaviour_dim = col
        if m.encoder == SequenceEncoder.LSTM:
            self.encoder: nn.Module = nn.LSTM(behaviour_dim, m.hidden, batch_first=True)
        else:
            self.encoder = _Transformer(behaviour_dim, m.hidden, m.heads, group.max_len, m.dropout)
        self.user_tower = MLP(user_in, m.user_tower, m.batch_norm, m.dropout)
        self.attention = None
        if m.readout == SequenceReadout.ATTENTION:
            prop_dim = sum(b - a for a, b in self.properties)
            scorer = MLP(m.hidden + prop_dim + self.user_tower.out_dim, m.attention)  # no BN: it sees padding
            self.attention = nn.Sequential(scorer, nn.Linear(scorer.out_dim, 1))
        self.item_tower = MLP(item_in, m.item_tower, m.batch_norm, m.dropout)
        self.user_dim = m.hidden + (behaviour_dim if m.with_behaviours else 0) + self.user_tower.out_dim
        head_in = self.user_dim + self.item_tower.out_dim
        self.towers = nn.ModuleDict({n: self.tower(n, head_in) for n in self.task_names})

    def frozen(self, part: str) -> tuple[list[str], list[str]]:
        """`user`: the encoder, the attention, the user tower and every table the user side reads
        (a table shared with the candidate, e.g. item_id, too: the representation stays exactly
        what was transferred)."""
        if part != "user":
            raise KeyError(part)
        return ["encoder.", "attention.", "user_tower."], self._user_tables

    # ---- the two halves ------------------------------------------------------------------------
    def _states(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Behaviours (S x L x D, left-aligned, oldest first; S x L mask) -> S x L x hidden, zero on
        padding."""
        if isinstance(self.encoder, nn.LSTM):
            # rows are left-aligned, so every real state is exact without packing (the padding
            # comes after it and is masked); packing costs a slice per step
            h, _ = self.encoder(x)
        else:
            h = self.encoder(x, mask, mask.sum(1))
        return h * mask.unsqueeze(2)

    def _readout(self, h: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """States, behaviours and mask of U contexts, and their user vectors -> U x readout width."""
        lengths = mask.sum(1)
        if self.readout == SequenceReadout.LAST:
            weight = torch.nn.functional.one_hot((lengths - 1).clamp(min=0), h.shape[1]).to(h.dtype)
            weight = weight * (lengths > 0).unsqueeze(1)
        elif self.readout == SequenceReadout.MEAN:
            weight = mask / lengths.clamp(min=1).unsqueeze(1).to(h.dtype)
        else:
            parts = [h, *(x[:, :, a:b] for a, b in self.properties), u.unsqueeze(1).expand(-1, h.shape[1], -1)]
            score = self.attention(torch.cat(parts, dim=2)).squeeze(2)  # U x L
            weight = torch.softmax(score.masked_fill(~mask, -1e9), dim=1) * mask  # an empty row: all zero
        if self.with_behaviours:
            h = torch.cat([h, x], dim=2)
        return torch.einsum("bl,blh->bh", weight, h)

    def user_part(
        self, vectors: dict[str, torch.Tensor], jagged: dict[str, JaggedTensor], batch: Batch
    ) -> torch.Tensor:
        """The user representation, [readout of the sequence, user tower], B x user_dim, from the
        batch's embeddings (`_embed`). With `share_user_work`, rows with equal user-side inputs
        share the work: the encoder runs once per distinct sequence, the readout once per
        distinct user context (`user_keys`, `distinct`)."""
        parts = [vectors[n] for n in [*self.user_sparse, *self.pooled_group_features]]
        if self.user_dense:
            parts.append(batch.dense[:, self.user_dense])
        u = self.user_tower(torch.cat(parts, dim=1))  # every row: BatchNorm sees the batch it always saw
        x, mask = padded(*self.sparse_arch.sequences(jagged)[self.group])
        if not self.share_user_work:
            return torch.cat([self._readout(self._states(x, mask), x, mask, u), u], dim=1)
        seq_keys, ctx_keys = self.user_keys(batch)
        seqs, seq_of = self.distinct(seq_keys)
        ctxs, ctx_of = self.distinct(ctx_keys)
        h = self._states(x[seqs], mask[seqs])[seq_of[ctxs]]  # U x L x H: each context's sequence
        x, mask, u = x[ctxs], mask[ctxs], u[ctxs]
        return torch.cat([self._readout(h, x, mask, u), u], dim=1)[ctx_of]

    def user_keys(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, its user-side inputs as integers (B x K each): the sequence's ids and lengths,
        and those plus the user features' and the user dense columns' (bitwise): the user context."""
        blocks = {}
        for kjt in batch.sparse.values():
            for name, jt in kjt.to_dict().items():
                if name in self._user_inputs:
                    ids, _ = padded(jt.values().unsqueeze(1), jt.lengths())
                    blocks[name] = [jt.lengths().long().unsqueeze(1), ids.squeeze(2)]
        seq = [k for name in sorted(self._sequence_inputs) for k in blocks[name]]
        ctx = [k for name in sorted(self._user_inputs - self._sequence_inputs) for k in blocks[name]]
        if self.user_dense:
            ctx.append(batch.dense[:, self.user_dense].contiguous().view(torch.int32).long())
        seq_keys = torch.cat(seq, dim=1)
        return seq_keys, torch.cat([seq_keys, *ctx], dim=1)

    @staticmethod
    def distinct(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows with equal `keys` (B x K): (the first row of each distinct one, U; which one each
        row has, B). The candidates of one request, or the impressions of one request in the logs,
        have one user context."""
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)
        b = inverse.numel()
        first = torch.full((int(inverse.max()) + 1 if b else 0,), b, dtype=torch.long, device=inverse.device)
        return first.scatter_reduce(0, inverse, torch.arange(b, device=inverse.device), "amin"), inverse

    def item_part(self, vectors: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """The candidate's representation, B x item_dim."""
        parts = [vectors[n] for n in self.item_sparse]
        if self.item_dense:
            parts.append(dense[:, self.item_dense])
        return self.item_tower(torch.cat(parts, dim=1))

    def _embed(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, JaggedTensor]]:
        """(B x dim per sparse feature and pooled group feature; the jagged lookups)."""
        pooled, jagged = self.sparse_arch.lookup(batch.sparse)
        return self.sparse_arch.vectors(pooled, jagged, groups=self.other_groups), jagged

    def user_representation(self, batch: Batch) -> torch.Tensor:
        """B x user_dim: the part of the model no candidate feature reaches (serving, export)."""
        return self.user_part(*self._embed(batch), batch)

    def features(self, batch: Batch) -> torch.Tensor:
        vectors, jagged = self._embed(batch)
        return torch.cat([self.user_part(vectors, jagged, batch), self.item_part(vectors, batch.dense)], dim=1)

    def task_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: tower(x) for n, tower in self.towers.items()}
