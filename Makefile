# fastmatch developer entry points. `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: serve test test-stress lint typecheck check bench build clean ts schema fuzz

# The TypeScript client (clients/typescript): tsc from the npm registry, pinned by the lockfile.
TS     := clients/typescript
TS_SRC := $(wildcard $(TS)/src/*.ts $(TS)/test/*.ts $(TS)/scripts/*.mjs docs/schema/*.json) $(TS)/tsconfig.json

$(STAMP): pyproject.toml setup.py $(wildcard _fastmatch/*.pyx)
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

# The whole suite against a private Redis, then the `conformance` subset (front end, matching,
# loading races) again against a Redis Cluster started for that run (README "Development").
test: check ts
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m conformance --redis-topology cluster $(PYTEST_ARGS)

# The suite on a contended machine (README "Development"): three rounds, each with a CPU hog on
# one core, then on every core; prints each failure with its test id. About half an hour.
test-stress: check ts
	$(BIN)/python -m tests.stress --rounds $(or $(ROUNDS),3) $(PYTEST_ARGS)

# The protocol fuzzer's release run (README "Protocol fuzzer"): FUZZ_EXAMPLES examples per
# session state (default 2,000), four times as many upgrade requests; `make test` runs 50.
fuzz: $(STAMP)
	FASTMATCH_FUZZ=release $(BIN)/python -m pytest tests/transport/test_fuzz.py --timeout=0 \
		--hypothesis-show-statistics $(PYTEST_ARGS)

$(TS)/node_modules/.installed: $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund
	touch $@

$(TS)/dist/.built: $(TS)/node_modules/.installed $(TS_SRC)
	cd $(TS) && npm run --silent build
	touch $@

ts: $(TS)/dist/.built

# After a change to server/protocol/messages.py: regenerate docs/schema and the TS types.
schema: $(STAMP)
	$(BIN)/python -m server.protocol.schema
	cd $(TS) && node scripts/gen-types.mjs

# Kernel benchmarks (pytest-benchmark), then the end-to-end profile of DESIGN's targets.
# With BASE=<commit>: instead, the same load on that commit (built in a worktree) and on this
# checkout, alternating, and the ratios (bench/compare.py; COMPARE_ARGS e.g. --rate 300 --find-rate).
bench: $(STAMP)
ifdef BASE
	$(BIN)/python -m bench.compare --base $(BASE) $(COMPARE_ARGS)
else
	$(BIN)/python -m pytest bench --benchmark-only $(PYTEST_ARGS)
	$(BIN)/python -m bench.e2e $(E2E_ARGS)
endif

clean:
	rm -rf $(VENV) build *.egg-info _fastmatch/*.c _fastmatch/*.so $(TS)/node_modules $(TS)/dist
