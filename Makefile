# fastmatch developer entry points. `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: serve test lint typecheck check bench build clean fuzz

$(STAMP): pyproject.toml setup.py _fastmatch/kernel.pyx
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import server.matching.kernel as k; print('fastmatch kernels:', ', '.join(k.implementations()))"
	touch $(STAMP)

build: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -e .

serve: $(STAMP)
	$(BIN)/fastmatch serve

lint: $(STAMP)
	$(BIN)/ruff check server tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

test: check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The protocol fuzzer's release run (README "Protocol fuzzer"): FUZZ_EXAMPLES examples per
# session state (default 2,000), four times as many upgrade requests; `make test` runs 50.
fuzz: $(STAMP)
	FASTMATCH_FUZZ=release $(BIN)/python -m pytest tests/transport/test_fuzz.py --timeout=0 \
		--hypothesis-show-statistics $(PYTEST_ARGS)

# Kernel benchmarks (pytest-benchmark), then the end-to-end profile of DESIGN's targets.
bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only $(PYTEST_ARGS)
	$(BIN)/python -m bench.e2e $(E2E_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info _fastmatch/*.c _fastmatch/*.so
