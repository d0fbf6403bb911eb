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

# The Debian package (README "Install the package"): dist/hostvold_<version>_<arch>.deb.
# Needs the build dependencies of debian/control (bash .ci/setup deb installs them first).
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' hostvold/__init__.py)
.PHONY: deb
deb:
	dpkg-buildpackage -b -us -uc
	mkdir -p dist
	mv ../hostvold_$(VERSION)_*.deb ../hostvold_$(VERSION)_*.buildinfo ../hostvold_$(VERSION)_*.changes dist/
	lintian --info dist/hostvold_$(VERSION)_*.changes
