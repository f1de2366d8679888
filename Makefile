# The two commands a user types on a fresh clone: `make demo` and `make test`.
# Both install first when needed (idempotent: the stamp is newer than pyproject.toml).
PY      := .venv/bin/python
CURATE  := .venv/bin/curate
STAMP   := .venv/.curate-installed
DEMO    := demo_out

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

# the recipe's chain, then the closed loop on its corpus (students per method against the ground truth; it needs
# the synth truth, so it is a command of its own, not a recipe stage), then the report of both
demo: install
	$(CURATE) run examples/recipes/demo.toml
	$(CURATE) compare $(DEMO)/corpus --out $(DEMO)/compare --quick
	$(CURATE) report $(DEMO) --out $(DEMO)/report.html

test: install
	$(PY) -m pytest -q -ra

bench: install
	$(PY) bench/run_all.py --out bench/results.md

clean:
	rm -rf $(DEMO) .pytest_cache .hypothesis
