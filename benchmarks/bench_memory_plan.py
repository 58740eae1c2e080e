"""Memory plan from the published model configs: frozen and trainable sizes of each ELITE stage per base.

Builds SD v1-4, SD 2.1-base and SDXL base 1.0 (and CLIP ViT-L/14 vision) from their configs on
PyTorch's meta device (no weights, no download, seconds on a CPU), then the real trainable modules
of both ELITE stages (`GlobalMapping.from_unet`, `LocalMapping.from_unet`) on each UNet, and counts:

- frozen bytes in bf16 (UNet, VAE, text encoder(s), image encoder), what every GPU holds;
- trainable parameters and their training state: fp32 weights + fp32 gradients + AdamW's two fp32
  moments (16 bytes per parameter), and that state per GPU under ZeRO-2 on N GPUs (bf16 weights
  whole, the rest sharded).

Activations are not counted here (they need a GPU run: `bench_gpu_real_size.py`).

    python benchmarks/bench_memory_plan.py [--out benchmarks/results/bench_memory_plan.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

# The published configs (the Hub's unet/config.json, text_encoder*/config.json) of each base.
CLIP_L_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
OPENCLIP_H_TEXT = dict(
    CLIP_L_TEXT,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
OPENCLIP_G_TEXT = dict(
    CLIP_L_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
)
VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
    projection_dim=768,
)
BASES = {
    "sd14": dict(
        id="CompVis/stable-diffusion-v1-4",
        resolution=512,
        text=[CLIP_L_TEXT],
        unet=dict(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        ),
    ),
    "sd21": dict(
        id="stabilityai/stable-diffusion-2-1-base",
        resolution=512,
        text=[OPENCLIP_H_TEXT],
        unet=dict(
            sample_size=64,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            use_linear_projection=True,
        ),
    ),
    "sdxl": dict(
        id="stabilityai/stable-diffusion-xl-base-1.0",
        resolution=1024,
        text=[CLIP_L_TEXT, OPENCLIP_G_TEXT],
        unet=dict(
            sample_size=128,
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    ),
}
GB = 1e9  # decimal, as GPU cards are sold


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan(base: str, gpus: int = 4) -> dict:
    """Parameter counts and byte sizes of one base's frozen models and both ELITE stages' trainables."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    from encoders.global_mapping import GlobalMapping
    from encoders.local_mapping import LocalMapping

    spec = BASES[base]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        texts = [
            (CLIPTextModelWithProjection if k else CLIPTextModel)(CLIPTextConfig(**cfg))
            for k, cfg in enumerate(spec["text"])
        ]
        frozen = {
            "unet": count(unet),
            "vae": count(AutoencoderKL(**SD_VAE)),
            "text_encoders": sum(map(count, texts)),
            "image_encoder": count(CLIPVisionModel(CLIPVisionConfig(**VIT_L14))),
        }
        word_width = sum(cfg["hidden_size"] for cfg in spec["text"])  # SDXL: one slice of each word per table
        stages = {
            "global_mapping": count(
                GlobalMapping.from_unet(unet, input_dim=VIT_L14["hidden_size"], output_dim=word_width)
            ),
            "local_mapping": count(
                LocalMapping.from_unet(unet, input_dim=VIT_L14["hidden_size"], output_dim=word_width)
            ),
        }
    frozen_gb = 2 * sum(frozen.values()) / GB
    rows = []
    for stage, trainable in stages.items():
        state_gb = 16 * trainable / GB  # fp32 weights, gradients, two AdamW moments
        zero2_gb = (2 * trainable + 14 * trainable / gpus) / GB  # bf16 weights whole, the rest sharded
        rows.append(
            dict(
                stage=stage,
                trainable_params=trainable,
                training_state_gb=round(state_gb, 2),
                zero2_state_gb_per_gpu=round(zero2_gb, 2),
                frozen_plus_state_gb=round(frozen_gb + state_gb, 2),
            )
        )
    return dict(
        base=base,
        model_id=spec["id"],
        resolution=spec["resolution"],
        word_width=word_width,
        frozen_params=frozen,
        frozen_bf16_gb=round(frozen_gb, 2),
        zero2_gpus=gpus,
        stages=rows,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", default=",".join(BASES), help=f"comma-separated, of {', '.join(BASES)}")
    parser.add_argument("--gpus", type=int, default=4, help="N for the ZeRO-2 column")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_memory_plan.json"))
    args = parser.parse_args(argv)
    plans = [plan(b, args.gpus) for b in args.bases.split(",")]
    print(
        f"{'base':<6}{'stage':<16}{'frozen GB':>10}{'trainable M':>13}{'state GB':>10}"
        f"{'ZeRO-2/GPU':>12}{'frozen+state':>14}"
    )
    for p in plans:
        for r in p["stages"]:
            print(
                f"{p['base']:<6}{r['stage']:<16}{p['frozen_bf16_gb']:>10.2f}{r['trainable_params'] / 1e6:>13.1f}"
                f"{r['training_state_gb']:>10.2f}{r['zero2_state_gb_per_gpu']:>12.2f}{r['frozen_plus_state_gb']:>14.2f}"
            )
    write_results(
        {"note": "parameters from the published configs on the meta device; activations not included", "plans": plans},
        args.out,
    )


if __name__ == "__main__":
    main()
