# Every target installs what it needs first (scripts/setup.sh is idempotent).
.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m qvdctl.demo

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	.venv/bin/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf .venv build *.egg-info
