# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On machines with a local CPU wheel this resolves to it; elsewhere pass TORCH_SPEC=torch to take your platform's build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test man lint clean
$(BIN)/gentool: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/gentool
	$(MAKE) -C examples demo GENTOOL=$(abspath $(BIN)/gentool)

test: $(BIN)/gentool
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

man: $(BIN)/gentool
	$(BIN)/python tools/gen_man.py

lint: $(BIN)/gentool
	$(BIN)/python -m pip install -q ruff && $(BIN)/ruff check src tests tools bench

clean:
	rm -rf $(VENV) examples/work
