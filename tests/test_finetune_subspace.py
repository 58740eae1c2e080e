"""BaTex textual subspace: vocabulary order, the rank rule, the one-hot start and the span of the basis."""

from __future__ import annotations

import pytest
import torch

from encoders.subspace import TextualSubspace, matrix_rank, select_basis_ids, vocabulary_order


def span_residual(vector: torch.Tensor, basis: torch.Tensor) -> float:
    """Relative distance of `vector` from the row span of `basis` (least squares, float64)."""
    b = basis.double().T
    coef = torch.linalg.lstsq(b, vector.double()[:, None]).solution
    return ((b @ coef).squeeze(1) - vector.double()).norm().item() / vector.double().norm().item()


def vocab_with_structure(seed=0):
    """A 600 x 16 vocabulary whose 30 nearest words to word 0 are collinear with it (rank 1)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(600, 16, generator=g)
    emb[1:31] = emb[0] * (0.5 + torch.rand(30, 1, generator=g))
    return emb


@pytest.mark.parametrize("distance", ["dot", "cosine", "l2"])
def test_order_puts_initializer_first_and_sorts_by_distance(distance):
    emb = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    order = vocabulary_order(emb, 7, distance, exclude_ids=[3, 4])
    assert order[0].item() == 7
    assert 3 not in order.tolist() and 4 not in order.tolist() and len(order) == 198
    u, rest = emb[7], emb[order[1:]]
    if distance == "dot":
        score = rest @ u
    elif distance == "cosine":
        score = torch.nn.functional.cosine_similarity(rest, u[None], dim=-1)
    else:
        score = -(rest - u).norm(dim=-1)
    assert torch.all(score[:-1] >= score[1:] - 1e-6)


@pytest.mark.parametrize("distance", ["dot", "cosine", "l2"])
@pytest.mark.parametrize("dim", [1, 4, 12, 16])
def test_rank_rule_picks_smallest_top_m_reaching_the_dimension(distance, dim):
    emb = vocab_with_structure()
    ids = select_basis_ids(emb, 0, dim, distance)
    order = vocabulary_order(emb, 0, distance)
    assert torch.equal(ids, order[: len(ids)])  # a prefix of the nearest-first order
    assert matrix_rank(emb[ids]) >= dim  # Algorithm 1 stops once r(V_M) >= d1 ...
    assert matrix_rank(emb[ids[:-1]]) < dim  # ... and not a word later
    if dim > 1 and distance == "cosine":
        assert len(ids) > 31  # the 30 collinear neighbours add no rank


def test_rank_rule_errors_name_the_problem():
    emb = torch.randn(50, 8)
    with pytest.raises(ValueError, match="embedding width"):
        select_basis_ids(emb, 0, 9)
    flat = torch.randn(50, 1) * torch.randn(1, 8)  # rank-1 vocabulary
    with pytest.raises(ValueError, match="span only rank 1"):
        select_basis_ids(flat, 0, 2)
    with pytest.raises(ValueError, match="unknown subspace distance"):
        vocabulary_order(emb, 0, "manhattan")


def test_subspace_starts_at_initializer_and_stays_in_span(tiny_sd_path, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path / "text_encoder")
    vocab = text_encoder.get_input_embeddings().weight.detach()
    dog = tokenizer.convert_tokens_to_ids("dog</w>")
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    sub = TextualSubspace.from_vocabulary(vocab, dog, subspace_dim=24, distance="dot", exclude_ids=special)

    assert sub.basis_ids[0].item() == dog
    assert not set(special) & set(sub.basis_ids.tolist())
    assert torch.equal(sub(), vocab[dog])  # one-hot start: v0 = u
    assert sub.rank >= 24 and matrix_rank(sub.basis[:-1]) < 24

    with torch.no_grad():  # any weights: v stays in span(V_M); a random vector does not (d1 < d)
        sub.weights.add_(torch.randn_like(sub.weights))
    assert span_residual(sub(), sub.basis) < 1e-6
    assert span_residual(torch.randn(vocab.shape[1]), sub.basis) > 1e-2

    sub.save_pretrained(tmp_path / "subspace")
    again = TextualSubspace.from_pretrained(tmp_path / "subspace")
    assert torch.equal(again(), sub()) and torch.equal(again.basis_ids, sub.basis_ids)
    assert again.config.subspace_dim == 24 and again.config.distance == "dot"


def test_gradient_update_is_projected_onto_the_subspace():
    """Theorem 2: one SGD step on w moves v by V_M V_M^T times Textual Inversion's step."""
    emb = vocab_with_structure(1)
    sub = TextualSubspace.from_vocabulary(emb, 0, subspace_dim=6, distance="dot")
    target = torch.randn(16)
    loss = (sub() - target).pow(2).sum()
    loss.backward()
    grad_v = 2 * (emb[0] - target)  # Textual Inversion's gradient at v = u
    step_w = -0.1 * sub.weights.grad
    expected = -0.1 * (sub.basis.T @ (sub.basis @ grad_v))
    assert torch.allclose(step_w @ sub.basis, expected, atol=1e-4)


def test_topk_selection_is_the_k_nearest_by_dot_product_and_starts_on_the_top_one():
    """The official BaTex script: the 720 (here 50) words with the largest dot product with u, the initializer
    ranked by its own score (a longer word can outrank it), weights one-hot on the top-1 neighbour."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(300, 8, generator=g)
    emb[11] = emb[7] * 3.0  # a word with a larger dot product with u than u itself
    sub = TextualSubspace.from_vocabulary(emb, 7, subspace_dim=4, selection="topk", num_basis=50, exclude_ids=[0])
    scores = emb @ emb[7]
    scores[0] = float("-inf")
    expected = torch.argsort(scores, descending=True, stable=True)[:50]
    assert torch.equal(sub.basis_ids, expected)
    assert sub.basis_ids[0].item() == 11 and 7 in sub.basis_ids.tolist()
    assert torch.allclose(sub(), emb[11])  # the one-hot start is the top-1 neighbour
    assert sub.config.selection == "topk" and sub.config.num_basis == 50
    with pytest.raises(ValueError, match="selection"):
        TextualSubspace.from_vocabulary(emb, 7, subspace_dim=4, selection="nearest")
