# Quickstart: `make demo` trains a small GPT on the bundled corpus; `make test` runs the suite.
# Both create .venv and install the project into it; nothing needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first, from TORCH_INDEX when set (e.g. the PyTorch CPU or CUDA wheel index; see README), so
# the project's own install finds it satisfied and never pulls another build.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= wandb,deepspeed,dev

.PHONY: install test test-quick demo bench gpu-check lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# two pytest workers (pytest-xdist), one thread each; a test file stays on one worker, so the layout tables' shared
# launches (module fixtures) run once
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

# the edit-test loop: only the tests that start no subprocess and no process group (the rest are skipped, saying so)
test-quick: install
	TRAINER_TEST_QUICK=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10 tests

demo: install
	$(BIN)/python -m trainer tokenizer --kind bpe --vocab-size 2048 --out runs/demo/tokenizer data/shakespeare/train.txt
	$(BIN)/python -m trainer train configs/demo.yaml
	$(BIN)/python -m trainer report runs/demo

bench: install
	$(BIN)/python bench/throughput.py

# the GPU acceptance run: one table of figures, targets and PASS/FAIL, meant to take under 8 minutes on one H100 or
# H200 (a CUDA build of torch: TORCH_INDEX=https://download.pytorch.org/whl/cu128); exits 1 on a failed row
gpu-check: install
	$(BIN)/python bench/gpu_check.py

lint: install
	$(BIN)/ruff check trainer launch tests bench

clean:
	rm -rf $(VENV) runs wandb
