# Two entry points: `make demo` runs the main jobs (the snapshot/replay demo, then VinePPO on the
# built-in arithmetic task from its cached warm-up, then a look into the job's store), `make test`
# runs the suite.
# Both create the project-local virtualenv .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[cpu,test,s3]'
	@touch $(STAMP)

install: $(STAMP)

# runs/train starts afresh each time (vinekv train refuses an output that holds a checkpoint).
demo: $(STAMP)
	$(VENV)/bin/vinekv demo
	rm -rf runs/train
	$(VENV)/bin/vinekv train --output runs/train
	$(VENV)/bin/vinekv inspect runs/train/kv

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
