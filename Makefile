# The commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo serve test test-fast lint bench bench-hl7 bench-dicom migrate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install  ## a whole second-opinion case on the embedded defaults (SQLite)
	$(BIN)/overread demo

serve: install  ## the server on OVERREAD_* settings (default: SQLite ./overread.db, http://127.0.0.1:8080/fhir)
	$(BIN)/overread serve

migrate: install
	$(BIN)/overread db upgrade

test: install  ## the whole suite, every storage test on SQLite and on PostgreSQL; Orthanc tests in a netns (tests/run)
	VENV=$(VENV) tests/run $(TEST_ARGS)

test-fast: install  ## the inner loop, under two minutes: not the tests marked slow (Python subprocesses, kill -9, the demo) nor orthanc
	$(BIN)/python -m pytest -n 2 -q -m "not slow and not orthanc" $(TEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

bench: install  ## benchmarks (needs wrk: apt-get install wrk); figures go to docs/performance.md by hand
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-hl7: install  ## HL7 order intake beside a bare MLLP server
	$(BIN)/python -m bench.hl7_intake

bench-dicom: install  ## C-FIND/ImagingStudy and retrieves beside DCMTK findscu/movescu on Orthanc (in a netns: root or unshare -rn)
	$(BIN)/python -m bench.dicom

clean:
	rm -rf $(VENV) overread.db overread.db-wal overread.db-shm .pytest_cache .mypy_cache .ruff_cache
