# bitnet-coreml: every target sets itself up first (a fresh machine needs nothing but python3).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
PIPELINE ?= pipelines/default.toml
# torch + transformers live in their own venv (models, export matrix, benchmark exports) so the runtime
# venv never carries them; versions pinned in models/requirements-export.txt. Defined before any
# rule uses them: make expands a prerequisite when it reads the rule.
EXPORT_VENV ?= .venv-export
EXPORT_STAMP := $(EXPORT_VENV)/.installed-export
# Tests never touch the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test lint convert conformance bench bench-models models export-matrix report-screenshot clean

# setup also compiles the fused decode's C kernel for this machine (executor/native.py: a no-op when the
# library for the current source is there; without a C compiler the numba kernel runs instead).
setup: $(STAMP)
	$(BIN)/python -m bitnet_coreml.executor.native build \
		|| echo "warning: the C decode kernel did not build; the numba kernel runs instead" >&2

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

test: setup
	$(BIN)/ruff check bitnet_coreml tests bench models
	$(BIN)/python -m pytest -q -m "not slow and not conformance" -p no:cacheprovider

lint: setup
	$(BIN)/ruff check bitnet_coreml tests bench models
	$(BIN)/mypy bitnet_coreml

convert: setup
	$(BIN)/bitnet-coreml pipeline run $(PIPELINE)

# The README's screenshot of the bundled model's report (headless Chromium: apt-get install chromium).
REPORT ?= out/bitnet_offline-macos14-m1.report.html
report-screenshot: convert
	$(BIN)/python -m bitnet_coreml.report.browser $(REPORT) docs/report.png --width 1100 --height 1400

conformance: setup
	$(BIN)/python -m pytest -q -m conformance -p no:cacheprovider --conformance-full

# The benchmark exports (~1 GB, not committed) are made once with the export venv.
bench-models: $(EXPORT_STAMP)
	test -f bench/_work/bitnet_50m.onnx || $(EXPORT_VENV)/bin/python bench/make_bench_model.py --size 50m
	test -f bench/_work/bitnet_200m.onnx || $(EXPORT_VENV)/bin/python bench/make_bench_model.py --size 200m

bench: setup bench-models convert
	$(BIN)/python bench/run_all.py

# Regenerate the bundled example models (models/README.md).
$(EXPORT_STAMP): models/requirements-export.txt
	test -x $(EXPORT_VENV)/bin/python || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EXPORT_VENV)/bin/python -m pip install --quiet -r models/requirements-export.txt
	touch $(EXPORT_STAMP)

models: $(EXPORT_STAMP)
	$(EXPORT_VENV)/bin/python models/make_models.py
	$(EXPORT_VENV)/bin/python models/make_export_matrix.py

# The export-recipe matrix alone (models/exports/, models/README.md "Export-recipe matrix").
export-matrix: $(EXPORT_STAMP)
	$(EXPORT_VENV)/bin/python models/make_export_matrix.py

clean:
	rm -rf build dist *.egg-info .pytest_cache out
