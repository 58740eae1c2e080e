"""Cached VAE latents: `python -m data_prep latents` shards, the loader's `latent_moments`, and the
trainer drawing the same latents it would get from the VAE, without running the encoder."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from data_prep.cli import main as data_prep_main
from training.crop_data import CropDataConfig, build_crop_dataloader

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def latent_shards(crop_shards, tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    code = data_prep_main(
        [
            "latents",
            str(crop_shards / "coco"),
            "--model",
            str(tiny_sd_path),
            "--resolution",
            "64",
            "--out",
            str(out),
            "--shard-size",
            "5",
            "--batch-size",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def _members(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_latent_shards_copy_every_sample_and_add_its_vae_posterior(crop_shards, latent_shards, tiny_sd_path):
    import io

    from diffusers import AutoencoderKL
    from PIL import Image

    source = {}
    for shard in sorted((crop_shards / "coco").glob("*.tar")):
        source.update(_members(shard))
    copied = {}
    for shard in sorted(latent_shards.glob("*.tar")):
        copied.update(_members(shard))
    manifest = json.loads((latent_shards / "manifest.json").read_text())
    keys = {name.split(".", 1)[0] for name in source}
    assert manifest["samples"] == len(keys) and manifest["settings"]["kind"] == "crop-latents"
    assert {n: b for n, b in copied.items() if not n.endswith(".latent.npy")} == source  # members kept byte for byte
    assert {n.split(".", 1)[0] for n in copied if n.endswith(".latent.npy")} == keys

    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    key = sorted(keys)[0]
    moments = np.load(io.BytesIO(copied[f"{key}.latent.npy"]))
    image = np.array(Image.open(io.BytesIO(source[f"{key}.jpg"])).convert("RGB"))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() * (2 / 255) - 1
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.parameters[0].numpy()
    assert moments.dtype == np.float16 and moments.shape == (8, 32, 32)  # mean + log-variance, 64 px / factor 2
    assert np.allclose(moments.astype(np.float32), expected, atol=2e-3, rtol=2e-3)


def test_rerun_keeps_the_finished_shards(crop_shards, latent_shards, tiny_sd_path):
    before = {p.name: p.read_bytes() for p in latent_shards.glob("*.tar")}
    code = data_prep_main(
        [
            "latents",
            str(crop_shards / "coco"),
            "--model",
            str(tiny_sd_path),
            "--resolution",
            "64",
            "--out",
            str(latent_shards),
            "--shard-size",
            "5",
            "--batch-size",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    assert {p.name: p.read_bytes() for p in latent_shards.glob("*.tar")} == before


def test_bad_inputs_are_clear_errors(crop_shards, tiny_sd_path, tmp_path, capsys):
    not_tar = tmp_path / "broken-000000.tar"
    not_tar.write_bytes(b"not a tar file")
    assert data_prep_main(["latents", str(not_tar), "--model", str(tiny_sd_path), "--out", str(tmp_path / "o")]) == 2
    assert "broken-000000.tar is not a readable tar shard" in capsys.readouterr().err
    assert (
        data_prep_main(
            ["latents", str(crop_shards / "coco"), "--model", str(tiny_sd_path), "--out", str(crop_shards / "coco")]
        )
        == 2
    )
    assert "holds the input shards" in capsys.readouterr().err

    # a shard that breaks after planning: each of its samples is skipped with the reason, the job goes on
    from data_prep.latents import LatentItem, LatentSampleMaker, LatentSettings
    from data_prep.writer import Skip

    maker = LatentSampleMaker(LatentSettings(model=str(tiny_sd_path), resolution=64))
    for key in ("a", "b"):
        result = maker(LatentItem(str(tmp_path / "gone-000000.tar"), key))
        assert isinstance(result, Skip) and result.reason == "unreadable_shard"


def test_loader_yields_the_moments_and_refuses_what_cannot_work(crop_shards, latent_shards):
    cfg = CropDataConfig(resolution=64, cached_latents=True)
    batch = next(iter(build_crop_dataloader(latent_shards, cfg, batch_size=3, vae_scale_factor=2, seed=0)))
    assert batch["latent_moments"].shape == (3, 8, 32, 32) and batch["latent_moments"].dtype == torch.float16
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="has no latent.npy"):
        build_crop_dataloader(crop_shards / "coco", cfg, batch_size=3, vae_scale_factor=2)
    with pytest.raises(ValueError, match=r"expected \[2C, 16, 16\]"):
        build_crop_dataloader(latent_shards, cfg, batch_size=3, vae_scale_factor=4)
    with pytest.raises(ValueError, match="needs data.scale_augment=none"):
        CropDataConfig(cached_latents=True, scale_augment="shrink", scale_prob=0.5)


def test_training_step_from_cached_latents_matches_the_vae_path(
    latent_shards, tiny_sd_path, tiny_image_encoder_path, tmp_path
):
    from accelerate import Accelerator

    from encoders.common.config import load_config
    from training.global_mapping import GlobalMappingConfig, GlobalMappingTask

    def task(cached: bool):
        keys = [
            f"pretrained_model_name_or_path={tiny_sd_path}",
            f"image_encoder_name_or_path={tiny_image_encoder_path}",
            f"train_shards={latent_shards}",
            f"output_dir={tmp_path / str(cached)}",
            "train_batch_size=2",
            "mapping_hidden_dim=64",
            "report_to=none",
            "data.resolution=64",
            f"data.cached_latents={str(cached).lower()}",
            "data.crop_geometry=stored",  # cached latents are of the stored crop (not the official box crop)
        ]
        t = GlobalMappingTask(load_config(GlobalMappingConfig, None, keys))
        t.setup(Accelerator(cpu=True), torch.float32)
        return t

    on_the_fly, cached = task(False), task(True)
    batch = next(iter(cached.train_dataloader()))
    assert "latent_moments" in batch
    vae_latents = on_the_fly.sd.encode_images(batch["pixel_values"], generator=torch.Generator().manual_seed(3))
    drawn = cached.sd.sample_latents(batch["latent_moments"], generator=torch.Generator().manual_seed(3))
    assert torch.allclose(drawn, vae_latents, atol=5e-3)  # the same draw, up to the float16 storage

    cached.global_mapping.load_state_dict(on_the_fly.global_mapping.state_dict())
    plain = {k: v for k, v in batch.items() if k != "latent_moments"}
    loss_vae, _ = on_the_fly.training_step(on_the_fly.trainable_models(), plain, torch.Generator().manual_seed(5))
    loss_cached, _ = cached.training_step(cached.trainable_models(), batch, torch.Generator().manual_seed(5))
    loss_vae, loss_cached = float(loss_vae.detach()), float(loss_cached.detach())
    assert np.isfinite(loss_cached) and abs(loss_cached - loss_vae) < 1e-3 * max(1.0, abs(loss_vae))
