"""Metric functions give known values on constructed inputs; the model wrappers load tiny models by path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from inference.evaluation import metrics


def concept_photos(data_dir, subject="dog", n=3):
    files = sorted((data_dir / "concepts" / "dreambooth" / subject).glob("*.jpg"))[:n]
    return [Image.open(f).convert("RGB") for f in files]


# ---------------------------------------------------------------- plain functions


def test_mean_pairwise_similarity_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.mean_pairwise_similarity(a[:1], a[:1] * 3) == pytest.approx(1.0)  # scale-free
    assert metrics.mean_pairwise_similarity(a[:1], a[1:]) == pytest.approx(0.0)
    assert metrics.mean_pairwise_similarity(a[:1], -a[:1]) == pytest.approx(-1.0)
    # mean over all 2 x 2 pairs: (1 + 0 + 0 + 1) / 4
    assert metrics.mean_pairwise_similarity(a, a) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.mean_pairwise_similarity(a, torch.ones(2, 3))


def test_paired_similarity_is_rowwise():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, -1.0]])
    assert torch.allclose(metrics.paired_similarity(img, txt), torch.tensor([1.0, 0.0]), atol=1e-6)


def test_replace_placeholder():
    r = metrics.replace_placeholder
    assert r("a photo of S* on the beach", "S*", "dog") == "a photo of dog on the beach"
    assert r("a S* dog in the snow", "S*", "dog") == "a dog in the snow"  # no "dog dog"
    assert r("a S* and a S* cat", "S*", "cat") == "a cat and a cat"
    assert r("a cat in the snow", "", "cat") == "a cat in the snow"


def test_coi_likelihood():
    found = [{"dog", "person"}, {"Cat"}, set(), {"dog"}]
    assert metrics.coi_likelihood(found, ["dog", "cat", "dog", "bicycle"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.coi_likelihood(found, ["dog"])


def test_latent_fisher_divergence_known_values():
    eps = torch.randn(3, 4, 8, 8)
    assert metrics.latent_fisher_divergence(eps, eps) == 0.0
    # a constant offset of 0.5 on each of 256 entries: 1/2 * 256 * 0.25 = 32 per sample
    assert metrics.latent_fisher_divergence(eps, eps + 0.5) == pytest.approx(32.0, rel=1e-5)


def test_a_v_prediction_is_measured_as_the_noise_it_implies():
    """Fisher divergence is on scores: a v-prediction base's outputs are turned back into the noise they imply
    (the noise that made the noisy latent, for the exact v), so SD 2.x-style bases are measured like SD v1's."""
    from diffusers import DDPMScheduler

    from inference.evaluation.overfitting import as_epsilon

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (10, 500, 999):
        step = torch.tensor([t, t])
        noisy = scheduler.add_noise(x0, noise, step)
        velocity = scheduler.get_velocity(x0, noise, step)
        assert torch.allclose(as_epsilon(scheduler, velocity, noisy, step), noise, atol=1e-4)


def test_gaussian_w2_known_values():
    torch.manual_seed(0)
    x = torch.randn(40, 500)  # D >> N: exact through the nuclear-norm form
    assert metrics.gaussian_w2(x, x) == pytest.approx(0.0, abs=1e-5)
    shift = torch.full((500,), 0.1)
    assert metrics.gaussian_w2(x, x + shift) == pytest.approx(shift.norm().item(), rel=1e-6)
    # isotropic scaling: W2 between N(0, C) and N(0, s^2 C) is |1 - s| sqrt(tr C)
    x = x - x.mean(0)
    trace = torch.cov(x.T.double()).trace().item()
    assert metrics.gaussian_w2(x, 3 * x) == pytest.approx(2 * math.sqrt(trace), rel=1e-6)


def test_gaussian_w2_matches_full_covariance_formula():
    torch.manual_seed(1)
    a = torch.randn(300, 6)
    b = torch.randn(200, 6) @ torch.randn(6, 6) + 2.0
    expected = metrics.gaussian_w2_from_moments(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert metrics.gaussian_w2(a, b) == pytest.approx(expected, rel=1e-6)
    # diagonal Gaussians have the closed form sqrt(|mu|^2 + sum (s_a - s_b)^2)
    diag = metrics.gaussian_w2_from_moments(
        torch.zeros(2),
        torch.diag(torch.tensor([1.0, 4.0])),
        torch.tensor([3.0, 0.0]),
        torch.diag(torch.tensor([4.0, 1.0])),
    )
    assert diag == pytest.approx(math.sqrt(9 + 1 + 1))


# ---------------------------------------------------------------- model wrappers on tiny models


def test_clip_scorer_identical_images_give_clip_i_one(tiny_eval_models, data_dir):
    photos = concept_photos(data_dir)
    clip = metrics.ClipScorer(str(tiny_eval_models / "eval_clip"))
    assert clip.clip_i(photos[:1], photos[:1]) == pytest.approx(1.0, abs=1e-5)
    assert clip.clip_i(photos[:1], photos[1:]) < 1.0
    emb = clip.image_embeds(photos)
    assert emb.shape == (3, clip.model.config.projection_dim)
    # CLIP-T is the mean of per-image cosines with the matching prompt embeddings
    prompts = ["a dog on the beach", "a dog in the snow", "a red dog"]
    manual = metrics.paired_similarity(emb, clip.text_embeds(prompts)).mean().item()
    assert clip.clip_t(photos, prompts) == pytest.approx(manual, abs=1e-6)
    assert -1.0 <= manual <= 1.0


def test_dino_scorer_identical_images_give_dino_i_one(tiny_eval_models, data_dir):
    photos = concept_photos(data_dir, "cat", 2)
    dino = metrics.DinoScorer(str(tiny_eval_models / "dino"))
    assert dino.dino_i(photos[:1], photos[:1]) == pytest.approx(1.0, abs=1e-5)
    emb = dino.image_embeds(photos)
    assert emb.shape == (2, dino.model.config.hidden_size)
    assert not torch.allclose(emb[0], emb[1])


def test_detector_returns_label_names(tiny_eval_models, data_dir):
    if not (tiny_eval_models / "detector").exists():
        pytest.skip("the tiny DETR ('detector') is not registered in encoders.tiny yet")
    detector = metrics.ObjectDetector(str(tiny_eval_models / "detector"), threshold=0.0)
    photos = concept_photos(data_dir, "dog", 2)
    found = detector.detect(photos)
    assert len(found) == 2
    names = set(detector.label_names)
    assert all(label in names or label.upper() == "N/A" for labels in found for label in labels)
    # with threshold 0 every image has detections, and the likelihood follows what was detected
    label = next(iter(found[0]))
    assert detector.coi_likelihood(photos[:1], [label]) == 1.0


# ---------------------------------------------------------------- the protocols' metrics, recomputed plainly


def test_dreambench_dino_view_is_resize_256_then_centre_crop_224(data_dir):
    """DreamBench's DINO preprocessing, recomputed step by step: the shorter side to 256 (bicubic), the centre
    224 x 224, ImageNet normalisation; a 224 squash of the same photo differs."""
    from PIL import Image

    photo = Image.open(sorted((data_dir / "concepts" / "dreambooth" / "dog").glob("*.jpg"))[0]).convert("RGB")
    photo = photo.crop((0, 0, photo.width, int(photo.height * 0.8)))  # make sure it is not square
    w, h = photo.size
    new = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    resized = np.asarray(photo.resize(new, Image.BICUBIC), dtype=np.float64) / 255.0
    top, left = int(round((new[1] - 224) / 2)), int(round((new[0] - 224) / 2))
    crop = resized[top : top + 224, left : left + 224]
    expected = np.empty((3, 224, 224))
    for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        expected[c] = (crop[:, :, c] - mean) / std
    got = metrics.dreambench_pixels([photo])[0].double().numpy()
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    squashed = np.asarray(photo.resize((224, 224), Image.BICUBIC), dtype=np.float64) / 255.0
    assert np.abs((squashed[:, :, 0] - 0.485) / 0.229 - got[0]).mean() > 0.05


@pytest.mark.parametrize(
    ("protocol", "template", "text", "scale", "floor"),
    [
        ("compositional", "{} and dog", "cat and dog", 2.5, False),
        ("batex", "A photo of {} on the beach", "A photo of * on the beach", 2.5, True),
        ("textual_inversion", "A photo of {} on the moon", "A photo of on the moon", 1.0, False),
    ],
)
def test_protocol_clip_t_is_its_codes_formula(
    tiny_eval_models, data_dir, tmp_path, protocol, template, text, scale, floor
):
    """Each protocol's CLIP-T through the evaluation's scorer equals its paper's code recomputed by hand: the text
    it scores against and scale x cosine (BaTex's CLIPScore floors the cosine at 0)."""
    from PIL import Image

    from inference.evaluation.config import EvalConfig
    from inference.evaluation.plan import ConceptFolder, Row
    from inference.evaluation.prompts import PromptSpec
    from inference.evaluation.protocols import PROTOCOL_TABLE, Sampling
    from inference.evaluation.scoring import Scorer

    config = EvalConfig(
        concepts=[str(tmp_path)],
        clip_model=str(tiny_eval_models / "eval_clip"),
        detector_model=str(tiny_eval_models / "detector"),
    )
    scorer = Scorer(config, "cpu", PROTOCOL_TABLE[protocol])
    photos = concept_photos(data_dir, "cat", 2)
    concept = ConceptFolder("cat", tmp_path, "cat")
    row = Row("base", "base", concept, None, Sampling("ddim", 1, 1.0))
    spec = PromptSpec(0, template, "dog" if protocol == "compositional" else None, image_alignment=False)
    records = scorer.score(row, [(spec, s, photo, {}) for s, photo in enumerate(photos)], None, None)

    clip = scorer.clip
    images = clip.image_embeds([Image.fromarray(np.asarray(p)) for p in photos]).double()
    words = clip.text_embeds([text]).double()
    cosine = (images / images.norm(dim=-1, keepdim=True)) @ (words / words.norm(dim=-1, keepdim=True)).T
    expected = scale * (cosine.clamp_min(0) if floor else cosine)[:, 0]
    assert [r["clip_t"] for r in records] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(r["prompt"] == text for r in records)


def test_coi_counts_labels_scored_above_the_threshold(tiny_eval_models, data_dir):
    """The CoI detector keeps a query's label when its best non-background class probability is above the threshold
    (DETR's post-processing at Compositional Inversion's 0.8), recomputed from the raw logits."""
    if not (tiny_eval_models / "detector").exists():
        pytest.skip("the tiny DETR ('detector') is not registered in encoders.tiny yet")
    photos = concept_photos(data_dir, "dog", 2)
    probe = metrics.ObjectDetector(str(tiny_eval_models / "detector"), threshold=0.0)
    inputs = probe.processor(images=photos, return_tensors="pt")
    with torch.no_grad():
        probs = probe.model(**inputs).logits.softmax(-1)[..., :-1]
    best, labels = probs.max(-1)
    threshold = float(best.flatten().median())  # half the queries on each side
    detector = metrics.ObjectDetector(str(tiny_eval_models / "detector"), threshold=threshold)
    id2label = detector.model.config.id2label
    expected = [{id2label[int(k)] for k, p in zip(labels[i], best[i]) if p > threshold} for i in range(len(photos))]
    assert detector.detect(photos) == expected
    assert metrics.DEFAULT_DETECTION_THRESHOLD == 0.8
