# Two commands for a fresh machine (see README):
#   make demo   sets up the pinned ComfyUI (or uses COMFYUI_DIR) and runs the default example workflow
#   make test   sets up the test ComfyUIs (0.3.75, and 0.33.0 where its archive is in ../shared/comfyui/, or
#               those in LIKENESS_TEST_COMFYUIS) and Debian's Chromium, and runs the whole suite against each
PY ?= .venv/bin/python

.PHONY: setup setup-browser demo test bench

setup:
	bash scripts/setup_comfyui.sh >/dev/null

setup-browser:
	bash scripts/setup_browser.sh

demo: setup
	$(PY) scripts/demo.py

test: setup setup-browser
	bash scripts/run_tests.sh

bench: setup
	$(PY) bench/import_time.py
