# napari-petdiff: `make run` opens napari with the plugin and a sample; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 fonts-dejavu-core

.PHONY: install run test bench bench-diffusion screenshots clean

install: $(STAMP)

# Re-runs only when the project's dependencies change.
$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and exactly: anything else pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[testing]"
	touch $(STAMP)

run: install
	@if [ -z "$$DISPLAY" ]; then \
	  echo "no DISPLAY: starting napari on a virtual screen (Xvfb); screenshot in out/make-run.png"; \
	  xvfb-run -a -s "-screen 0 1600x1000x24" $(PY) -m napari_petdiff.launch --screenshot out/make-run.png; \
	else $(PY) -m napari_petdiff.launch; fi

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) benchmarks/projector.py
	$(PY) benchmarks/classical.py
	$(PY) benchmarks/patlak.py

# The diffusion benchmarks: about 1.5 h on 2 idle cores.
bench-diffusion: install
	$(PY) benchmarks/prior.py bench
	$(PY) benchmarks/prior.py samples
	$(PY) benchmarks/prior.py bench --prior brain-fdg-mr-2d
	$(PY) benchmarks/prior.py samples --prior brain-fdg-mr-2d
	$(PY) benchmarks/quality.py --realisations 5 --jobs 2
	$(PY) benchmarks/deft.py --realisations 3 --jobs 2
	$(PY) benchmarks/ood.py --case amyloid --jobs 2
	$(PY) benchmarks/ood.py --case ring --jobs 2
	$(PY) benchmarks/recon3d.py --steps 10
	$(PY) benchmarks/personalised.py registration
	$(PY) benchmarks/personalised.py build
	$(PY) benchmarks/personalised.py bench --realisations 3 --jobs 2

screenshots: install
	xvfb-run -a -s "-screen 0 1600x1000x24" $(PY) docs/make_screenshots.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
