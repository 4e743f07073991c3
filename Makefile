# Every target creates and uses the local virtual environment itself; the stamp makes the
# second call install nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

# make sweep / sweep-local / report: which experiment, and extra Hydra overrides
EXPERIMENT ?= nan_map
SWEEP_DIR  ?= outputs/sweeps/$(EXPERIMENT)
OVERRIDES  ?=
REPORT_DIR ?= $(SWEEP_DIR)
ARGS       ?=

.PHONY: install train test test-fast lint bench sweep sweep-local report wandb-sweep clean

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

train: $(STAMP)  ## one run on the embedded default (tiny Qwen2.5-VL, shapes data, bf16, sdpa)
	$(PY) -m src.train $(ARGS)

test: $(STAMP)  ## the whole suite, slow end-to-end tests included
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests

bench: $(STAMP)  ## monitor cost and half-precision matmul modes, as ratios measured side by side
	$(PY) -m experiments.bench $(ARGS)

sweep-local: $(STAMP)  ## the default grid on this machine, then the report
	$(PY) -m src.train -m experiment=$(EXPERIMENT) hydra.sweep.dir=$(SWEEP_DIR) $(OVERRIDES)
	$(PY) -m src.report $(SWEEP_DIR)

sweep: $(STAMP)  ## the same grid on SLURM through Hydra's submitit launcher
	$(PY) -m src.train -m experiment=$(EXPERIMENT) hydra/launcher=slurm hydra.sweep.dir=$(SWEEP_DIR) $(OVERRIDES)

report: $(STAMP)
	$(PY) -m src.report $(REPORT_DIR)

wandb-sweep: $(STAMP)  ## create a W&B sweep and start agents (needs the W&B service)
	bash experiments/wandb/launch.sh $(SWEEP)

clean:
	rm -rf outputs multirun
