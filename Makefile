# Two commands a user needs: `make search` and `make test`. `make venv` builds the environment alone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv search test clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

search: venv
	$(BIN)/python search.py +space=resnet

test: venv
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf $(VENV) work outputs multirun
