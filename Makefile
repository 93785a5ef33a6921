# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PIP    := $(PY) -m pip
# torch is pinned to the local CPU build: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO   ?= demo_out
# The demo trains a small model on scikit-learn's bundled 8x8 digits (no download), exports the
# step graph and samples it through the runtime (ONNX Runtime here, TensorRT where present).
# blur_sigma_max 2 and the ancestral 50-step sampler: at this tiny budget (1,500 steps) these gave
# clean digits in both samplers, where 5 (20 scaled from 32x32 to 8x8) collapsed to a few shapes and
# left the deterministic sampler noisy (grids compared side by side; the Fashion-MNIST study measures it).
DEMO_STEPS ?= 1500

.PHONY: demo test install clean fmnist features figures study

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,export,ort,dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests

demo: $(VENV)/.installed
	mkdir -p $(DEMO)
	$(PY) examples/digits_npz.py $(DEMO)/digits.npz
	$(BIN)/bdm-train --data $(DEMO)/digits.npz --out $(DEMO)/run --ch 32 --ch-mult 1,2 \
	    --num-res-blocks 1 --attn none --dropout 0 --blur-sigma-max 2 --steps $(DEMO_STEPS) \
	    --batch-size 64 --lr 1e-3 --warmup 100 --ckpt-every 500 --sample-steps 50 --sample-eta 1 \
	    $(if $(wildcard $(DEMO)/run/model.pt),--resume)
	$(BIN)/bdm-export --ckpt $(DEMO)/run/model.pt --fp16 --check
	$(BIN)/bdm-run --engine $(DEMO)/run/bdm.onnx --n 64 --out $(DEMO)/grid.png --grid-scale 4
	@echo "demo: sample grid in $(DEMO)/grid.png"

# -- Fashion-MNIST study (issue 5): data from Debian's dataset-fashion-mnist ------------------------
FMNIST := /usr/share/datasets/fashion-mnist
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

fmnist:
	test -f $(FMNIST)/t10k-images-idx3-ubyte.gz || $(SUDO) apt-get install -y dataset-fashion-mnist

features: $(VENV)/.installed fmnist
	$(PY) -m benchmarks.feature_net train && $(PY) -m benchmarks.metrics stats

figures: $(VENV)/.installed fmnist
	$(PY) -m benchmarks.figures forward

study: $(VENV)/.installed fmnist
	$(PY) -m benchmarks.study run --hours $(or $(HOURS),4)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
