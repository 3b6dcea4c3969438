# The two commands of the README. Each builds .venv from requirements.txt
# when it is missing or older than requirements.txt.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: test demo venv clean-venv

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest tests -q -n 2

demo: venv
	$(PY) demo.py --outdir=demo-runs

clean-venv:
	rm -rf $(VENV)
