# Shortcuts for developers; the README's commands work without make.
.PHONY: run check lint bench bench-quick

run:
	bash .ci/setup run

check:
	bash .ci/setup test

lint:
	/opt/hostvold/venv/bin/ruff check hostvold tests bench
	/opt/hostvold/venv/bin/mypy

bench:  # every benchmark, one table (root; a few minutes); e.g. make bench ARGS="--only P5,P8"
	PYTHONPATH=$(CURDIR) /opt/hostvold/venv/bin/python -m bench.run_all $(ARGS)

bench-quick:  # a smoke run with tiny sizes
	PYTHONPATH=$(CURDIR) /opt/hostvold/venv/bin/python -m bench.run_all --quick $(ARGS)
