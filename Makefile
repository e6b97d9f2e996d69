# diffuse — every target sets up what it needs (a project-local virtual environment in .venv).
# TORCH_SPEC picks the torch wheel for the venv: the default CPU build keeps set-up small and fast;
# on a GPU box use `make install TORCH_SPEC=torch` to get the CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out
DEMO_STEPS ?= 3000
# The model whose accuracy per guidance scale benchmarks/RESULTS.md records (conditional section).
DEMO_MODEL ?= --preset tiny --batch-size 64
DEMO_CLASSES := $(foreach d,0 1 2 3 4 5 6 7 8 9,--class $(d))

.PHONY: install demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffuse schedule --kind linear --kind cosine --plot $(DEMO_DIR)/schedules.png
	$(BIN)/diffuse train builtin:digits --out $(DEMO_DIR)/run --steps $(DEMO_STEPS) $(DEMO_MODEL) --overwrite
	$(BIN)/diffuse sample $(DEMO_DIR)/run $(DEMO_CLASSES) --num 8 --out $(DEMO_DIR)/samples --grid $(DEMO_DIR)/grid.png --overwrite
	@echo
	@echo "Pictures: $(DEMO_DIR)/grid.png (one row per digit 0-9, 8 of each), $(DEMO_DIR)/samples/*.png,"
	@echo "          $(DEMO_DIR)/run/samples/ (previews during training), $(DEMO_DIR)/schedules.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=10

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/train_cpu.py --markdown benchmarks/RESULTS.md
	$(BIN)/python benchmarks/samplers.py --markdown benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
