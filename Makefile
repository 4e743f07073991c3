# Every target creates and uses the local virtual environment itself; the stamp makes the
# second call install nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

# make sweep / sweep-local / report: which experiment, and extra Hydra overrides.
# The default map is five blocks (conf/experiment/nan_map*.yaml), each a Hydra multirun
# into $(SWEEP_DIR)/<block>; the report reads them all.
EXPERIMENT ?= nan_map
SWEEP_DIR  ?= outputs/sweeps/$(EXPERIMENT)
BLOCKS     ?= $(EXPERIMENT)
# two cells side by side, one torch thread each: 2x the throughput of one 2-thread cell here
LOCAL_LAUNCHER ?= hydra/launcher=joblib hydra.launcher.n_jobs=2
# make sweep: conf/hydra/launcher/$(SLURM_LAUNCHER).yaml; slurm_local for the one-node
# cluster of experiments/slurm/local_cluster.sh; cluster keys via OVERRIDES="hydra.launcher.partition=gpu ..."
SLURM_LAUNCHER ?= slurm
OVERRIDES  ?=
REPORT_DIR ?= $(SWEEP_DIR)
ARGS       ?=
block_dir   = d=$${b\#$(EXPERIMENT)}; d=$${d\#_}; d=$(SWEEP_DIR)/$${d:-core}

.PHONY: install train test test-fast lint bench sweep sweep-local report lr-sensitivity wandb-sweep clean

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

train: $(STAMP)  ## one run on the embedded default (tiny Qwen2.5-VL, shapes data, bf16, sdpa)
	$(PY) -m src.train $(ARGS)

test: $(STAMP)  ## the whole suite, slow end-to-end tests included (what CI runs; < 15 min on 2 cores)
	$(PY) -m pytest -q --durations=15 $(ARGS)

test-fast: $(STAMP)  ## the tier to run on every change: no end-to-end sweeps (< 3 min on 2 cores)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)  ## ruff (lint and format) and mypy on the package, as .pre-commit-config.yaml and CI
	$(PY) -m ruff check nanlab src tests hydra_plugins experiments
	$(PY) -m ruff format --check nanlab src tests hydra_plugins experiments
	$(PY) -m mypy

bench: $(STAMP)  ## wrappers (bare loop, src.train, transformers.Trainer), monitor and precision costs as ratios; ARGS=--quick: the wrapper table alone (< 2 min)
	$(PY) -m experiments.bench $(ARGS)

sweep-local: $(STAMP)  ## the default map on this machine (~15 min on 2 cores), then the report
	set -e; for b in $(BLOCKS); do $(block_dir); \
	  $(PY) -m src.train -m experiment=$$b $(LOCAL_LAUNCHER) hydra.sweep.dir=$$d $(OVERRIDES); done
	$(PY) -m src.report $(SWEEP_DIR)

sweep: $(STAMP)  ## the same grid on SLURM through Hydra's submitit launcher
	set -e; for b in $(BLOCKS); do $(block_dir); \
	  $(PY) -m src.train -m experiment=$$b hydra/launcher=$(SLURM_LAUNCHER) hydra.sweep.dir=$$d $(OVERRIDES); done

report: $(STAMP)
	$(PY) -m src.report $(REPORT_DIR)

lr-sensitivity: $(STAMP)  ## final loss vs lr_x per precision x mitigation (conf/experiment/lr_sensitivity.yaml)
	$(PY) -m src.train -m experiment=lr_sensitivity $(LOCAL_LAUNCHER) \
	  hydra.sweep.dir=outputs/sweeps/lr_sensitivity $(OVERRIDES)
	$(PY) -m src.report outputs/sweeps/lr_sensitivity

wandb-sweep: $(STAMP)  ## create a W&B sweep and start agents (needs the W&B service)
	bash experiments/wandb/launch.sh $(SWEEP)

clean:
	rm -rf outputs multirun

# the stable-lr frontier by bisection on log lr_x (conf/experiment/frontier_bisection.yaml):
# precision x softmax x clip, lr_x in [0.03, 30], 4 steps, 2 seeds; frontier_bisection.json/.csv
.PHONY: frontier
frontier: $(STAMP)  ## the largest stable lr_x per combination by bisection, then the report
	$(PY) -m src.train -m experiment=frontier_bisection $(LOCAL_LAUNCHER) \
	  hydra.sweep.dir=outputs/sweeps/frontier_bisection $(OVERRIDES)
	$(PY) -m src.report outputs/sweeps/frontier_bisection

# a real framework on top of transformers.Trainer: LLaMA-Factory's SFT entry (run_exp) with
# NanMonitorCallback in its callbacks and a planted masked_rows failure
# (experiments/hf_framework.py), on CPU, on the tiny checkpoint. LLaMA-Factory 0.9.5 pins
# transformers<=5.6 and accelerate<=1.11, so it gets its own environment, .venv-lf (~6 GB,
# torch with its CUDA wheels), with nanlab imported from the work tree.
LF_VENV  ?= .venv-lf
LF_PY    := $(LF_VENV)/bin/python
LF_STAMP := $(LF_VENV)/.installed
LF_PINS  ?= llamafactory==0.9.5 transformers==5.6.0 accelerate==1.11.0 peft==0.18.1 trl==0.24.0 \
            datasets==4.0.0 torch==2.14.1 torchvision==0.29.1
HF_EXAMPLE_DIR ?= outputs/hf_example
$(LF_STAMP):
	$(PYTHON) -m venv $(LF_VENV)
	$(LF_PY) -m pip install -q --upgrade pip
	$(LF_PY) -m pip install -q $(LF_PINS)
	touch $(LF_STAMP)

.PHONY: hf-example
hf-example: $(STAMP) $(LF_STAMP)  ## LLaMA-Factory's run_exp + NanMonitorCallback, planted masked_rows (CPU, tiny model, ~30 s after the install)
	rm -rf $(HF_EXAMPLE_DIR)/checkpoint $(HF_EXAMPLE_DIR)/lf
	$(PY) -m src.train save.hf=true max_steps=5 logger=none serve.enabled=false \
	  hydra.run.dir=$(HF_EXAMPLE_DIR)/checkpoint
	PYTHONPATH=. $(LF_PY) -m experiments.hf_framework $(HF_EXAMPLE_DIR)/checkpoint/hf \
	  $(HF_EXAMPLE_DIR)/lf > $(HF_EXAMPLE_DIR)/lf.log 2>&1 || { tail -n 30 $(HF_EXAMPLE_DIR)/lf.log; exit 1; }
	@echo "(LLaMA-Factory's log: $(HF_EXAMPLE_DIR)/lf.log)"
	@sed -n '/^--- nanlab verdict/,$$p' $(HF_EXAMPLE_DIR)/lf.log
