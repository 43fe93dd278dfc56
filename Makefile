# The two commands of the README: `make demo` and `make test`. Both set up whatever is missing first.
VENV ?= .venv
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test demo clean docs

setup:
	@bash scripts/setup.sh

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/saex demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

docs: setup
	COLUMNS=100 $(VENV)/bin/python -c "from saex.cli import markdown_reference; print(markdown_reference(), end='')" > docs/cli.md
