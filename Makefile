PY := .venv/bin/python
PIP := .venv/bin/pip
PYTEST_MARK := $(shell $(PY) -c "import torch; print('' if torch.cuda.is_available() else 'not gpu')" 2>/dev/null || echo "not gpu")

.PHONY: demo test bench lint clean

.venv/installed: pyproject.toml constraints.txt
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

test: .venv/installed
	$(PY) -m pytest -q -m "$(PYTEST_MARK)" --timeout 300

demo: .venv/installed
	$(PY) -m mmdata build sample_data runs/demo/data --split-by speaker --test-groups george --val 0.15 --overwrite

bench: .venv/installed
	@for f in tools/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: .venv/installed
	.venv/bin/ruff check mmdata mtml_models tests tools

clean:
	rm -rf runs .pytest_cache
