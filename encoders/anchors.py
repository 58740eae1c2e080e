"""Semantic anchors: a noun vocabulary, sparse coding over its embeddings, and the L_anc regulariser.

Compositional inversion (Zhang et al., "Compositional Inversion for Stable Diffusion Models", AAAI
2024, "Semantic Inversion") keeps a learned
word embedding e near the core of the embedding space by attracting it to a few real words:

    L_anc = 1/K * sum_i delta_i * ||e - e_i||^2,   ||delta||_0 <= c

where e_1..e_K are the anchor words' token embeddings and delta is a sparse code of e over them.
The official code's anchor loss is `F.mse_loss` of the prompt's input embeddings [77, D] against the
same prompt with the anchor word in the placeholder's place: the squared distance of the one
differing row averaged over 77 x D elements. Its weight (lambda = 0.95 against 0.05 for the
denoising loss) was tuned for that scale, so the default normalisation here is the official one,
sum_i delta_i ||e - e_i||^2 / (L * D) with L the tokenizer's length (`normalisation="official"`;
with one anchor of weight 1 it is the official loss exactly); "paper" divides by K as written above
(for K = 80 anchors and SD v1's 77 x 768, about 740 times stronger).
The paper names sparse coding but ships none: its code's one anchor is the initializer word with
weight 1 (`sparse=False` over that one word); for Eq. 6 as printed the code comes
from scikit-learn: a non-negative Lasso path (`sklearn.linear_model.lars_path`, "lasso", the default
and the regulariser's) picks at most c anchors and `scipy.optimize.nnls` fits their non-negative
weights; orthogonal matching pursuit (`sklearn.decomposition.sparse_encode`, "omp") gives signed
codes for analysis.
Non-negative weights are what the regulariser needs: a negative delta_i would push e away from
anchor i without bound. With weights summing to s, L_anc is minimised at sum_i delta_i e_i / s.

Embeddings are *input* token embeddings (the rows of the text encoder's embedding table, the space
Textual Inversion and ELITE's w0 live in); a word that the tokenizer splits into several tokens is
the mean of its token rows.

Use from a fine-tune (one line per step; the code is refreshed every `refresh_every` calls):

    reg = AnchorRegularizer.from_text_encoder(tokenizer, text_encoder, max_active=3)
    loss = (1 - lam) * rec_loss + lam * reg(learned_embedding)      # paper: lam = 0.95 for TI
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import yaml

ASSETS = Path(__file__).parent / "assets"
COCO_CLASS_NAMES_PATH = ASSETS / "coco_class_names.yaml"
SPARSE_CODING_METHODS = ("lasso", "omp")


@lru_cache(maxsize=1)
def _coco_names() -> tuple[str, ...]:
    names = yaml.safe_load(COCO_CLASS_NAMES_PATH.read_text())
    return tuple(str(n) for n in names)


def coco_class_names() -> list[str]:
    """COCO's 80 object class names, in category order (the package's own copy)."""
    return list(_coco_names())


def load_vocabulary(source: str | Path | None = None) -> list[str]:
    """A noun list: `None` or "coco" gives COCO's 80 names; otherwise a YAML list or a text file, one word a line.

    Blank lines and `#` comments are skipped; duplicates are an error (they would make the nearest-
    noun lookup ambiguous), as is an empty list.
    """
    if source is None or str(source).lower() == "coco":
        return coco_class_names()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist (use 'coco' for the built-in COCO names)")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"vocabulary file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, list) or not all(isinstance(w, str) for w in loaded):
            raise ValueError(f"vocabulary file {path} must hold a list of words")
        words = [w.strip() for w in loaded if w.strip()]
    else:
        words = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        words = [w for w in words if w]
    if not words:
        raise ValueError(f"vocabulary file {path} holds no words")
    seen: set[str] = set()
    dups = sorted({w for w in words if w in seen or seen.add(w)})
    if dups:
        raise ValueError(f"vocabulary file {path} repeats words: {', '.join(dups)}")
    return words


def _embedding_table(text_encoder) -> torch.nn.Embedding:
    if isinstance(text_encoder, torch.nn.Embedding):
        return text_encoder
    if hasattr(text_encoder, "get_input_embeddings"):
        return text_encoder.get_input_embeddings()
    raise TypeError(f"expected a text encoder or an nn.Embedding, got {type(text_encoder).__name__}")


@torch.no_grad()
def embed_words(words: Sequence[str], tokenizer, text_encoder) -> torch.Tensor:
    """Input token embeddings `[N, D]` of `words` (mean over a word's tokens; no BOS/EOS).

    `text_encoder` is a transformers text model (its `get_input_embeddings()` is read) or the
    embedding table itself. Returned on the table's device and dtype, detached. Lists of tokenizers
    and text encoders (SDXL's two) give each word's rows of every table side by side, the width of
    the words learned for such a base (on the first table's device).
    """
    if isinstance(text_encoder, (list, tuple)):
        tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        if len(tokenizers) != len(text_encoder):
            raise ValueError(f"{len(tokenizers)} tokenizers for {len(text_encoder)} text encoders: give one each")
        tables = [embed_words(words, t, e) for t, e in zip(tokenizers, text_encoder)]
        return torch.cat([t.to(tables[0].device, tables[0].dtype) for t in tables], dim=-1)
    table = _embedding_table(text_encoder)
    rows = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"word {word!r} gives no tokens with this tokenizer")
        index = torch.tensor(ids, device=table.weight.device)
        rows.append(table.weight[index].mean(dim=0))
    if not rows:
        return table.weight.new_zeros(0, table.embedding_dim)
    return torch.stack(rows).detach()


def _as_2d_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    return np.atleast_2d(arr).astype(np.float64)


def sparse_code(
    embeddings: torch.Tensor | np.ndarray,
    anchors: torch.Tensor | np.ndarray,
    max_active: int,
    method: str = "lasso",
    positive: bool = True,
) -> np.ndarray:
    """Sparse code `[B, K]` of each embedding `[B, D]` (or `[D]`) over anchor embeddings `[K, D]`.

    Each row has at most `max_active` non-zeros, so that `code @ anchors` approximates the embedding.
    Two steps, both from the libraries: pick the active anchors (the support), then fit their weights.
    - support, "lasso" (default): the Lasso path, `sklearn.linear_model.lars_path(method="lasso",
      positive=positive)`; its last point with at most `max_active` active anchors.
      "omp": orthogonal matching pursuit, `sklearn.decomposition.sparse_encode(algorithm="omp")`;
      signed only (`positive=False`): OMP picks atoms by |correlation|, and forcing its weights
      non-negative afterwards can zero the whole code, so that combination is refused.
    - weights: least squares on the support, non-negative (`scipy.optimize.nnls`) when `positive`
      (what the L_anc regulariser needs), else unconstrained (OMP's own coefficients).
    Atoms are scaled to unit norm for the selection (both solvers assume it) and the weights mapped
    back, so they apply to the anchors as given.
    """
    if method not in SPARSE_CODING_METHODS:
        raise ValueError(f"unknown sparse coding method {method!r}; choose one of {', '.join(SPARSE_CODING_METHODS)}")
    if max_active < 1:
        raise ValueError(f"max_active must be at least 1, got {max_active}")
    if method == "omp" and positive:
        raise ValueError("method='omp' gives signed weights; pass positive=False, or use method='lasso' (non-negative)")
    x = _as_2d_numpy(embeddings)
    dictionary = _as_2d_numpy(anchors)
    if x.shape[1] != dictionary.shape[1]:
        raise ValueError(f"embedding dim {x.shape[1]} does not match anchor dim {dictionary.shape[1]}")
    norms = np.linalg.norm(dictionary, axis=1)
    if np.any(norms == 0):
        raise ValueError("an anchor embedding is all zeros; it cannot be used as an atom")
    unit = dictionary / norms[:, None]
    k = min(max_active, dictionary.shape[0])

    from scipy.optimize import nnls

    if method == "omp":
        from sklearn.decomposition import sparse_encode

        supports = [np.flatnonzero(row) for row in sparse_encode(x, unit, algorithm="omp", n_nonzero_coefs=k)]
    else:
        from sklearn.linear_model import lars_path

        supports = []
        for target in x:
            _, _, path = lars_path(unit.T, target, method="lasso", positive=positive)
            fitting = np.flatnonzero((path != 0).sum(axis=0) <= k)
            supports.append(np.flatnonzero(path[:, fitting[-1]]))

    code = np.zeros((x.shape[0], dictionary.shape[0]))
    for row, (target, support) in enumerate(zip(x, supports)):
        if support.size == 0:
            continue  # no anchor correlates positively with the embedding: an all-zero code
        basis = unit[support].T
        if positive:
            weights, _ = nnls(basis, target)
        else:
            weights = np.linalg.lstsq(basis, target, rcond=None)[0]
        code[row, support] = weights
    return code / norms[None, :]


NORMALISATIONS = ("official", "paper")


def anchor_loss(
    embedding: torch.Tensor,
    anchor_embeddings: torch.Tensor,
    weights: torch.Tensor,
    normalisation: str = "official",
    sequence_length: int = 77,
) -> torch.Tensor:
    """L_anc = mean over the batch of sum_i delta_i ||e - e_i||^2, divided by `sequence_length` x D
    ("official", the official code's MSE over a prompt's input embeddings) or by K ("paper", Eq. 6).

    `embedding` `[B, D]` or `[D]` (differentiable), `anchor_embeddings` `[K, D]`, `weights` `[B, K]` or `[K]`
    (non-negative; typically `sparse_code(...)` of the detached embedding). Returns a scalar tensor.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    e = embedding.reshape(-1, embedding.shape[-1])
    w = torch.as_tensor(weights, dtype=e.dtype, device=e.device).reshape(e.shape[0], -1)
    a = anchor_embeddings.to(device=e.device, dtype=e.dtype)
    if w.shape[1] != a.shape[0]:
        raise ValueError(f"weights cover {w.shape[1]} anchors but {a.shape[0]} anchor embeddings were given")
    if bool((w < 0).any()):
        raise ValueError("anchor weights must be non-negative (use sparse_code(..., positive=True))")
    sq_dist = ((e[:, None, :] - a[None, :, :]) ** 2).sum(dim=-1)  # [B, K]
    scale = a.shape[0] if normalisation == "paper" else sequence_length * e.shape[-1]
    return (w * sq_dist).sum(dim=1).div(scale).mean()


class AnchorRegularizer(torch.nn.Module):
    """L_anc as a module: sparse-codes the embedding over fixed anchors and returns the weighted pull.

    The anchors are constants (a buffer, moved with `.to()`); only the embedding passed in gets
    gradients. The code (which anchors, how strongly) is recomputed from the detached embedding every
    `refresh_every` calls, as the embedding drifts during optimisation; `last_code()` tells which
    anchors are active (for logging).
    """

    def __init__(
        self,
        words: Sequence[str],
        anchor_embeddings: torch.Tensor,
        max_active: int = 3,
        method: str = "lasso",
        refresh_every: int = 1,
        normalisation: str = "official",
        sequence_length: int = 77,
        sparse: bool = True,
    ):
        super().__init__()
        self.sparse = bool(sparse)
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
        self.normalisation = normalisation
        self.sequence_length = int(sequence_length)
        if len(words) != anchor_embeddings.shape[0]:
            raise ValueError(f"{len(words)} anchor words but {anchor_embeddings.shape[0]} anchor embeddings")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be at least 1, got {refresh_every}")
        if method != "lasso":
            raise ValueError(
                f"AnchorRegularizer needs non-negative weights, which method={method!r} cannot give; use method='lasso'"
            )
        self.words = list(words)
        self.max_active = max_active
        self.method = method
        self.refresh_every = refresh_every
        self.register_buffer("anchor_embeddings", anchor_embeddings.detach().clone(), persistent=False)
        self._calls = 0
        self._weights: torch.Tensor | None = None

    @classmethod
    def from_text_encoder(
        cls, tokenizer, text_encoder, words: Iterable[str] | str | Path | None = None, **kwargs
    ) -> AnchorRegularizer:
        """Anchors = input embeddings of `words` (a list, a vocabulary file, or None for COCO's 80 names);
        the official normalisation's L is the tokenizer's length.

        With lists of tokenizers and text encoders (SDXL's two) an anchor is its word's rows of every
        table side by side, as wide as the words learned for such a base (`encoders.text_injection.
        encode_prompt_with_words`): one sparse code for all tables, L_anc over the joint width (the
        official normalisation then is the MSE over both prompts' input embeddings together).
        """
        vocab = list(words) if words is not None and not isinstance(words, (str, Path)) else load_vocabulary(words)
        first = tokenizer[0] if isinstance(tokenizer, (list, tuple)) else tokenizer
        kwargs.setdefault("sequence_length", int(getattr(first, "model_max_length", 77)))
        embeddings = embed_words(vocab, tokenizer, text_encoder).float()
        empty = [w for w, row in zip(vocab, embeddings) if not bool(row.abs().sum())]
        if empty:  # e.g. COCO's names on a base trained without them (the miniature world stores them as zeros)
            raise ValueError(
                f"the text encoder has no embedding for the anchor word(s) {', '.join(map(repr, empty[:5]))}"
                f"{' ...' if len(empty) > 5 else ''} (all zeros): choose anchors it knows with anchors.vocabulary=FILE "
                "(one word a line; the miniature world's: configs/world/anchor_words.txt)"
            )
        return cls(vocab, embeddings, **kwargs)

    def code(self, embedding: torch.Tensor) -> torch.Tensor:
        """The sparse code `[B, K]` of `embedding` (non-negative, at most `max_active` non-zeros per row); with
        `sparse=False` every anchor has weight 1 (the official code's single initializer anchor)."""
        if not self.sparse:
            rows = embedding.reshape(-1, embedding.shape[-1]).shape[0]
            return torch.ones(rows, len(self.words), device=self.anchor_embeddings.device)
        weights = sparse_code(embedding, self.anchor_embeddings, self.max_active, method=self.method, positive=True)
        return torch.from_numpy(weights).to(self.anchor_embeddings.device, torch.float32)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        rows = embedding.reshape(-1, embedding.shape[-1])
        stale = self._weights is None or self._weights.shape[0] != rows.shape[0]
        if stale or self._calls % self.refresh_every == 0:
            self._weights = self.code(rows)
        self._calls += 1
        return anchor_loss(rows, self.anchor_embeddings, self._weights, self.normalisation, self.sequence_length)

    def last_code(self, top: int | None = None) -> list[list[tuple[str, float]]]:
        """Active anchors and weights of the latest code, per embedding, strongest first."""
        if self._weights is None:
            return []
        out = []
        for row in self._weights.cpu().numpy():
            active = [(self.words[i], float(row[i])) for i in np.argsort(-row) if row[i] > 0]
            out.append(active[:top] if top else active)
        return out
