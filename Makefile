PY := .venv/bin/python
PIP := .venv/bin/pip
PYTEST_MARK := $(shell $(PY) -c "import torch; print('' if torch.cuda.is_available() else 'not gpu')" 2>/dev/null || echo "not gpu")

.PHONY: demo test bench bench-models lint clean lock

LOCK := requirements.lock
WHEELS := .venv/wheels
# the lock pins what CI runs (Linux x86_64, CPython 3.11); anywhere else pip resolves pyproject.toml's ranges
LOCKED := $(shell python3 -c "import platform, sys; print(int(platform.machine() == 'x86_64' and sys.version_info[:2] == (3, 11)))")

# Every dependency at the version requirements.lock pins, fetched 6 at a time (torch's CUDA wheels are
# 3 GB) and unpacked without byte-compiling (imports compile what they use): no resolver, no waiting on
# one download at a time. `pip check` then proves the pins agree.
.venv/installed: pyproject.toml constraints.txt $(LOCK)
	test -d .venv || python3 -m venv .venv
ifeq ($(LOCKED),1)
	rm -rf $(WHEELS)
	grep -v '^#' $(LOCK) | xargs -P 6 -n 3 $(PIP) download -q --no-deps -d $(WHEELS)
	$(PIP) install -q --no-index --no-deps --no-compile --find-links $(WHEELS) -r $(LOCK)
	rm -rf $(WHEELS)
	$(PIP) install -q --no-deps -e .
	$(PIP) check
else
	$(PIP) install -q -c constraints.txt -e '.[dev]'
endif
	touch $@

# Resolve pyproject.toml's ranges afresh (under constraints.txt) in a scratch venv and pin every package.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q -c constraints.txt -e '.[dev]'
	{ echo "# Every package of '.[dev]' at one resolved version, for Linux x86_64 and CPython 3.11 (what CI"; \
	  echo "# runs); regenerate with: make lock"; \
	  .venv-lock/bin/pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock

test: .venv/installed
	$(PY) -m pytest -q -m "$(PYTEST_MARK)" --timeout 300

DEMO := runs/demo

# Build sample_data into shards (george held out as test, another speaker as val), inspect and verify
# them, then train the reference fusion model on the stream and evaluate it, whole and without audio.
# Two speakers (100 samples) train: 60 epochs, as 30 stop while the validation accuracy still climbs.
demo: .venv/installed
	$(PY) -m mmdata build sample_data $(DEMO)/data --split-by speaker --test-groups george --val 0.15 --overwrite
	$(PY) -m mmdata info $(DEMO)/data
	$(PY) -m mmdata verify $(DEMO)/data --decode
	$(PY) -m mmdata show $(DEMO)/data --split train -n 6 -o $(DEMO)/sheet.png
	$(PY) -m mmdata stats $(DEMO)/data -o $(DEMO)/stats.png
	$(PY) -m mtml_models train --data $(DEMO)/data --config configs/avmnist.yaml --out $(DEMO)/model \
		--set optim.epochs=60 --set data.batch_size=16
	$(PY) -m mtml_models eval --run $(DEMO)/model --split test
	$(PY) -m mtml_models eval --run $(DEMO)/model --split test --drop-modality audio
	@echo "demo done: contact sheet $(DEMO)/sheet.png, stats $(DEMO)/stats.png, curves $(DEMO)/model/curves.png"

# The quick benchmarks; tools/bench_models.py (hours on a CPU) runs on its own: make bench-models.
bench: .venv/installed
	@for f in tools/bench_*.py; do [ $$f = tools/bench_models.py ] && continue; echo "== $$f"; $(PY) $$f || exit 1; done

bench-models: .venv/installed
	$(PY) tools/bench_models.py --source ../shared/data/avmnist-dev

lint: .venv/installed
	.venv/bin/ruff check mmdata mtml_models tests tools

clean:
	rm -rf runs .pytest_cache
