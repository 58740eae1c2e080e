"""Textual Inversion, BaTex and semantic inversion: learn one word embedding S* from a few photos.

    accelerate launch -m training.textual_inversion --config configs/finetune/textual_inversion.yaml \\
        concept_dir=photos/ placeholder_token='S*' initializer_token=dog output_dir=out/dog_ti

Everything else is frozen. The learned word v replaces S*'s token embedding before the text encoder
(`encoders.text_injection`, no resized embedding table, no patched class), and the loss is the
masked epsilon-MSE of `training.concept_data`. Variants, by config keys:

- plain Textual Inversion (Gal et al., "An Image is Worth One Word"): v is a free vector initialised with the
  initializer word's embedding (paper: base lr 0.005 scaled by the batch size, 5000 steps);
- `subspace.enabled=true`: BaTex (`encoders.subspace`), v = w @ V_M over vocabulary words: the 720
  nearest by dot product, w one-hot on the top-1 neighbour (the official script), or the paper's rank
  rule (`subspace.selection=rank`, d1 = `subspace.dim` = 576, w one-hot on the initializer);
- `anchors.enabled=true`: semantic inversion (`encoders.anchors`): (1 - lambda) L_rec + lambda L_anc
  with sparse-coded anchor words (paper: lambda = 0.95); combinable with either of the above.

`num_vectors=N` (Compositional Inversion's script: 3) makes the placeholder stand for N vectors, put in at its
position in training as diffusers' prompt expansion ("S*" -> "S* S*_1 S*_2") puts them at inference.

Output in `output_dir`: `learned_embeds.safetensors` ({placeholder: [N, D]}, N = 1 by default) that diffusers
loads with `pipe.load_textual_inversion(output_dir, token="S*")`, `concept.json` (what was learned, for
`inference.evaluate`), `subspace/` for BaTex, checkpoints and logs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from encoders.common.config import ConfigError, keyed_field, parse_config_cli
from encoders.common.files import atomic_write
from encoders.common.finetune_folder import EMBEDDINGS_FILE, SUBSPACE_FOLDER
from encoders.subspace import SELECTIONS, TextualSubspace
from encoders.text_injection import add_placeholder_tokens, encode_prompt_with_words

from .common_config import AnchorsConfig
from .concept_data import ConceptFinetuneTask, FinetuneConfig
from .export import export_model
from .loop import run_from_command_line


@dataclass
class SubspaceConfig:
    """BaTex: search the embedding in the span of nearby vocabulary words."""

    enabled: bool = keyed_field("learn weights over a textual subspace instead of a free vector (BaTex)", False)
    selection: Literal["topk", "rank"] = keyed_field(
        "topk: the num_basis nearest words, weights one-hot on the top-1 neighbour (the official script); rank: the "
        "initializer first, then the top-M words for the smallest M with rank >= dim (the paper's Algorithm 1)",
        "topk",
    )
    num_basis: int = keyed_field("topk: how many nearest words span the subspace (official script: 720)", 720)
    distance: Literal["dot", "cosine", "l2"] = keyed_field(
        "vector distance that orders the vocabulary around the initializer", "dot"
    )
    dim: int = keyed_field(
        "rank rule: subspace dimension d1, basis = top-M words for the smallest M with rank >= d1 (paper: 576 of 768)",
        576,
    )
    dim_2: int = keyed_field(
        "SDXL: d1 of the second text encoder's subspace; 0 = the same fraction of its width as dim is of the first's "
        "(576 of 768 -> 960 of 1280)",
        0,
    )


@dataclass
class InversionAnchorsConfig(AnchorsConfig):
    """Semantic inversion for Textual Inversion / BaTex: (1 - lambda) L_rec + lambda L_anc."""

    weight: float = keyed_field("lambda in (1 - lambda) L_rec + lambda L_anc (paper and code: 0.95)", 0.95)
    mode: Literal["initializer", "sparse"] = keyed_field(
        "initializer: one anchor, the initializer word, weight 1 (the official code's `--anchor_loss l2`: the MSE of "
        "the prompt's input embeddings against the prompt with the initializer in S*'s place); sparse: a sparse code "
        "over `vocabulary` (the paper's Eq. 6)",
        "initializer",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("initializer", "sparse"):
            raise ConfigError(f"anchors.mode must be initializer or sparse, got {self.mode!r}")


@dataclass
class TextualInversionConfig(FinetuneConfig):
    """Textual Inversion keys (defaults: the paper's recipe; BaTex and anchors off)."""

    output_dir: str = keyed_field(
        "run folder: learned_embeds.safetensors, concept.json, checkpoints, logs", "outputs/textual_inversion"
    )
    max_steps: int = keyed_field("optimizer steps (paper: 5000 for Textual Inversion, 500 for BaTex)", 5000)
    train_batch_size: int = keyed_field("photos per device per step", 4)
    learning_rate: float = keyed_field("base learning rate (paper: 0.005, scaled by the batch size)", 5e-3)
    scale_lr: bool = keyed_field("multiply learning_rate by batch x accumulation x processes (the paper does)", True)
    max_grad_norm: float = keyed_field(
        "gradient clipping norm; 0, none, as diffusers' textual_inversion.py and the official scripts", 0.0
    )
    adam_weight_decay: float = keyed_field(
        "AdamW weight decay on the embedding (BaTex: on the weights); 1e-2 as diffusers' textual_inversion.py and "
        "BaTex's official regression.sh",
        1e-2,
    )
    checkpointing_steps: int = keyed_field("save checkpoint-N/ every N steps (0: only at the end)", 500)
    append_class_word: bool = keyed_field(
        "caption with 'S* <class_word>' instead of 'S*' (compositional-inversion style)", False
    )
    num_vectors: int = keyed_field(
        "vectors the placeholder stands for (Compositional Inversion's script: 3), each started at the initializer; "
        "exported as one [N, D] embedding, which diffusers' load_textual_inversion reads as S*, S*_1, ... and "
        "expands in prompts",
        1,
    )
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig)
    anchors: InversionAnchorsConfig = field(default_factory=InversionAnchorsConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.initializer_token:
            raise ConfigError("initializer_token is required: a coarse one-token word for the concept (e.g. dog)")
        if not self.placeholder_token or " " in self.placeholder_token:
            raise ConfigError(f"placeholder_token must be one word without spaces, got {self.placeholder_token!r}")
        if self.append_class_word and not self.class_word:
            raise ConfigError("append_class_word=true needs class_word")
        if not 0.0 <= self.anchors.weight < 1.0:
            raise ConfigError(f"anchors.weight must be in [0, 1), got {self.anchors.weight}")
        if self.subspace.dim < 1:
            raise ConfigError(f"subspace.dim must be positive, got {self.subspace.dim}")
        if self.subspace.num_basis < 1:
            raise ConfigError(f"subspace.num_basis must be positive, got {self.subspace.num_basis}")
        if self.subspace.selection not in SELECTIONS:
            raise ConfigError(
                f"subspace.selection must be one of {', '.join(SELECTIONS)}, got {self.subspace.selection!r}"
            )
        if self.num_vectors < 1:
            raise ConfigError(f"num_vectors must be at least 1, got {self.num_vectors}")
        if self.num_vectors > 1 and self.subspace.enabled:
            raise ConfigError(
                "num_vectors > 1 is for plain Textual Inversion; BaTex learns one word (subspace.enabled)"
            )
        if self.subspace.dim_2 < 0:
            raise ConfigError(
                f"subspace.dim_2 must be 0 (the same fraction as dim) or positive, got {self.subspace.dim_2}"
            )


class LearnedEmbedding(ModelMixin, ConfigMixin):
    """Textual Inversion's free word embedding v (`forward()` -> `[embedding_dim]`, or `[num_vectors,
    embedding_dim]` for a placeholder that stands for several vectors)."""

    @register_to_config
    def __init__(self, embedding_dim: int, initializer_token: str | None = None, num_vectors: int = 1):
        super().__init__()
        shape = (embedding_dim,) if num_vectors == 1 else (num_vectors, embedding_dim)
        self.embedding = nn.Parameter(torch.zeros(shape))

    def forward(self) -> torch.Tensor:
        return self.embedding


def as_rows(vector: torch.Tensor) -> torch.Tensor:
    """A learned word as `[N, D]` rows (one vector -> one row)."""
    return vector[None] if vector.ndim == 1 else vector


class TextualInversionTask(ConceptFinetuneTask):
    name = "textual_inversion"
    config: TextualInversionConfig
    supports_sdxl = True  # one vector (or subspace) per text encoder; anchors over both tables together

    @property
    def card_tags(self) -> tuple[str, ...]:
        tags = ["textual_inversion"]
        if self.config.subspace.enabled:
            tags.append("batex")
        if self.config.anchors.enabled:
            tags.append("compositional-inversion")
        return tuple(tags)

    def build_trainable(self) -> None:
        """The learned word per text encoder (SDXL: one for each, the placeholder added to both tokenizers),
        each started at the initializer's row of its own embedding table: a free vector, or with BaTex
        weights over that encoder's own vocabulary subspace."""
        config, sd = self.config, self.sd
        for name, tokenizer in zip(("tokenizer", "tokenizer_2"), sd.tokenizers):
            if config.placeholder_token in tokenizer.get_vocab():
                raise ConfigError(
                    f"placeholder_token {config.placeholder_token!r} is already a word of the {name}; "
                    "pick a new one (e.g. S*)"
                )
            if len(tokenizer(config.initializer_token, add_special_tokens=False).input_ids) != 1:
                raise ConfigError(
                    f"initializer_token {config.initializer_token!r} is several tokens for the {name}; "
                    "use a word that is one token"
                )
        first_width = sd.text_encoder.get_input_embeddings().embedding_dim
        words = []
        for tokenizer, text_encoder in zip(sd.tokenizers, sd.text_encoders):
            width = text_encoder.get_input_embeddings().embedding_dim
            dim = (
                config.subspace.dim
                if not words
                else config.subspace.dim_2 or round(config.subspace.dim * width / first_width)
            )
            words.append(self._make_word(tokenizer, text_encoder, dim))
        self.word, self.word_2 = words[0], (words[1] if sd.is_sdxl else None)
        self.initializer_id = sd.tokenizer(config.initializer_token, add_special_tokens=False).input_ids[0]
        self.placeholder_id = add_placeholder_tokens(sd.tokenizer, [config.placeholder_token])[0]
        if sd.is_sdxl:
            self.placeholder_id_2 = add_placeholder_tokens(sd.tokenizer_2, [config.placeholder_token])[0]
        # SDXL: the anchors are the words' rows of both tables side by side, one sparse code for both
        anchors = config.anchors
        initializer = config.initializer_token if anchors.mode == "initializer" else None
        self.anchors = anchors.build_regularizer(sd.tokenizers, sd.text_encoders, self.device, initializer)

    def _make_word(self, tokenizer, text_encoder, subspace_dim: int) -> nn.Module:
        config = self.config
        vocab = text_encoder.get_input_embeddings().weight.detach().float()
        init_id = tokenizer(config.initializer_token, add_special_tokens=False).input_ids[0]
        if not config.subspace.enabled:
            word = LearnedEmbedding(vocab.shape[1], config.initializer_token, config.num_vectors).to(self.device)
            with torch.no_grad():
                word.embedding.copy_(vocab[init_id].expand_as(word.embedding))  # every vector at the initializer
            return word
        special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
        word = TextualSubspace.from_vocabulary(
            vocab,
            init_id,
            subspace_dim=subspace_dim,
            distance=config.subspace.distance,
            exclude_ids=[i for i in special if i is not None],
            initializer_token=config.initializer_token,
            selection=config.subspace.selection,
            num_basis=min(config.subspace.num_basis, len(vocab) - len(set(special) - {None})),
        ).to(self.device)
        rule = f"top {config.subspace.num_basis}" if config.subspace.selection == "topk" else f"d1={subspace_dim}"
        self.accelerator.print(
            f"[{self.name}] BaTex subspace: {word.config.num_basis} words, rank {word.rank} of {vocab.shape[1]} "
            f"({rule}, {config.subspace.distance})"
        )
        return word

    def trainable_models(self):
        if self.word_2 is not None:
            return {"learned_word": self.word, "learned_word_2": self.word_2}
        return {"learned_word": self.word}

    def concept_phrase(self) -> str:
        c = self.config
        return f"{c.placeholder_token} {c.class_word}" if c.append_class_word else c.placeholder_token

    def encode_prompts(self, models, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        """`(encoder_hidden_states, added_cond_kwargs)` with the learned word(s) at the placeholder: SD the
        text encoder's states (None); SDXL both encoders' penultimate states, each with its own vector,
        side by side, and the pooled embedding + size numbers (`StableDiffusionXLPipeline`'s encoding)."""
        sd = self.sd
        vectors = [models["learned_word"]()] + ([models["learned_word_2"]()] if sd.is_sdxl else [])
        # N vectors go in at the placeholder's position, the rest of the prompt after them: what diffusers'
        # expansion of "S*" into "S* S*_1 ... S*_{N-1}" gives at inference
        rows = torch.cat([as_rows(v).to(sd.text_encoder.dtype) for v in vectors], dim=-1)
        words = rows[None].expand(len(prompts), -1, -1)
        ids = [[self.placeholder_id]] + ([[self.placeholder_id_2]] if sd.is_sdxl else [])
        text = encode_prompt_with_words(sd.text_encoders, sd.token_ids(prompts, self.device), ids, [words])
        return text.prompt_embeds, sd.added_conditioning(text.pooled_prompt_embeds, self.config.data.resolution)

    def predict_noise(self, models, noisy, timesteps, prompts):
        text, added = self.encode_prompts(models, prompts)
        return self.sd.unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample

    def regularize(self, models, rec_loss):
        if self.anchors is None:
            return rec_loss, {}
        lam = self.config.anchors.weight
        vectors = [models["learned_word"]()] + ([models["learned_word_2"]()] if "learned_word_2" in models else [])
        anc = self.anchors(torch.cat([as_rows(v) for v in vectors], dim=-1).float())  # each vector, averaged
        return (1 - lam) * rec_loss + lam * anc, {"anchor_loss": anc.detach()}

    @torch.no_grad()
    def sample(self, models, prompts, generator):
        pipe = self.pipeline()
        cond, added = self.encode_prompts(models, prompts)
        uncond, uncond_added = self.sd.encode_text([""] * len(prompts), self.config.data.resolution)
        pooled = (
            {}
            if added is None
            else {
                "pooled_prompt_embeds": added["text_embeds"],
                "negative_pooled_prompt_embeds": uncond_added["text_embeds"],
            }
        )
        return pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            **pooled,
            num_inference_steps=self.config.validation_inference_steps,
            guidance_scale=self.config.validation_guidance_scale,
            height=self.config.data.resolution,
            width=self.config.data.resolution,
            generator=generator,
        ).images

    def export(self, models, export_dir: Path) -> list[str]:
        from safetensors.torch import save_file

        export_dir = Path(export_dir)
        word = models["learned_word"]
        vector = as_rows(word().detach().float().cpu())
        if "learned_word_2" in models:  # SDXL: the layout its pipelines' load_textual_inversion reads per encoder
            tensors = {
                "clip_l": vector.contiguous(),
                "clip_g": as_rows(models["learned_word_2"]().detach().float().cpu()).contiguous(),
            }
        else:
            tensors = {self.config.placeholder_token: vector.contiguous()}
        atomic_write(export_dir / EMBEDDINGS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        written = [EMBEDDINGS_FILE]
        files = {"embeddings": EMBEDDINGS_FILE}
        if isinstance(word, TextualSubspace):
            written.append(export_model(word, export_dir, SUBSPACE_FOLDER))
            files["subspace"] = SUBSPACE_FOLDER
            if "learned_word_2" in models:  # SDXL: the second text encoder's subspace beside it
                written.append(export_model(models["learned_word_2"], export_dir, f"{SUBSPACE_FOLDER}_2"))
                files["subspace_2"] = f"{SUBSPACE_FOLDER}_2"
        method = "batex" if self.config.subspace.enabled else "textual_inversion"
        written.append(
            self.write_concept_file(export_dir, method, files, semantic_inversion=bool(self.config.anchors.enabled))
        )
        return written

    def model_card_notes(self) -> str:
        c = self.config
        kind = "BaTex (textual subspace)" if c.subspace.enabled else "Textual Inversion"
        extra = ""
        if c.subspace.enabled:
            extra += (
                f"The embedding is a weighted sum of {self.word.config.num_basis} vocabulary words nearest to "
                f"`{c.initializer_token}` ({c.subspace.distance}; "
                f"{'top-k' if c.subspace.selection == 'topk' else f'rank rule d1={c.subspace.dim}'}), kept in "
                "`subspace/`.\n"
            )
        if c.anchors.enabled:
            source = (
                f"the initializer `{c.initializer_token}`"
                if c.anchors.mode == "initializer"
                else f"{c.anchors.vocabulary}, at most {c.anchors.max_active} active"
            )
            extra += f"Semantic anchors ({source}, lambda {c.anchors.weight}).\n"
        if getattr(getattr(self, "sd", None), "is_sdxl", False):
            t = c.placeholder_token
            return (
                f"# {kind} embedding `{t}` for SDXL\n\n"
                f"One vector per text encoder for the concept in `{c.concept_dir}` (initializer "
                f"`{c.initializer_token}`): "
                f"`clip_l` for `text_encoder`, `clip_g` for `text_encoder_2` in {EMBEDDINGS_FILE}.\n\n"
                "```python\n"
                "from diffusers import StableDiffusionXLPipeline\n"
                "from safetensors.torch import load_file\n\n"
                f'pipe = StableDiffusionXLPipeline.from_pretrained("{c.pretrained_model_name_or_path}")\n'
                f'state = load_file("{EMBEDDINGS_FILE}")\n'
                f'pipe.load_textual_inversion(state["clip_l"], token="{t}", text_encoder=pipe.text_encoder, '
                "tokenizer=pipe.tokenizer)\n"
                f'pipe.load_textual_inversion(state["clip_g"], token="{t}", text_encoder=pipe.text_encoder_2, '
                "tokenizer=pipe.tokenizer_2)\n"
                f'image = pipe("a photo of {t} on the beach").images[0]\n'
                "```\n"
            )
        return (
            f"# {kind} embedding `{c.placeholder_token}`\n\n"
            f"One word embedding for the concept in `{c.concept_dir}` (initializer `{c.initializer_token}`).\n{extra}\n"
            "```python\n"
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{c.pretrained_model_name_or_path}")\n'
            f'pipe.load_textual_inversion("PATH_OR_REPO", token="{c.placeholder_token}")  # {EMBEDDINGS_FILE}\n'
            f'image = pipe("a photo of {c.placeholder_token} on the beach").images[0]\n'
            "```\n"
        )


def main(argv: list[str] | None = None) -> Path:
    config = parse_config_cli(
        TextualInversionConfig,
        argv,
        prog="accelerate launch -m training.textual_inversion",
        description="Learn a word embedding for a concept from 3-5 photos (Textual Inversion, BaTex, semantic "
        "anchors).",
    )
    return run_from_command_line(TextualInversionTask(config))


if __name__ == "__main__":
    main(sys.argv[1:])
