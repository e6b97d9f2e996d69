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

.PHONY: install demo test test-all lint format bench bench-gpu clean

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

# Every CPU benchmark, each rewriting only its own section of benchmarks/RESULTS.md (several hours on 2 idle
# cores; measure with nothing else running). bench-gpu is the GPU script (on a machine with CUDA).
RESULTS := --markdown benchmarks/RESULTS.md
bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_cpu --threads 1 --compile --bf16 $(RESULTS)
	$(BIN)/python -m benchmarks.samplers $(RESULTS)
	$(BIN)/python -m benchmarks.data_startup $(RESULTS)
	$(BIN)/python -m benchmarks.conditional $(RESULTS) --picture docs/guidance.png
	$(BIN)/python -m benchmarks.defaults --budget 5m --threads-check --reuse-ours $(RESULTS)
	$(BIN)/python -m benchmarks.monitor $(RESULTS)
	$(BIN)/python -m benchmarks.inpaint --num 100 $(RESULTS)
	$(BIN)/python -m benchmarks.learned_variance --size 8 --json benchmarks/.cache/lv8.json
	$(BIN)/python -m benchmarks.learned_variance --size 16 --json benchmarks/.cache/lv16.json
	$(BIN)/python -m benchmarks.learned_variance --report benchmarks/.cache/lv8.json benchmarks/.cache/lv16.json $(RESULTS)
	$(BIN)/python -m benchmarks.cpu_budgets --size 28 --budget 10m --variants today,new --docs $(RESULTS)
	$(BIN)/python -m benchmarks.cpu_budgets --size 16 --budget 5m --variants today,bf16,new --docs $(RESULTS)
	$(BIN)/python -m benchmarks.sample_cpu $(HOME)/.cache/diffuse-bench/cpu-budgets-28-10m/new-s0 --num 128 --rounds 2 --score $(RESULTS)

bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu --device cuda:0 $(RESULTS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
