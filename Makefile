# perpfolio: every target creates the virtual environment and installs the project when needed.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: run test ui backfill bench clean browser replay case-study sql

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)  ## materialize the whole default window on the built-in synthetic market
	$(PY) -m pipelines.run

# Two pytest workers (a test file stays on one worker), each with single-threaded BLAS: two workers
# on two cores do not also fight over BLAS threads. Files go out in collection order, which
# tests/conftest.py makes "most end-to-end tests first" (xdist would otherwise send the files with
# the most tests first, and the long end-to-end files would run alone at the end).
test: $(STAMP) browser  ## the whole test suite
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Optional, separate step: Debian's chromium for the report's headless screenshot test. It never
# fails the build: without root apt-get (or when the install fails) it says why and the test skips.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "browser: chromium found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: installing Debian's chromium (apt-get)"; \
	  if apt-get update -qq && apt-get install -y -qq chromium >/dev/null; then echo "browser: chromium installed"; \
	  else echo "browser: chromium install failed; the report screenshot test will skip"; fi; \
	else echo "browser: chromium missing and apt-get as root unavailable; the report screenshot test will skip"; fi

ui: $(STAMP)  ## Dagster UI + daemon on 127.0.0.1:3000 over the same DAGSTER_HOME as make run
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

backfill: $(STAMP)  ## make backfill START=YYYY-MM-DD END=YYYY-MM-DD
	@test -n "$(START)" -a -n "$(END)" || (echo "usage: make backfill START=YYYY-MM-DD END=YYYY-MM-DD" && exit 2)
	$(PY) -m pipelines.run --start $(START) --end $(END)

sql: $(STAMP)  ## make sql Q="SELECT * FROM backtest.comparison": one read-only query on the warehouse, printed
	@$(PY) -m pipelines.query "$(Q)"

case-study: $(STAMP)  ## docs/real-data-case-study.md from a run on the shared real data (DATA=../shared/data/real)
	$(PY) -m pipelines.case_study $(if $(DATA),--data $(DATA))

replay: $(STAMP)  ## the synthetic market served as Binance/Bybit/OKX/Deribit APIs on 127.0.0.1:8765 (PERPFOLIO_SOURCE=exchange)
	$(PY) -m tools.replay --port 8765

bench: $(STAMP)  ## benchmarks (not part of make test); see BENCHMARKS.md
	$(PY) -m pip install --quiet -e ".[test,bench]"
	for b in benchmarks/bench_*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) warehouse/*.duckdb warehouse/reports .dagster_home/storage .dagster_home/history .dagster_home/schedules .dagster_home/logs
