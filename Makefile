# Two commands do all set-up on a fresh machine:
#   make demo   - build the tiny offline models and run the whole pipeline end to end into outputs/demo/
#   make test   - run the test suite
# Both create .venv on first use. torch==2.13.0 (CPU wheel) is installed only when the venv has no
# torch: with `make VENV_FLAGS=--system-site-packages`, a machine's own (GPU) torch is kept.
#
# The demo is a chain of the real commands a user runs (see README); each stage writes one file
# that marks it done, so a second `make demo` only reports, and `make demo` after an interruption
# resumes where it stopped. `make clean-demo` starts over.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
STAMP := $(VENV)/.installed
# The demo runs on the trained miniature world by default (BASE=world: encoders/assets/world, written out as real
# model folders). BASE=sd1 runs every stage on the random tiny SD v1-style bundle and the bundled COCO / DreamBooth
# photos (outputs/demo-sd1/); BASE=sd2 on an SD 2.x-style one (48-wide text encoder, v-prediction), BASE=sdxl on a
# tiny StableDiffusionXLPipeline (two text encoders, pooled + size conditioning).
BASE ?= world
DEMO := outputs/demo$(if $(filter world,$(BASE)),,-$(BASE))
M := $(DEMO)/models
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

ifeq ($(BASE),world)
# a held-out object of the world (red x striped x star is never in its training data), one photo + mask
CONCEPT_DIR := tests/data/world/red_striped_star
CONCEPT := $(CONCEPT_DIR)/00.png
CONCEPT_MASK := $(CONCEPT_DIR)/masks/00.png
CLASS := star
BASE_PROMPT := a photo of a red star on a green background
GEN_PROMPTS := --prompt "a photo of S* on a green background" --prompt "a photo of S* on a white background"
GUIDE_PROMPT := a red square and a blue heart on a gray background
GUIDE_WORDS := square heart
# layout guidance's own step size (30): 1e3 wrecks the trained world's images (30 keeps them, L_loc 0.83 -> 0.72)
GUIDE_ARGS := --steps 25 --guidance-steps 10 --iterations 3 --step-size 30
FT_PROMPTS := --prompt "a photo of S* on a blue background" --prompt "a photo of a red star on a blue background"
WORLD_KEYS := data.clip_size=64
# CoI on the world: its attribute classifier says which shapes a picture holds (DETR knows no world shapes)
COI_KEYS := detector_model=$(M)/classifier detection_threshold=0.5 coi_objects=circle,square,triangle,heart,cross,diamond,hexagon
ELITE_STEPS := 400
SHARDS_NOTE := crops of the world's training scenes (2,000 images rendered by data_prep world)
else
CONCEPT_DIR := tests/data/concepts/dreambooth/teapot
CONCEPT := $(CONCEPT_DIR)/04.jpg
CONCEPT_MASK := tests/data/concepts/masks/teapot_04.png
CLASS := teapot
BASE_PROMPT := a photo of a dog
GEN_PROMPTS := --prompt "a photo of S* on the beach" --prompt "a S* in the snow"
GUIDE_PROMPT := a photo of a person and a bus
GUIDE_WORDS := person bus
GUIDE_ARGS := --steps 10 --guidance-steps 5 --iterations 3 --step-size 1e5
FT_PROMPTS := --prompt "a photo of S* on the beach" --prompt "a teapot in the snow"
WORLD_KEYS :=
COI_KEYS := detector_model=$(M)/detector
ELITE_STEPS := 40
endif
# Tiny-model settings shared by the training stages (64 px, single CPU process, no tracker).
TINY_KEYS := pretrained_model_name_or_path=$(M)/sd image_encoder_name_or_path=$(M)/image_encoder \
	report_to=none mixed_precision=no resume_from_checkpoint=latest dataloader_num_workers=0 gradient_accumulation_steps=1
ONE_PROCESS := $(ACCELERATE) launch --config_file configs/accelerate/single_process.yaml --cpu

.PHONY: help install test lint browser demo bench clean-demo clean world \
	demo-models demo-base demo-shards demo-elite demo-generate demo-compose demo-finetune demo-eval

help:
	@echo "make demo   - run the pipeline end to end on the trained miniature world (outputs/demo/)"
	@echo "make demo BASE=sd1 - the same on a random tiny SD v1-style bundle and real photos (outputs/demo-sd1/)"
	@echo "make demo BASE=sd2 - the same on an SD 2.x-style tiny base (outputs/demo-sd2/)"
	@echo "make demo BASE=sdxl - the same on an SDXL-style tiny base (outputs/demo-sdxl/)"
	@echo "make test   - run the tests"
	@echo "make bench  - run the CPU benchmarks (print tables, write benchmarks/results/*.json)"
	@echo "make world  - retrain the miniature world's base models from scratch (outputs/world/)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[all,test]"
	@touch $@

install: $(STAMP)

test: $(STAMP) browser lint
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# style: ruff (the version pinned in the test extra) with pyproject's rules, and its formatter
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The web demo's test drives a real browser: Debian's chromium + chromium-driver, installed here when
# missing and apt-get can (as root); otherwise that test is skipped with the reason.
browser:
	@if [ -x /usr/bin/chromedriver ] || command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium + chromium-driver (the web demo's browser test)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "could not install chromium: the browser test will be skipped"; \
	else echo "no chromedriver, and apt-get needs root: the browser test will be skipped"; fi

# ------------------------------------------------------------------------------------------ demo
demo: demo-models demo-base demo-shards demo-elite demo-generate demo-compose demo-finetune demo-eval
	@$(PY) -m inference.evaluation.demo_report --demo $(DEMO)

# 1. the models: the trained world (written out from encoders/assets/world) or a random tiny bundle, plus the
#    evaluation stand-ins (eval CLIP, DINO, DETR, CLIPSeg; random tiny ones)
demo-models: $(M)/.done
# a newly shipped world (its card changes with every set) is written out again
$(M)/.done: $(if $(filter world,$(BASE)),encoders/assets/world/README.md) | $(STAMP)
ifeq ($(BASE),world)
	$(PY) -m encoders.world --out $(M)
	$(PY) -m encoders.tiny --out $(M) --only eval_clip --only dino --only detector --only clipseg
else
	$(PY) -m encoders.tiny --out $(M) --kind $(BASE)
endif
	@touch $@

# 2. the base pipeline alone, from a plain prompt
demo-base: $(DEMO)/images/base/settings.json
$(DEMO)/images/base/settings.json: $(M)/.done
	$(PY) -m inference generate --base $(M)/sd --prompt "$(BASE_PROMPT)" --num-images 4 --steps 25 --quiet \
		--out $(DEMO)/images/base

# 3. object crops with masks and boxes, and a contact sheet: the world's training scenes rendered in the COCO
#    layout (world) or the bundled COCO and OpenImages samples (sd1, sd2, sdxl)
demo-shards: $(DEMO)/shards/contact_sheet.png
ifeq ($(BASE),world)
SHARDS := $(DEMO)/shards/world
$(DEMO)/shards/contact_sheet.png: | $(STAMP)
	$(PY) -m data_prep world --out $(DEMO)/world/train --images 2000 --seed 0 --no-progress
	$(PY) -m data_prep coco --annotations $(DEMO)/world/train/instances.json --images $(DEMO)/world/train/images \
		--out $(DEMO)/shards/world --config configs/data/world.yaml --workers 2
	$(PY) -m data_prep inspect $(DEMO)/shards/world --out $(DEMO)/shards/contact_sheet.png --json $(DEMO)/shards/stats.json
PAIRS_ANNOTATIONS := $(DEMO)/world/train/instances.json
else
SHARDS := $(DEMO)/shards/coco::$(DEMO)/shards/openimages
$(DEMO)/shards/contact_sheet.png: | $(STAMP)
	$(PY) -m data_prep coco --annotations tests/data/coco_sample/annotations.json \
		--images tests/data/coco_sample/images --out $(DEMO)/shards/coco --config configs/data/demo.yaml --workers 2
	$(PY) -m data_prep openimages \
		--boxes tests/data/openimages/from_coco_sample/annotations/validation-annotations-bbox.csv \
		--segmentations tests/data/openimages/from_coco_sample/annotations/validation-annotations-object-segmentation.csv \
		--masks tests/data/openimages/from_coco_sample/masks --images tests/data/openimages/from_coco_sample/images \
		--classes tests/data/openimages/class-descriptions-boxable.csv \
		--out $(DEMO)/shards/openimages --config configs/data/demo.yaml --workers 2
	$(PY) -m data_prep inspect $(DEMO)/shards/coco $(DEMO)/shards/openimages \
		--out $(DEMO)/shards/contact_sheet.png --json $(DEMO)/shards/stats.json
PAIRS_ANNOTATIONS := tests/data/coco_sample/annotations.json
endif

# 4. ELITE: global mapping, then local mapping, trained and exported to encoders/
# the shards' crops as stored, every box: the official stage filters (boxes >= 100 px, 2-80 % of the image) and
# box crops are for real photos (docs/data.md); the demo's 64 px scenes are far under them
STORED_CROPS := data.crop_geometry=stored data.min_box_area=0 data.max_box_area=1 data.min_box_side=0 \
	data.max_box_aspect=0
ELITE_KEYS := $(TINY_KEYS) $(WORLD_KEYS) train_shards=$(SHARDS) export_dir=$(DEMO)/encoders data.resolution=64 train_batch_size=8 \
	checkpointing_steps=100 checkpoints_total_limit=1 validation_steps=$(ELITE_STEPS) logging_steps=10 \
	validation_inference_steps=10 mapping_hidden_dim=256 $(STORED_CROPS)
demo-elite: $(DEMO)/encoders/local_mapping/config.json
$(DEMO)/encoders/global_mapping/config.json: $(M)/.done $(DEMO)/shards/contact_sheet.png
	$(ONE_PROCESS) -m training.global_mapping --config configs/train/global_mapping.yaml $(ELITE_KEYS) \
		output_dir=$(DEMO)/runs/global_mapping max_steps=$(ELITE_STEPS) learning_rate=1e-3 scale_lr=false
$(DEMO)/encoders/local_mapping/config.json: $(DEMO)/encoders/global_mapping/config.json
	$(ONE_PROCESS) -m training.local_mapping --config configs/train/local_mapping.yaml $(ELITE_KEYS) \
		output_dir=$(DEMO)/runs/local_mapping max_steps=$(ELITE_STEPS) learning_rate=1e-3 scale_lr=false \
		global_mapping_path=$(DEMO)/encoders

# 5. zero-step customization: encode one photo + mask once, generate for two prompts
demo-generate: $(DEMO)/images/concept/settings.json
$(DEMO)/images/concept.safetensors: $(DEMO)/encoders/local_mapping/config.json
	$(PY) -m inference encode --encoders $(DEMO)/encoders --base $(M)/sd --image $(CONCEPT) --mask $(CONCEPT_MASK) \
		--out $@
$(DEMO)/images/concept/settings.json: $(DEMO)/images/concept.safetensors
	$(PY) -m inference generate --base $(M)/sd --encoders $(DEMO)/encoders --concept $< \
		$(GEN_PROMPTS) --num-images 4 --steps 25 --seed 0 --quiet --out $(DEMO)/images/concept

# 6. compositional inversion: two-object pairs -> location MLP; a two-object image with guidance off | on
demo-compose: $(DEMO)/images/spatial_guidance.png
$(DEMO)/encoders/location_mlp/config.json: $(M)/.done $(DEMO)/encoders/local_mapping/config.json $(DEMO)/shards/contact_sheet.png
	$(PY) -m data_prep pairs coco --annotations $(PAIRS_ANNOTATIONS) \
		--out $(DEMO)/shards/pairs_coco --workers 1 --no-progress
	$(ONE_PROCESS) -m training.location_mlp --config configs/train/location_mlp.yaml $(TINY_KEYS) \
		train_shards=$(DEMO)/shards/pairs_coco output_dir=$(DEMO)/runs/location_mlp export_dir=$(DEMO)/encoders \
		max_steps=150 train_batch_size=8 lr_warmup_steps=0 dropout=0 validation_steps=150 checkpointing_steps=150
$(DEMO)/images/spatial_guidance.png: $(DEMO)/encoders/location_mlp/config.json
	$(PY) -m inference guide --base $(M)/sd --location-mlp $(DEMO)/encoders \
		--prompt "$(GUIDE_PROMPT)" --words $(GUIDE_WORDS) $(GUIDE_ARGS) --out $@

# 7. per-concept baselines on the concept's photos: Textual Inversion and Infusion, a few steps each
FT_KEYS := $(TINY_KEYS) concept_dir=$(CONCEPT_DIR) class_word=$(CLASS) data.resolution=64 max_steps=12 \
	train_batch_size=2 checkpointing_steps=6 validation_steps=12 validation_inference_steps=10 data.soft_masks=none \
	$(if $(filter world,$(BASE)),,data.mask_dir=tests/data/concepts/masks)
demo-finetune: $(DEMO)/images/finetuned/settings.json
$(DEMO)/finetune/concept_textual_inversion/learned_embeds.safetensors: $(M)/.done
	$(ONE_PROCESS) -m training.textual_inversion --config configs/finetune/textual_inversion.yaml $(FT_KEYS) \
		initializer_token=$(CLASS) output_dir=$(DEMO)/finetune/concept_textual_inversion
# ... the same with the anchor loss (semantic inversion), for the "+ semantic" rows of Compositional Inversion's table
$(DEMO)/finetune/concept_textual_inversion_anchors/learned_embeds.safetensors: $(M)/.done
	$(ONE_PROCESS) -m training.textual_inversion --config configs/finetune/textual_inversion.yaml $(FT_KEYS) \
		initializer_token=$(CLASS) anchors.enabled=true output_dir=$(DEMO)/finetune/concept_textual_inversion_anchors \
		$(if $(filter world,$(BASE)),anchors.vocabulary=configs/world/anchor_words.txt)
$(DEMO)/finetune/concept_infusion/infusion/config.json: $(M)/.done
	$(ONE_PROCESS) -m training.infusion --config configs/finetune/infusion.yaml $(FT_KEYS) \
		output_dir=$(DEMO)/finetune/concept_infusion
# ... and their results used through the inference command line (TI: its token S*; Infusion: the class word)
$(DEMO)/images/finetuned/settings.json: $(DEMO)/finetune/concept_textual_inversion/learned_embeds.safetensors \
	$(DEMO)/finetune/concept_infusion/infusion/config.json
	$(PY) -m inference generate --base $(M)/sd --finetune $(DEMO)/finetune/concept_textual_inversion \
		--finetune $(DEMO)/finetune/concept_infusion $(FT_PROMPTS) --steps 10 --num-images 2 --quiet \
		--out $(DEMO)/images/finetuned

# 8. each paper's evaluation (ELITE's, Compositional Inversion's Table 1, Infusion's), shrunk for a CPU:
#    base, ELITE (+ spatial), Textual Inversion (+ spatial), Infusion, each with its own sampler; one table per paper
# CLIP-T / CLIP-I with the world's own CLIP on the world (it knows its colours and patterns), a random tiny one else
EVAL_CLIP := $(if $(filter world,$(BASE)),$(M)/clip,$(M)/eval_clip)
demo-eval: $(DEMO)/eval/results.md
$(DEMO)/eval/results.md: $(DEMO)/encoders/local_mapping/config.json \
	$(DEMO)/finetune/concept_textual_inversion/learned_embeds.safetensors $(DEMO)/finetune/concept_infusion/infusion/config.json \
	$(DEMO)/finetune/concept_textual_inversion_anchors/learned_embeds.safetensors
	$(PY) -m inference.evaluate base=$(M)/sd \
		runs=$(DEMO)/finetune/concept_textual_inversion,$(DEMO)/finetune/concept_textual_inversion_anchors,$(DEMO)/finetune/concept_infusion \
		encoders=$(DEMO)/encoders $(if $(filter world,$(BASE)),,mask_dir=tests/data/concepts/masks) elite_image=$(if $(filter world,$(BASE)),0,4) out=$(DEMO)/eval \
		protocol=all num_prompts=2 seeds=0,1 num_inference_steps=8 batch_size=6 fisher_timesteps=250,750 \
		clip_model=$(EVAL_CLIP) dino_model=$(M)/dino $(COI_KEYS)

# ------------------------------------------------------------------------------------------ world
# The miniature world's base models, trained from scratch (training.world; see encoders/assets/world/README.md for
# the times): CLIP, the VAE (then its decoder alone), the attribute classifier, the UNet; then their quality bars.
WORLD := outputs/world
WORLD_RUN := $(PY) -m training.world
world: $(WORLD)/models/sd/model_index.json
	$(PY) benchmarks/bench_world.py --models $(WORLD)/models --out $(WORLD)/bench_world.json
	@echo "to ship these: $(PY) -m training.world_ship --models $(WORLD)/models --metrics $(WORLD)/bench_world.json"
$(WORLD)/models/clip/config.json: | $(STAMP)
	$(WORLD_RUN) --config configs/world/clip.yaml
$(WORLD)/models/vae/config.json: | $(STAMP)
	$(WORLD_RUN) --config configs/world/vae.yaml
$(WORLD)/models/training_config_world_vae_decoder.yaml: $(WORLD)/models/vae/config.json
	$(WORLD_RUN) --config configs/world/vae_decoder.yaml
$(WORLD)/models/classifier/config.json: | $(STAMP)
	$(WORLD_RUN) --config configs/world/classifier.yaml
$(WORLD)/models/sd/model_index.json: $(WORLD)/models/clip/config.json \
	$(WORLD)/models/training_config_world_vae_decoder.yaml $(WORLD)/models/classifier/config.json
	$(WORLD_RUN) --config configs/world/unet.yaml

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_guidance.py
	$(PY) benchmarks/bench_finetune.py
	$(PY) benchmarks/bench_memory_plan.py

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf $(VENV) *.egg-info
