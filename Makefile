# Quick start: `make run` (set up + run the offline default), `make test` (set up + run the tests).
# `make test-fast` runs the unit tier alone (no end-to-end runs through real Flower processes).
# Set RUN_CONFIG to override run-config keys, e.g. make run RUN_CONFIG="num-server-rounds=5 seed=1" (TOML values:
# quote one with spaces, RUN_CONFIG='clip2fl-prompt="a photo of a {}"'; RUN_CONFIG reaches the launcher verbatim), and PRESET
# to start from one of the paper's settings in conf/, e.g. make run PRESET=cifar10-lt RUN_CONFIG="data-dir=/data/c10";
# RAY_ADDRESS=<head>:6379 joins a running Ray cluster (docs/cluster.md); FEDERATION_CONFIG sets the clients' Ray
# resources, e.g. FEDERATION_CONFIG="client-resources-num-gpus=0.25" (docs/gpu.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install run test test-fast docs bench clean

# torch/torchvision are pinned first so pip takes the wheels on this disk instead of downloading.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[server,dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m server_app.launch $(if $(PRESET),--run-config conf/$(PRESET).toml) $(if $(RUN_CONFIG),--run-config '$(subst ','\'',$(RUN_CONFIG))') $(if $(FEDERATION_CONFIG),--federation-config "$(FEDERATION_CONFIG)") $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" --durations=15

docs: $(STAMP)
	$(PY) -m flcore.config_docs > docs/configuration.md

bench: $(STAMP)
	$(PY) -m bench.sim_overhead

clean:
	rm -rf $(VENV) .flwr
