# Every target creates the virtual environment it needs; nothing is installed by hand.
# On GPU machines set TORCH to your CUDA build (e.g. TORCH="torch==2.5.1") and EXTRAS=dev,gpu.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python

comma := ,

.PHONY: env test lint shards vqa-shards tokenizer pretrain finetune instruct instruct-templates bench-data bench-model zeroshot-data prompting clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

lint: env
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

# --- data (see docs/data.md for every variable) ---
SOURCE ?= synthetic
DATASET ?= $(SOURCE)
ROOT ?=
KARPATHY_JSON ?=
HF_DATASET ?=
IMAGE_COLUMN ?= image
CAPTION_COLUMN ?= caption
ID_COLUMN ?=
SPLITS ?= train,val
HOLDOUT_FRACTION ?= 0.05
SHARDS_DIR ?= data/shards/$(DATASET)
MAX_SIZE ?= 256
MAX_PIXELS ?= 89478485
MIN_SIDE ?= 64
SHARD_SAMPLES ?= 500
MIN_SHARDS ?= 8
SHARD_BYTES ?= 500000000
SHARD_WORKERS ?= $(shell nproc)
SHARD_SEED ?= 0
MAX_BAD_FRACTION ?=
SYNTH_DIR ?= data/synthetic_coco
SYNTH_TRAIN ?= 10000
SYNTH_VAL ?= 1000
SYNTH_SIZE ?= 96
TOKENIZER_DIR ?= data/tokenizer
DATASET_TOKENIZER ?= data/tokenizer-$(DATASET)
TOKENIZER_SHARDS ?= data/shards/synthetic/train
VOCAB_SIZE ?= 8000
SHARD_ARGS = --splits $(SPLITS) --out $(SHARDS_DIR) --max-size $(MAX_SIZE) --max-pixels $(MAX_PIXELS) \
	--min-side $(MIN_SIDE) --shard-samples $(SHARD_SAMPLES) --min-shards $(MIN_SHARDS) --shard-bytes $(SHARD_BYTES) \
	--workers $(SHARD_WORKERS) --seed $(SHARD_SEED) --holdout-fraction $(HOLDOUT_FRACTION) \
	$(if $(MAX_BAD_FRACTION),--max-bad-fraction $(MAX_BAD_FRACTION))

shards: env
ifeq ($(SOURCE),synthetic)
	@test -f $(SYNTH_DIR)/annotations/captions_val2017.json || $(PY) -m data_pipeline.synthetic --out $(SYNTH_DIR) \
		--train $(SYNTH_TRAIN) --val $(SYNTH_VAL) --image-size $(SYNTH_SIZE) --workers $(SHARD_WORKERS)
	$(PY) -m data_pipeline.make_shards --source coco --root $(SYNTH_DIR) --name synthetic $(SHARD_ARGS)
	$(MAKE) --no-print-directory tokenizer TOKENIZER_SHARDS=$(SHARDS_DIR)/train
	$(MAKE) --no-print-directory vqa-shards
else
	$(PY) -m data_pipeline.make_shards --source $(SOURCE) --name $(DATASET) $(SHARD_ARGS) \
		$(if $(ROOT),--root $(ROOT)) $(if $(KARPATHY_JSON),--karpathy-json $(KARPATHY_JSON)) \
		$(if $(HF_DATASET),--hf-dataset $(HF_DATASET) --image-column $(IMAGE_COLUMN) \
		--caption-column $(CAPTION_COLUMN)) $(if $(ID_COLUMN),--id-column $(ID_COLUMN))
	$(if $(filter train,$(subst $(comma), ,$(SPLITS))),$(MAKE) --no-print-directory tokenizer \
		TOKENIZER_SHARDS=$(SHARDS_DIR)/train TOKENIZER_DIR=$(DATASET_TOKENIZER))
endif

# the synthetic VQA set (VQA v2 layout, held-out scenes) and its shards; VQA_ROOT=<VQA v2 dir> shards the real one
VQA_ROOT ?=
SYNTH_VQA_DIR ?= data/synthetic_vqa
SYNTH_VQA_TRAIN ?= 2000
SYNTH_VQA_VAL ?= 400
# presence questions per image, answers alternating (2: complementary pairs)
SYNTH_VQA_PRESENCE ?= 1
VQA_SHARDS_DIR ?= data/shards/$(if $(VQA_ROOT),vqa,synthetic_vqa)

vqa-shards: env
ifeq ($(VQA_ROOT),)
	@test -f $(SYNTH_VQA_DIR)/v2_mscoco_val2014_annotations.json || $(PY) -m data_pipeline.synthetic_vqa \
		--out $(SYNTH_VQA_DIR) --train $(SYNTH_VQA_TRAIN) --val $(SYNTH_VQA_VAL) --image-size $(SYNTH_SIZE) \
		--presence $(SYNTH_VQA_PRESENCE)
endif
	$(PY) -m data_pipeline.make_shards --source vqa --root $(or $(VQA_ROOT),$(SYNTH_VQA_DIR)) \
		--name $(if $(VQA_ROOT),vqa,synthetic_vqa) --out $(VQA_SHARDS_DIR) --splits train,val --max-size $(MAX_SIZE) \
		--shard-samples $(SHARD_SAMPLES) --min-shards $(MIN_SHARDS) --workers $(SHARD_WORKERS) --seed $(SHARD_SEED)

tokenizer: env
	$(PY) -m data_pipeline.train_tokenizer --shards $(TOKENIZER_SHARDS) --out $(TOKENIZER_DIR) \
		--vocab-size $(VOCAB_SIZE)

bench-data: shards
	$(PY) -m benchmarks.bench_data --shards data/shards/synthetic/train --coco-root $(SYNTH_DIR) \
		--tokenizer $(TOKENIZER_DIR)

# --- model (see README "## Model") ---
BENCH_MODEL_ARGS ?=

bench-model: env
	$(PY) -m benchmarks.bench_model $(BENCH_MODEL_ARGS)

# --- training (see README "## Training") ---
RECIPE ?= tiny_synthetic
RANKS ?= 2
TRAIN ?=
VAL ?=
TOKENIZER ?=
PRESET ?=
ARGS ?=
PRETRAIN_FLAGS = --recipe $(RECIPE) --resume auto $(if $(PRESET),--model.preset $(PRESET)) $(if $(TRAIN),--data.train $(TRAIN)) $(if $(VAL),--data.val $(VAL)) \
	$(if $(TOKENIZER),--data.tokenizer $(TOKENIZER)) $(ARGS)

pretrain: env
ifeq ($(TRAIN),)
	@test -f data/shards/synthetic/val/manifest.json -a -f $(TOKENIZER_DIR)/tokenizer.json || $(MAKE) --no-print-directory shards
endif
	GPUS_PER_NODE=$(RANKS) PYTHON=$(PY) bash launch/pretrain.sh $(PRETRAIN_FLAGS)

# --- prompting (see README "## Prompting" and docs/prompting.md) ---
ZEROSHOT_DIR ?= data/zeroshot
ZEROSHOT_TRAIN ?= 32
ZEROSHOT_TEST ?= 100

zeroshot-data: env
	$(PY) -m data_pipeline.zeroshot_data --out $(ZEROSHOT_DIR) --train-per-class $(ZEROSHOT_TRAIN) \
		--test-per-class $(ZEROSHOT_TEST) --image-size $(SYNTH_SIZE) --workers $(SHARD_WORKERS)

EXPORT ?= runs/tiny-synthetic/export
PROMPT_DIR ?= runs/prompting
ZEROSHOT_TASKS ?= shape color count background

prompting: env
	@test -f $(ZEROSHOT_DIR)/background/verbalizer.yaml || $(MAKE) --no-print-directory zeroshot-data
	@for t in $(ZEROSHOT_TASKS); do \
		prompts="--templates $(ZEROSHOT_DIR)/$$t/templates.txt --verbalizer $(ZEROSHOT_DIR)/$$t/verbalizer.yaml"; \
		$(PY) -m pretrain.zeroshot --checkpoint $(EXPORT) --data $(ZEROSHOT_DIR)/$$t/test $$prompts \
			--out $(PROMPT_DIR)/$$t/zeroshot --run-dir $(PROMPT_DIR) --tag $$t || exit 1; \
		$(PY) -m pretrain.prompt_tune --checkpoint $(EXPORT) --train $(ZEROSHOT_DIR)/$$t/train \
			--test $(ZEROSHOT_DIR)/$$t/test $$prompts --out $(PROMPT_DIR)/$$t || exit 1; \
	done

# --- fine-tuning (see docs/finetuning.md) ---
TASK ?= vqa
PEFT ?= lora
BASE ?= runs/tiny-synthetic/export

finetune: env
	@test -f $(BASE)/model.safetensors || $(MAKE) --no-print-directory pretrain
	@test -f data/shards/synthetic_vqa/val/manifest.json || $(MAKE) --no-print-directory vqa-shards
	ENTRY=finetune GPUS_PER_NODE=$(RANKS) PYTHON=$(PY) bash launch/pretrain.sh --recipe $(TASK)_synthetic \
		--name $(TASK)-$(PEFT) --peft.method $(PEFT) --base.path $(BASE) --resume auto $(ARGS)

# --- instruction tuning (see docs/instruction_tuning.md) ---
CAPTION_LM_TOKENIZER ?= data/caption-lm-tokenizer
CAPTION_LM ?= runs/caption-lm/export
INSTRUCT_DIR ?= data/shards/synthetic_instruct

instruct: env
	@test -f $(BASE)/model.safetensors || $(MAKE) --no-print-directory pretrain
	@test -f $(CAPTION_LM_TOKENIZER)/tokenizer.json || \
		$(PY) -m data_pipeline.lm_tokenizer --shards data/shards/synthetic/train --out $(CAPTION_LM_TOKENIZER)
	@test -f $(CAPTION_LM)/config.json || ENTRY=caption_lm GPUS_PER_NODE=$(RANKS) PYTHON=$(PY) bash launch/pretrain.sh \
		--recipe caption_lm_synthetic --lm.tokenizer $(CAPTION_LM_TOKENIZER) --resume auto
	@test -f $(VQA_SHARDS_DIR)/val/manifest.json || $(MAKE) --no-print-directory vqa-shards
	@test -f $(INSTRUCT_DIR)/val/manifest.json || $(PY) -m data_pipeline.make_instructions \
		--captions data/shards/synthetic --vqa $(VQA_SHARDS_DIR) --out $(INSTRUCT_DIR)
	ENTRY=instruct GPUS_PER_NODE=$(RANKS) PYTHON=$(PY) bash launch/pretrain.sh --recipe instruct_stage1_synthetic \
		--base.path $(BASE) --lm.name $(CAPTION_LM) --data.train $(INSTRUCT_DIR)/train --data.val $(INSTRUCT_DIR)/val \
		--resume auto $(ARGS)
	ENTRY=instruct GPUS_PER_NODE=$(RANKS) PYTHON=$(PY) bash launch/pretrain.sh --recipe instruct_stage2_synthetic \
		--data.train $(INSTRUCT_DIR)/train --data.val $(INSTRUCT_DIR)/val --resume auto $(ARGS)

# one captioning template against six, both models the same steps and data, on held-out phrasings (T0/FLAN)
instruct-templates: instruct
	$(PY) -m benchmarks.bench_instruct_templates --base $(BASE) --lm $(CAPTION_LM) --vqa $(VQA_SHARDS_DIR)

clean:
	rm -rf $(VENV) build *.egg-info
