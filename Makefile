# Shortcuts for developers; the README's commands work without make.
.PHONY: run check lint bench bench-quick

run:
	bash .ci/setup run

check:
	bash .ci/setup test

lint:
	/opt/hostvold/venv/bin/ruff check hostvold tests bench
	/opt/hostvold/venv/bin/mypy

bench:  # every benchmark, one table (root; several minutes)
	/opt/hostvold/venv/bin/python -m bench.run_all

bench-quick:  # a smoke run with tiny sizes
	/opt/hostvold/venv/bin/python -m bench.run_all --quick
