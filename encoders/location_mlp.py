"""Location MLP: two concept token embeddings in, one box per concept out (spatial inversion).

Compositional inversion (Zhang et al., "Compositional Inversion for Stable Diffusion Models", AAAI
2024, Eq. 8) predicts where two concepts of a
prompt should be attended, `l_i, l_j = MLP(e_i, e_j)`, and turns the boxes into attention masks for
spatial guidance (`inference/guidance.py`). The paper's code ships constants instead of a trained
model; this one is trained by `training/location_mlp.py` on COCO pairs and detector boxes.

Design:
- One shared head scores a concept given its partner, `box_a = head(e_a, e_b)`, `box_b = head(e_b, e_a)`,
  so swapping the inputs swaps the boxes by construction (the training pairs are unordered).
- Boxes are valid by construction: each is a size s in [min_box_size, 1] and a corner placed in
  [0, 1 - s] through sigmoids, so 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for any input (xyxy, 0..1).
- Out-of-vocabulary fallback (as the paper does): the training nouns and their input embeddings are
  stored in the model folder (`vocabulary` in config.json, `vocabulary_embeddings` in the safetensors).
  With `snap=True` (the default whenever a vocabulary is stored) each input is first replaced by the
  nearest vocabulary noun by cosine similarity, so a pseudo-word such as ELITE's S* or a Textual
  Inversion embedding takes the layout of the noun it resembles most. An in-vocabulary word maps to
  itself.

Hub-loadable like the ELITE mappers: `LocationMLP.from_pretrained(path_or_repo, subfolder="location_mlp")`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .anchors import embed_words


def boxes_from_raw(raw: torch.Tensor, min_box_size: float) -> torch.Tensor:
    """Map unconstrained `[..., 4]` (u_cx, u_cy, u_w, u_h) to valid xyxy boxes inside the unit square."""
    size = min_box_size + (1.0 - min_box_size) * torch.sigmoid(raw[..., 2:])
    corner = (1.0 - size) * torch.sigmoid(raw[..., :2])
    return torch.cat([corner, corner + size], dim=-1)


class LocationMLP(ModelMixin, ConfigMixin):
    """`forward(emb_a [B, D], emb_b [B, D]) -> boxes [B, 2, 4]` (xyxy in 0..1; row 0 for a, row 1 for b)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        embedding_dim: int = 768,
        hidden_dim: int = 256,
        num_layers: int = 3,
        dropout: float = 0.0,
        min_box_size: float = 0.05,
        vocabulary: Sequence[str] | None = None,
        snap_to_vocabulary: bool = True,
        pretrained_model_name_or_path: str | None = None,
    ):
        super().__init__()
        if not 0.0 < min_box_size < 1.0:
            raise ValueError(f"min_box_size must be in (0, 1), got {min_box_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.input_norm = nn.LayerNorm(embedding_dim)
        self.input_proj = nn.Linear(embedding_dim, hidden_dim)
        layers: list[nn.Module] = []
        width = 2 * hidden_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.head = nn.Sequential(*layers)
        self.box_out = nn.Linear(hidden_dim, 4)
        nn.init.zeros_(self.box_out.weight)  # start from the centred half-size box, not a random layout
        nn.init.zeros_(self.box_out.bias)
        words = list(vocabulary or [])
        self.register_buffer("vocabulary_embeddings", torch.zeros(len(words), embedding_dim))

    # ---- vocabulary (out-of-vocabulary fallback) ----
    @property
    def vocabulary(self) -> list[str]:
        return list(self.config.vocabulary or [])

    def set_vocabulary_embeddings(self, embeddings: torch.Tensor) -> None:
        """Store the input embeddings `[V, D]` of `config.vocabulary` (done once by the trainer)."""
        if tuple(embeddings.shape) != tuple(self.vocabulary_embeddings.shape):
            raise ValueError(
                f"vocabulary embeddings of shape {tuple(embeddings.shape)} do not fit "
                f"{len(self.vocabulary)} words x {self.config.embedding_dim} dims"
            )
        self.vocabulary_embeddings.copy_(embeddings.detach())

    def nearest_vocabulary(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index `[B]` of the nearest vocabulary noun (cosine similarity) and that similarity `[B]`."""
        if self.vocabulary_embeddings.shape[0] == 0:
            raise ValueError("this LocationMLP stores no vocabulary, so it has no nearest-noun fallback")
        vocab = self.vocabulary_embeddings.to(embeddings.dtype)
        sims = F.normalize(embeddings, dim=-1) @ F.normalize(vocab, dim=-1).T
        best, index = sims.max(dim=-1)
        return index, best

    def snap(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Replace each embedding `[B, D]` by its nearest vocabulary noun's embedding."""
        index, _ = self.nearest_vocabulary(embeddings)
        return self.vocabulary_embeddings[index].to(embeddings.dtype)

    # ---- boxes ----
    def _encode(self, e: torch.Tensor) -> torch.Tensor:
        return self.input_proj(self.input_norm(e))

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, snap: bool | None = None) -> torch.Tensor:
        """Boxes `[B, 2, 4]` for the pair (a, b). `snap=None` snaps when a vocabulary is stored and the
        config asks for it; trainers pass `snap=False` (their inputs are vocabulary words already)."""
        if emb_a.shape != emb_b.shape or emb_a.shape[-1] != self.config.embedding_dim:
            raise ValueError(
                f"expected two [B, {self.config.embedding_dim}] embeddings, got {tuple(emb_a.shape)} and "
                f"{tuple(emb_b.shape)}"
            )
        if snap is None:
            snap = bool(self.config.snap_to_vocabulary) and self.vocabulary_embeddings.shape[0] > 0
        dtype = self.input_proj.weight.dtype
        emb_a, emb_b = emb_a.to(dtype), emb_b.to(dtype)
        if snap:
            emb_a, emb_b = self.snap(emb_a), self.snap(emb_b)
        h_a, h_b = self._encode(emb_a), self._encode(emb_b)
        raw_a = self.box_out(self.head(torch.cat([h_a, h_b], dim=-1)))
        raw_b = self.box_out(self.head(torch.cat([h_b, h_a], dim=-1)))
        return boxes_from_raw(torch.stack([raw_a, raw_b], dim=1), self.config.min_box_size)

    @torch.no_grad()
    def predict_for_words(self, word_a: str, word_b: str, tokenizer, text_encoder) -> dict:
        """Boxes for two words of a prompt (their input embeddings), with the nouns they resolved to.

        Returns `{"boxes": [[x0,y0,x1,y1], [...]], "resolved": [noun_a, noun_b]}`; `resolved` is the
        word itself when it is in the vocabulary, else its nearest noun (None without a vocabulary).
        """
        emb = embed_words([word_a, word_b], tokenizer, text_encoder).to(self.device)
        return self.predict_for_embeddings(emb[0:1], emb[1:2])

    @torch.no_grad()
    def predict_for_embeddings(self, emb_a: torch.Tensor, emb_b: torch.Tensor) -> dict:
        """As `predict_for_words` for embeddings `[1, D]` (e.g. ELITE's w0 or a learned Textual Inversion vector)."""
        emb_a = emb_a.reshape(1, -1).to(self.device)
        emb_b = emb_b.reshape(1, -1).to(self.device)
        boxes = self(emb_a, emb_b)[0].float().cpu().tolist()
        resolved: list[str | None] = [None, None]
        if self.vocabulary_embeddings.shape[0] > 0:
            index, _ = self.nearest_vocabulary(torch.cat([emb_a, emb_b]).to(self.vocabulary_embeddings.dtype))
            resolved = [self.vocabulary[i] for i in index.tolist()]
        return {"boxes": boxes, "resolved": resolved}
