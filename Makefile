# The two commands of the Quick start. Each bootstraps first (idempotent).
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)
DEMO_ARGS ?=

.PHONY: bootstrap demo test lint sanitize fuzz bench clean

bootstrap:
	@./scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m vfmig demo $(DEMO_ARGS)

test: bootstrap
	$(PY) -m pytest -q tests

lint: bootstrap
	.venv/bin/ruff check vfmig tests bench
	.venv/bin/mypy vfmig --ignore-missing-imports

# C unit tests, plain, under ASan/UBSan (build-asan/, configured with -Dsanitize=true, which
# is what VFMIG_SANITIZE=1 also selects when a build directory is configured) and under TSan
# (build-tsan/, configured with -Dtsan=true).
sanitize: bootstrap
	$(PY) -m pytest -q tests/test_c_units.py

# libFuzzer harnesses (csrc/fuzz/, built with clang into build-fuzz/), each run from its seed
# corpus for VFMIG_FUZZ_SECONDS (default 10; 60 with CI set); VFMIG_FUZZ_RESULTS=PATH writes JSON.
fuzz: bootstrap
	$(PY) -m pytest -q tests/test_fuzz.py

bench: bootstrap
	$(PY) bench/vm_bench.py
	$(PY) bench/migrate_bench.py
	$(PY) bench/device_bench.py
	$(PY) bench/probes_bench.py
	$(PY) bench/table.py

clean:
	rm -rf build build-asan build-tsan build-fuzz .venv
