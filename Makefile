# Every target installs what it needs first (scripts/setup.sh is idempotent).
.PHONY: setup demo test bench bench-image bench-fleet clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m tools.demo

# The type checker, the whole suite on the native FUSE session, then the union's tests again
# on the portable pyfuse3 backend.
test: setup
	.venv/bin/python -m mypy
	.venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	QVDFS_TEST_BACKEND=pyfuse3 .venv/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_union.py tests/test_differential.py tests/union

bench: setup
	.venv/bin/python -m benchmarks.run $(BENCH_ARGS)

# The real-image row (benchmarks/realimage.py): needs mmdebstrap to build its cached Debian image.
IMAGE_APT_PACKAGES := mmdebstrap

bench-image: setup
	@missing=; for pkg in $(IMAGE_APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" \
	        || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "bench-image: installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	.venv/bin/python -m benchmarks.realimage $(BENCH_ARGS)

# A fleet on this machine (benchmarks/fleet.py): 20 HKDs on one PostgreSQL, 200 VMs.
bench-fleet: setup
	.venv/bin/python -m benchmarks.fleet $(BENCH_ARGS)

clean:
	rm -rf .venv build *.egg-info
