# sacrum-masks: every entry point. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.14.1 torchvision==0.29.1
CT      ?= 0
DNUM    ?= 300
DNAME   ?= SacrumDataset
GPU     ?= 0
FOLD    ?= 0
TRAINER ?= nnUNetTrainer
CONFIGURATION ?= 3d_fullres
CONFIG  ?=
DATASET ?=
SACRUM_IDX ?=
TOTALSEG ?=
FORCE   ?= 0
TRAIN_STAGE ?= all
SKIP_INVALID ?= 0
PYTEST_ARGS ?=
# SLURM (make slurm-masks / slurm-train); empty = the script's default (see bin/slurm_lib.sh)
N         ?= 4
PARTITION ?=
ACCOUNT   ?=
TIME      ?=
GPUS      ?= 1
CPUS      ?= 4
FOLDS     ?= 0 1 2 3 4
ARGS      ?=
SLURM_ENV = N='$(N)' PARTITION='$(PARTITION)' ACCOUNT='$(ACCOUNT)' TIME='$(TIME)' GPUS='$(GPUS)' CPUS='$(CPUS)'

STAMP := $(VENV)/.sacrum-masks-installed
export VENV PYTHON TORCH CT DNUM DNAME GPU FOLD TRAINER CONFIGURATION CONFIG FORCE SKIP_INVALID TRAIN_STAGE

.PHONY: help setup test demo register dataset train masks qc ct-labels bench clean-demo slurm-masks slurm-train

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "Variables: DNUM=$(DNUM) GPU=$(GPU) FOLD=$(FOLD) TRAINER=$(TRAINER) CONFIGURATION=$(CONFIGURATION) TORCH='$(TORCH)'"

setup: $(STAMP) ## create .venv with the pinned dependencies (TORCH=..., CT=1 adds TotalSegmentator)

# The torch choice is part of the stamp: a new TORCH=... re-runs the install.
TORCH_SPEC := $(VENV)/.torch-spec
$(TORCH_SPEC): torch-spec-check
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH)" ]; then echo "$(TORCH)" > $@; fi

.PHONY: torch-spec-check
torch-spec-check: ;

$(STAMP): pyproject.toml bin/setup.sh $(TORCH_SPEC)
	bash bin/setup.sh
	@touch $@

test: $(STAMP) ## run the test suite (installs what it needs first)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP) ## end to end on synthetic data: data, register, dataset, train (CPU), masks, QC
	bash bin/demo.sh

register: $(STAMP) ## stage 1: CT/MRI labels onto MRI grids (DATASET="dir ..." [SACRUM_IDX="92"] [TOTALSEG=v2])
	bash bin/register.sh $(DATASET)

dataset: $(STAMP) ## stage 2: nnU-Net raw dataset from CONFIG=split.json (DNUM, DNAME, FORCE=1)
	bash bin/dataset.sh

train: $(STAMP) ## stage 3: plan, preprocess, splits, train, evaluate, export (GPU=0|0,1|cpu FOLD=0|"0 1 2 3 4"|all TRAIN_STAGE=)
	bash bin/train.sh

masks: $(STAMP) ## stage 4: sacrum masks as BIDS derivatives (same as bash bin/generate_sacrum.sh)
	bash bin/generate_sacrum.sh

slurm-masks: $(STAMP) ## stage 4 as a SLURM array of N shards + summary job (N PARTITION ACCOUNT TIME GPUS CPUS; ARGS="--bids DIR -- --fold 0")
	$(SLURM_ENV) bash bin/slurm_masks.sh $(ARGS)

slurm-train: $(STAMP) ## stage 3 on SLURM: prepare job, FOLDS as an array (GPUS each), finish job (evaluate, export)
	$(SLURM_ENV) FOLDS='$(FOLDS)' bash bin/slurm_train.sh $(ARGS)

qc: $(STAMP) ## QC report (PNG per mask + index.html) for DERIV=<dataset>/derivatives/labels
	bash bin/qc.sh $(DERIV)

ct-labels: $(STAMP) ## stage 0: TotalSegmentator CT labels for DATASET (needs CT=1 and its weights)
	bash bin/ct_labels.sh $(DATASET)

bench: $(STAMP) ## benchmarks, printed as ratios against baselines measured in the same run
	bash bench/run.sh

clean-demo: ## remove the demo data and its nnU-Net folders (data/demo only; real data is never touched)
	rm -rf data/demo
