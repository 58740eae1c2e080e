"""LocationMLP: valid boxes by construction, swap symmetry, Hub-style round trip, nearest-noun fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.anchors import coco_class_names, embed_words
from encoders.location_mlp import LocationMLP


def _random_mlp(dim=16, vocabulary=None, seed=0):
    torch.manual_seed(seed)
    model = LocationMLP(embedding_dim=dim, hidden_dim=24, num_layers=2, min_box_size=0.1, vocabulary=vocabulary)
    for p in model.parameters():  # make the output head non-trivial (it starts at zero)
        torch.nn.init.normal_(p, std=3.0)
    return model


def test_boxes_are_valid_for_any_input():
    model = _random_mlp()
    a = torch.randn(512, 16) * torch.logspace(-3, 4, 512)[:, None]
    b = torch.randn(512, 16) * 1e3
    boxes = model(a, b)
    assert boxes.shape == (512, 2, 4) and torch.isfinite(boxes).all()
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1).all() and (y1 <= 1).all()
    assert ((x1 - x0) >= 0.1 - 1e-6).all() and ((y1 - y0) >= 0.1 - 1e-6).all()
    # and the outputs really vary (not a degenerate constant)
    assert boxes[:, 0, 0].std() > 0.05


def test_fresh_model_starts_at_the_centred_box():
    model = LocationMLP(embedding_dim=8, hidden_dim=8, min_box_size=0.2)
    boxes = model(torch.randn(3, 8), torch.randn(3, 8))
    size = 0.2 + 0.8 * 0.5
    expected = torch.tensor([(1 - size) / 2, (1 - size) / 2, (1 + size) / 2, (1 + size) / 2])
    assert torch.allclose(boxes, expected.expand(3, 2, 4), atol=1e-6)


def test_swapping_the_inputs_swaps_the_boxes():
    model = _random_mlp()
    a, b = torch.randn(7, 16), torch.randn(7, 16)
    ab, ba = model(a, b), model(b, a)
    assert torch.allclose(ab[:, 0], ba[:, 1]) and torch.allclose(ab[:, 1], ba[:, 0])
    assert not torch.allclose(ab[:, 0], ab[:, 1])


def test_save_and_load_with_subfolder(tmp_path):
    model = _random_mlp(vocabulary=["cat", "dog", "car"])
    model.register_to_config(pretrained_model_name_or_path="tiny/sd")
    model.set_vocabulary_embeddings(torch.randn(3, 16))
    model.save_pretrained(tmp_path / "encoders" / "location_mlp")
    assert list((tmp_path / "encoders" / "location_mlp").glob("*.safetensors"))
    loaded = LocationMLP.from_pretrained(tmp_path / "encoders", subfolder="location_mlp")
    assert loaded.vocabulary == ["cat", "dog", "car"]
    assert loaded.config.pretrained_model_name_or_path == "tiny/sd"
    assert torch.equal(loaded.vocabulary_embeddings, model.vocabulary_embeddings)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    assert torch.allclose(loaded(a, b), model(a, b))
    with pytest.raises(ValueError, match="do not fit"):
        loaded.set_vocabulary_embeddings(torch.randn(4, 16))


def test_out_of_vocabulary_words_take_the_nearest_noun(tiny_sd_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path / "text_encoder")
    vocab = coco_class_names()
    vocab_emb = embed_words(vocab, tokenizer, text_encoder)
    dim = vocab_emb.shape[1]
    model = _random_mlp(dim=dim, vocabulary=vocab)
    model.set_vocabulary_embeddings(vocab_emb)

    for word in ["puppy", "sphinx", "spacesuit"]:
        e = embed_words([word], tokenizer, text_encoder)[0].numpy()
        v = vocab_emb.numpy()
        cos = v @ e / (np.linalg.norm(v, axis=1) * np.linalg.norm(e))
        expected = vocab[int(np.argmax(cos))]
        result = model.predict_for_words(word, "dog", tokenizer, text_encoder)
        assert result["resolved"] == [expected, "dog"]
        direct = model.predict_for_words(expected, "dog", tokenizer, text_encoder)
        assert np.allclose(result["boxes"], direct["boxes"])  # the fallback uses the noun's layout
    # an in-vocabulary word maps to itself and snapping is the identity for it
    assert model.predict_for_words("cat", "bus", tokenizer, text_encoder)["resolved"] == ["cat", "bus"]
    raw = model(vocab_emb[:5], vocab_emb[5:10], snap=False)
    assert torch.allclose(raw, model(vocab_emb[:5], vocab_emb[5:10]))


def test_no_vocabulary_means_no_fallback():
    model = _random_mlp()
    a = torch.randn(2, 16)
    assert model(a, a).shape == (2, 2, 4)  # snap is skipped without a vocabulary
    with pytest.raises(ValueError, match="no vocabulary"):
        model.nearest_vocabulary(a)
