"""BaTex textual subspace: learn a word embedding as a weighted sum of real vocabulary embeddings.

BaTex (Du et al., "Efficient Personalized Text-to-image Generation by Leveraging Textual
Subspace") replaces Textual Inversion's free 768-d vector with
v = sum_i w_i v_i over M basis words chosen from the text encoder's vocabulary:

1. Order the vocabulary by vector distance F(u, v_i) to the initializer word's embedding u
   (`dot` product, `cosine` similarity, or `l2` distance; nearest first).
2. Choose the basis: `selection="topk"` (the official script's): the k nearest words (k = 720), u
   ranked like any other word; `selection="rank"` (the paper's Algorithm 1): u first, then the top M
   words for the smallest M whose embedding matrix V_M has rank r(V_M) >= d1, the subspace dimension
   (the paper recommends d1 = M = 576 of d = 768).
3. Learn the weights w, initialised one-hot on the first basis word (top-k: the top-1 neighbour, as
   the official script; rank rule: u itself, Textual Inversion's start); the embedding never leaves
   span(v_i1 ... v_iM), and the update is the rank-d1 projection V_M V_M^T of Textual Inversion's
   (Theorem 2).

`TextualSubspace` is a diffusers `ModelMixin`/`ConfigMixin`: `save_pretrained` keeps the basis
(embeddings and token ids) and the weights, so a run can resume and the learned word can be inspected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

Distance = Literal["dot", "cosine", "l2"]
DISTANCES: tuple[str, ...] = ("dot", "cosine", "l2")
SELECTIONS: tuple[str, ...] = ("topk", "rank")


def vocabulary_order(
    embeddings: torch.Tensor,
    init_id: int,
    distance: Distance = "dot",
    exclude_ids: Iterable[int] = (),
    initializer_first: bool = True,
) -> torch.Tensor:
    """Token ids sorted from nearest to farthest from `embeddings[init_id]`, `exclude_ids` dropped; `init_id`
    first when `initializer_first` (else where its own score puts it: by dot product a longer word can outrank it)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown subspace distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    if not 0 <= init_id < len(embeddings):
        raise ValueError(f"initializer id {init_id} is outside the vocabulary of {len(embeddings)} embeddings")
    emb = embeddings.detach().double()
    u = emb[init_id]
    if distance == "dot":
        score = emb @ u
    elif distance == "cosine":
        score = nn.functional.cosine_similarity(emb, u[None], dim=-1)
    else:
        score = -(emb - u).norm(dim=-1)
    if initializer_first:
        score[init_id] = float("inf")  # the initializer is the first basis word (one-hot start)
    excluded = [i for i in exclude_ids if i != init_id and 0 <= i < len(emb)]
    if excluded:
        score[torch.tensor(excluded)] = float("-inf")
    order = torch.argsort(score, descending=True, stable=True)
    return order[: len(order) - len(excluded)]


def matrix_rank(rows: torch.Tensor, precision: torch.dtype | None = None) -> int:
    """Numerical rank: float64 SVD with NumPy's tolerance for the precision the rows were stored in.

    The tolerance must follow the storage dtype (float32 for SD's embeddings), otherwise float32
    rounding noise on nearly collinear words would count as extra dimensions.
    """
    precision = precision or (rows.dtype if rows.dtype.is_floating_point else torch.float64)
    rtol = torch.finfo(precision).eps * max(rows.shape)
    return int(torch.linalg.matrix_rank(rows.detach().double(), rtol=rtol).item())


def select_basis_ids(
    embeddings: torch.Tensor,
    init_id: int,
    subspace_dim: int,
    distance: Distance = "dot",
    exclude_ids: Iterable[int] = (),
) -> torch.Tensor:
    """BaTex Algorithm 1: the top-M token ids for the smallest M with rank(V_M) >= `subspace_dim`.

    The rank of the top-M matrix never decreases as M grows, so the smallest M is found by doubling
    then bisecting (a few SVDs of at most 2M x d instead of one per candidate M).
    """
    width = embeddings.shape[1]
    if not 1 <= subspace_dim <= width:
        raise ValueError(
            f"subspace dimension {subspace_dim} must be between 1 and the embedding width {width} "
            f"(BaTex uses 576 for SD v1's 768-d embeddings)"
        )
    order = vocabulary_order(embeddings, init_id, distance, exclude_ids)
    ordered = embeddings.detach()[order]
    known_short = subspace_dim - 1  # rank(V_M) <= M, so any M < d1 falls short
    hi = subspace_dim
    while (rank := matrix_rank(ordered[:hi])) < subspace_dim:
        if hi >= len(ordered):
            raise ValueError(f"the vocabulary embeddings span only rank {rank} < subspace dimension {subspace_dim}")
        known_short, hi = hi, min(2 * hi, len(ordered))
    lo = known_short + 1
    while lo < hi:  # invariant: rank(top hi) >= d1 and rank(top lo - 1) < d1
        mid = (lo + hi) // 2
        if matrix_rank(ordered[:mid]) >= subspace_dim:
            hi = mid
        else:
            lo = mid + 1
    return order[:hi]


def select_topk_ids(
    embeddings: torch.Tensor, init_id: int, k: int, distance: Distance = "dot", exclude_ids: Iterable[int] = ()
) -> torch.Tensor:
    """The official BaTex script's basis: the `k` token ids nearest to `embeddings[init_id]` (dot product there),
    the initializer ranked by its own score, nearest first."""
    if k < 1:
        raise ValueError(f"the top-k basis needs k >= 1, got {k}")
    order = vocabulary_order(embeddings, init_id, distance, exclude_ids, initializer_first=False)
    if k > len(order):
        raise ValueError(f"top-k basis of {k} words from a vocabulary of {len(order)}")
    return order[:k]


class TextualSubspace(ModelMixin, ConfigMixin):
    """A learnable word v = w @ V_M restricted to the span of M vocabulary embeddings (BaTex).

    Build it with `TextualSubspace.from_vocabulary(...)`; `forward()` returns the `[embedding_dim]`
    embedding. Buffers `basis` ([M, d], frozen) and `basis_ids` ([M]) are saved with the weights.
    """

    @register_to_config
    def __init__(
        self,
        num_basis: int,
        embedding_dim: int,
        subspace_dim: int,
        distance: str = "dot",
        initializer_token: str | None = None,
        initializer_id: int | None = None,
        selection: str = "rank",
    ):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown subspace distance {distance!r}; choose one of {', '.join(DISTANCES)}")
        self.register_buffer("basis", torch.zeros(num_basis, embedding_dim))
        self.register_buffer("basis_ids", torch.zeros(num_basis, dtype=torch.long))
        start = torch.zeros(num_basis)
        start[0] = 1.0  # basis row 0: the initializer (rank rule) or its top-1 neighbour (top-k)
        self.weights = nn.Parameter(start)

    @classmethod
    def from_vocabulary(
        cls,
        embeddings: torch.Tensor,
        init_id: int,
        subspace_dim: int,
        distance: Distance = "dot",
        exclude_ids: Iterable[int] = (),
        initializer_token: str | None = None,
        selection: str = "rank",
        num_basis: int = 720,
    ) -> TextualSubspace:
        """Select the basis from the `[V, d]` vocabulary embeddings (`selection`: "rank", the paper's rule with
        `subspace_dim`, or "topk", the official script's `num_basis` nearest); weights one-hot on basis row 0."""
        if selection not in SELECTIONS:
            raise ValueError(f"unknown subspace selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
        if selection == "topk":
            ids = select_topk_ids(embeddings, init_id, num_basis, distance, exclude_ids)
        else:
            ids = select_basis_ids(embeddings, init_id, subspace_dim, distance, exclude_ids)
        model = cls(
            num_basis=len(ids),
            embedding_dim=embeddings.shape[1],
            subspace_dim=subspace_dim,
            distance=distance,
            initializer_token=initializer_token,
            initializer_id=int(init_id),
            selection=selection,
        )
        model.basis.copy_(embeddings.detach()[ids].to(model.basis.dtype))
        model.basis_ids.copy_(ids)
        return model

    @property
    def rank(self) -> int:
        return matrix_rank(self.basis)

    def forward(self) -> torch.Tensor:
        return self.weights.to(self.basis.dtype) @ self.basis
