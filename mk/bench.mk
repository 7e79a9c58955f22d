# Benchmarks (bench/, pytest-benchmark) and their report; included from the Makefile after
# BIN and STAMP are defined.  See bench/README.md.
#
#   make bench          full run (~10-15 min on 2 CPU cores) -> results/bench.json, then
#                       results/bench.md + results/bench.png (the Makefile's `bench` target)
#   make bench-report   rebuild results/bench.md and .png from results/bench.json
#   make bench-ci       every benchmark once, small matrix (what CI runs, < 3 min)
#   make bench-compare  rerun and compare with the last autosaved run (.benchmarks/)
# BENCH_ARGS adds pytest options, e.g. BENCH_ARGS="--bench-size=full" or "-k 4096x4096".

BENCH_JSON  ?= results/bench.json
BENCH_ARGS  ?=
BENCH_PYTEST = $(BIN)/python -m pytest bench/ -q --benchmark-columns=min,median,rounds,iterations --benchmark-sort=name
BENCH_RUN    = mkdir -p $(dir $(BENCH_JSON)) && $(BENCH_PYTEST) --benchmark-json=$(BENCH_JSON) --benchmark-autosave $(BENCH_ARGS)
BENCH_REPORT = $(BIN)/python bench/report.py $(BENCH_JSON) --out $(dir $(BENCH_JSON))

.PHONY: bench-run bench-report bench-ci bench-compare

bench-run: $(STAMP)
	$(BENCH_RUN)

bench-report:
	$(BENCH_REPORT)

bench-ci: $(STAMP)
	$(BIN)/python -m pytest bench/ -q --benchmark-disable $(BENCH_ARGS)

bench-compare: $(STAMP)
	$(BENCH_PYTEST) --benchmark-compare --benchmark-autosave $(BENCH_ARGS)
