# Shortcuts for developers; the README's commands work without make.
.PHONY: run check lint bench

run:
	bash .ci/setup run

check:
	bash .ci/setup test

lint:
	/opt/hostvold/venv/bin/ruff check hostvold tests bench
	/opt/hostvold/venv/bin/mypy

bench:
	/opt/hostvold/venv/bin/python bench/thick_create.py
