# Every target installs what it needs first (scripts/setup.sh is idempotent).
.PHONY: setup demo test test-fast chaos bench bench-dispatch bench-image bench-fleet bench-metrics \
	bench-cli bench-vm bench-web bench-density deb test-deb clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m tools.demo $(DEMO_ARGS)

# The fast tier: the union on plain folders, the FUSE ABI and the import graph, run as the
# unprivileged user nobody (scripts/unprivileged.sh), in seconds.
FAST_TESTS = tests/union tests/fuse/test_abi.py tests/test_imports.py

# The type checker, the fast tier as nobody, the whole suite (as root) on the native FUSE
# session, the union's tests again on the portable pyfuse3 backend, then the node's package
# built and installed in throwaway Debian roots (test-deb's tests).
test: setup deb
	.venv/bin/python -m mypy
	scripts/unprivileged.sh -m pytest -q -p no:cacheprovider $(FAST_TESTS)
	.venv/bin/python -m pytest -q -p no:cacheprovider -m "not deb" $(PYTEST_ARGS)
	QVDFS_TEST_BACKEND=pyfuse3 .venv/bin/python -m pytest -q -p no:cacheprovider \
		tests/qvdfs/test_union.py tests/qvdfs/test_differential.py tests/union
	.venv/bin/python -m pytest -q -p no:cacheprovider -m deb tests/packaging

test-fast: setup
	scripts/unprivileged.sh -m pytest -q -p no:cacheprovider $(FAST_TESTS)

# Faults injected into three HKDs on one PostgreSQL (tools/chaos.py): seeded, it prints the
# seed; CHAOS_ARGS="--seed N" replays a run, "--faults N" sets its length (30: ~9 minutes,
# 100: ~30 minutes on this shared machine).
chaos: setup
	.venv/bin/python -m tools.chaos $(CHAOS_ARGS)

bench: setup
	.venv/bin/python -m benchmarks.run $(BENCH_ARGS)

# The daemon's own CPU per request with no kernel in the way (benchmarks/dispatch.py): the
# session's opcode table and the union over folders, request by request.
bench-dispatch: setup
	.venv/bin/python -m benchmarks.dispatch $(BENCH_ARGS)

# The real-image row (benchmarks/realimage.py), on the cached Debian image (tools/debian_image.py).
bench-image: setup
	.venv/bin/python -m benchmarks.realimage $(BENCH_ARGS)

# A fleet on this machine (benchmarks/fleet.py): 20 HKDs on one PostgreSQL, 200 VMs.
bench-fleet: setup
	.venv/bin/python -m benchmarks.fleet $(BENCH_ARGS)

# One scrape of an HKD's /metrics with 100 running VMs (benchmarks/metrics.py).
bench-metrics: setup
	.venv/bin/python -m benchmarks.metrics $(BENCH_ARGS)

# How long qvdctl takes to answer (benchmarks/cli.py): --help, vm list, config get.
bench-cli: setup
	.venv/bin/python -m benchmarks.cli $(BENCH_ARGS)

# A VM's start, boot, exec, dpkg and stop through qvdctl (benchmarks/vmlife.py), busybox and
# Debian, unprivileged and privileged.
bench-vm: setup
	.venv/bin/python -m benchmarks.vmlife $(BENCH_ARGS)

# N Debian desktops on one node (benchmarks/density.py): each root's daemon RSS and PSS, the
# node's MemAvailable per desktop, startup of all N; BENCH_ARGS="--desktops 20" for more.
bench-density: setup
	.venv/bin/python -m benchmarks.density $(BENCH_ARGS)

# The web admin with 1,000 VMs over 20 hosts (benchmarks/web.py): pages' times and the
# live feed's latency, on SQLite and PostgreSQL.
bench-web: setup
	.venv/bin/python -m benchmarks.web $(BENCH_ARGS)

# The node's Debian package (scripts/build-deb.sh), rebuilt only when a packaged file changed.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
DEB := dist/qvd-node_$(VERSION)_amd64.deb

deb: setup $(DEB)

$(DEB): scripts/build-deb.sh $(shell git ls-files pyproject.toml README.md qvdformat qvdfs qvdctl qvdproc packaging)
	bash scripts/build-deb.sh

# The package installed, reinstalled, removed and purged in throwaway Debian 12 roots
# (tests/packaging/test_deb.py); a few minutes when the .deb must be built first.
test-deb: deb
	.venv/bin/python -m pytest -q -p no:cacheprovider -m deb tests/packaging $(PYTEST_ARGS)

clean:
	rm -rf .venv build dist *.egg-info
