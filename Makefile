# Two commands for a fresh machine (see README):
#   make demo   sets up the pinned ComfyUI (or uses COMFYUI_DIR) and runs the default example workflow
#   make test   sets up the pinned ComfyUI (and Debian's Chromium for the browser test) and runs the whole
#               test suite against a real server
PY ?= .venv/bin/python

.PHONY: setup setup-browser demo test bench

setup:
	bash scripts/setup_comfyui.sh

setup-browser:
	bash scripts/setup_browser.sh

demo: setup
	$(PY) scripts/demo.py

test: setup setup-browser
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) bench/import_time.py

# mutation score of the identity paths (scripts/mutate.py; slow, not in CI)
.PHONY: mutate
mutate:
	$(PY) scripts/mutate.py
