"""Semantic anchors: vocabulary, word embeddings, sparse coding (sklearn) and the L_anc regulariser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from encoders.anchors import (
    AnchorRegularizer,
    anchor_loss,
    coco_class_names,
    embed_words,
    load_vocabulary,
    sparse_code,
)


@pytest.fixture(scope="module")
def text_model(tiny_sd_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer"), CLIPTextModel.from_pretrained(
        tiny_sd_path / "text_encoder"
    )


@pytest.fixture(scope="module")
def coco_anchors(text_model):
    tokenizer, text_encoder = text_model
    return embed_words(coco_class_names(), tokenizer, text_encoder).double().numpy()


def test_package_vocabulary_matches_the_sample_data(data_dir):
    shipped = yaml.safe_load((data_dir / "prompts" / "coco_class_names.yaml").read_text())
    assert coco_class_names() == shipped and len(shipped) == 80
    assert load_vocabulary("coco") == load_vocabulary(None) == shipped


def test_vocabulary_files(tmp_path):
    txt = tmp_path / "nouns.txt"
    txt.write_text("dog\n# a comment\n\ncat  # inline\nteddy bear\n")
    assert load_vocabulary(txt) == ["dog", "cat", "teddy bear"]
    dup = tmp_path / "dup.yaml"
    dup.write_text("- dog\n- cat\n- dog\n")
    with pytest.raises(ValueError, match="repeats words: dog"):
        load_vocabulary(dup)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_vocabulary(tmp_path / "missing.txt")


def test_embed_words_is_the_mean_of_the_token_rows(text_model):
    tokenizer, text_encoder = text_model
    table = text_encoder.get_input_embeddings().weight
    ids = tokenizer("traffic light", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    emb = embed_words(["dog", "traffic light"], tokenizer, text_encoder)
    dog_id = tokenizer("dog", add_special_tokens=False)["input_ids"]
    assert torch.equal(emb[0], table[dog_id[0]])
    assert torch.allclose(emb[1], (table[ids[0]] + table[ids[1]]) / 2)


@pytest.mark.parametrize("method,positive", [("lasso", True), ("lasso", False), ("omp", False)])
@pytest.mark.parametrize("c", [1, 3, 5])
def test_sparse_code_is_sparse_and_beats_the_nearest_anchor(coco_anchors, method, positive, c, text_model):
    tokenizer, text_encoder = text_model
    # words outside COCO's list, plus random points in the span of the anchors
    rng = np.random.default_rng(0)
    outside = embed_words(["puppy", "teapot", "sunglasses", "castle"], tokenizer, text_encoder).double().numpy()
    mixes = rng.dirichlet(np.ones(6), size=4) @ coco_anchors[rng.choice(80, 6, replace=False)]
    targets = np.concatenate([outside, mixes])
    code = sparse_code(targets, coco_anchors, max_active=c, method=method, positive=positive)
    assert code.shape == (8, 80)
    assert ((code != 0).sum(axis=1) <= c).all() and ((code != 0).sum(axis=1) >= 1).all()
    if positive:
        assert (code >= 0).all()
    err_code = np.linalg.norm(targets - code @ coco_anchors, axis=1)
    err_nearest = np.linalg.norm(targets[:, None, :] - coco_anchors[None], axis=2).min(axis=1)
    if c == 1:  # one scaled atom: at least as good as the nearest anchor for most targets
        assert (err_code < err_nearest).mean() >= 0.5
    else:
        assert (err_code < err_nearest).all(), (err_code, err_nearest)


def test_sparse_code_recovers_a_sparse_combination(coco_anchors):
    truth = np.zeros(80)
    truth[[3, 17, 42]] = [0.5, 0.3, 0.2]
    target = truth @ coco_anchors
    for method, positive in [("lasso", True), ("omp", False)]:
        code = sparse_code(target, coco_anchors, max_active=3, method=method, positive=positive)[0]
        assert set(np.flatnonzero(code)) == {3, 17, 42}
        np.testing.assert_allclose(code, truth, atol=1e-6)


def test_sparse_code_errors(coco_anchors):
    with pytest.raises(ValueError, match="omp"):
        sparse_code(coco_anchors[0], coco_anchors, 3, method="omp", positive=True)
    with pytest.raises(ValueError, match="non-negative"):
        AnchorRegularizer(["a"], torch.ones(1, 4), method="omp")
    with pytest.raises(ValueError, match="unknown sparse coding method"):
        sparse_code(coco_anchors[0], coco_anchors, 3, method="ista")
    with pytest.raises(ValueError, match="does not match anchor dim"):
        sparse_code(np.zeros(5), coco_anchors, 3)


def test_anchor_loss_formula_and_gradient():
    torch.manual_seed(0)
    anchors = torch.randn(6, 4)
    e = torch.randn(2, 4, requires_grad=True)
    w = torch.tensor([[0.5, 0, 0, 0.5, 0, 0], [0, 0, 1.0, 0, 0, 0]])
    loss = anchor_loss(e, anchors, w, normalisation="paper")
    expected = (
        sum(float(w[b, i]) * float(((e[b].detach() - anchors[i]) ** 2).sum()) / 6 for b in range(2) for i in range(6))
        / 2
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/de of sum_i w_i ||e - a_i||^2 / K, averaged over the batch
    grad0 = 2 * (0.5 * (e[0] - anchors[0]) + 0.5 * (e[0] - anchors[3])) / 6 / 2
    assert torch.allclose(e.grad[0], grad0.detach(), atol=1e-6)
    # the official normalisation: F.mse_loss of a [L, D] prompt embedding against the prompt with the anchor word
    # in the placeholder's row, i.e. / (L x D); the default
    single = torch.tensor([[0, 0, 1.0, 0, 0, 0]])
    prompt = torch.randn(77, 4)
    ours, reference = prompt.clone(), prompt.clone()
    ours[5], reference[5] = e[0].detach(), anchors[2]
    official = torch.nn.functional.mse_loss(ours, reference)
    assert anchor_loss(e[:1].detach(), anchors, single).item() == pytest.approx(official.item(), rel=1e-6)
    assert anchor_loss(e[:1].detach(), anchors, single, sequence_length=77).item() == pytest.approx(
        anchor_loss(e[:1].detach(), anchors, single, normalisation="paper").item() * 6 / (77 * 4), rel=1e-6
    )
    with pytest.raises(ValueError, match="non-negative"):
        anchor_loss(e, anchors, -w)


def test_regularizer_pulls_an_embedding_to_its_anchors(text_model):
    tokenizer, text_encoder = text_model
    reg = AnchorRegularizer.from_text_encoder(
        tokenizer, text_encoder, max_active=2, refresh_every=5, normalisation="paper"
    )
    anchors = reg.anchor_embeddings
    torch.manual_seed(0)  # the start's noise, independent of the tests run before
    start = 0.6 * anchors[15] + 0.4 * anchors[16] + 0.15 * torch.randn(anchors.shape[1]) * anchors.norm(dim=1).mean()
    e = start.clone().requires_grad_(True)
    opt = torch.optim.SGD([e], lr=20.0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = reg(e)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    active = reg.last_code()[0]
    assert 1 <= len(active) <= 2 and all(weight > 0 for _, weight in active)
    assert {"cat", "dog"} & {word for word, _ in active}  # anchors 15/16 are cat and dog
    assert reg.anchor_embeddings.grad is None  # anchors are constants


def test_initializer_mode_is_the_official_prompt_mse(text_model):
    """`anchors.mode=initializer` (the official compositional code's `--anchor_loss l2`): L_anc is the MSE between
    the prompt's input embeddings with the learned word at S* and the same prompt with the initializer there."""
    import torch.nn.functional as F

    from training.textual_inversion import InversionAnchorsConfig

    tokenizer, text_encoder = text_model
    reg = InversionAnchorsConfig(enabled=True).build_regularizer(tokenizer, text_encoder, "cpu", initializer="cat")
    assert reg.words == ["cat"] and not reg.sparse
    table = text_encoder.get_input_embeddings().weight.detach()
    v = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
    ids = tokenizer("a photo of cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    position = ids.index(tokenizer.convert_tokens_to_ids("cat</w>"))
    reference = table[torch.tensor(ids)]
    learned = reference.clone()
    learned[position] = v
    assert torch.allclose(reg(v), F.mse_loss(learned, reference), rtol=1e-5)
    assert reg.last_code() == [[("cat", 1.0)]]
