# The two commands of the README: `make demo` and `make test`. Both set up whatever is missing first.
VENV ?= .venv
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test demo clean

setup:
	@bash scripts/setup.sh

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/saex demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
