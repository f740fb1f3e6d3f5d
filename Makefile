# FaultSense: every target passes extra Hydra overrides through ARGS="...".
SHELL := /bin/bash
# uv from PATH, else the copy `make setup` installs with pip (pyenv may not shim it yet).
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen
ARGS ?=

.PHONY: setup test test-fast lint format data synth train eval sweep cv retrain serve app demo loadtest bench clean

setup:  ## install uv if missing, the locked environment, then YAMNet's weights (offline)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	$(RUN) python -m faultsense.models.yamnet_weights

test:  ## the whole test suite (what CI runs)
	$(RUN) pytest -q $(ARGS)

lint:
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format:
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

synth:  ## write the synthetic ESC-50-layout dataset to data/synthetic
	$(RUN) faultsense-synth $(ARGS)

data:  ## manifest + waveform cache, e.g. make data ARGS="data.source=../shared/datasets/esc50-16k"
	$(RUN) faultsense-data $(ARGS)

train:  ## train and register the best checkpoint (register=true; ARGS win)
	$(RUN) faultsense-train register=true $(ARGS)

eval:
	$(RUN) faultsense-eval $(ARGS)

sweep:
	$(RUN) faultsense-train -m hparams_search=cnn_optuna $(ARGS)

cv:
	$(RUN) faultsense-cv $(ARGS)

retrain:
	$(RUN) faultsense-retrain $(ARGS)

serve:
	$(RUN) faultsense-serve $(ARGS)

app:  ## the web app over a running server (http://127.0.0.1:7860)
	$(RUN) faultsense-app $(ARGS)

demo:  ## offline first run: synthetic data, a small model, then server + app (Ctrl-C stops)
	$(RUN) python -m serving.demo $(ARGS)

# Headless Locust against a running server (`make serve` first): CSV stats, Locust's HTML
# report and throughput/latency PNGs in logs/loadtest.
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_USERS ?= 32
LOADTEST_TIME ?= 60s
loadtest:  ## headless Locust on a running server: CSV, HTML report and PNG plots in logs/loadtest
	@mkdir -p logs/loadtest
	$(RUN) locust -f serving/locustfile.py --headless --host $(LOADTEST_HOST) \
		-u $(LOADTEST_USERS) -r $(LOADTEST_USERS) -t $(LOADTEST_TIME) \
		--csv logs/loadtest/faultsense --csv-full-history \
		--html logs/loadtest/faultsense.html --only-summary $(ARGS)
	$(RUN) python -m serving.loadtest_report logs/loadtest/faultsense

clean:
	rm -rf outputs multirun logs wandb .pytest_cache .ruff_cache
