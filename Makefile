# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PIP    := $(PY) -m pip
# torch is pinned to the local CPU build: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO   ?= demo_out
SHIPPED ?= models/fmnist32
# `make demo` samples the shipped Fashion-MNIST model (trained by the study; see its MODEL_CARD.md):
# export the step graphs (TensorRT engines too where TensorRT and a GPU are present), check them
# against PyTorch with Polygraphy, and draw 64 images with bdm-run. No training.
# `make demo-train` trains a small model from scratch on scikit-learn's bundled 8x8 digits (no
# download, ~3 min on 2 cores) and samples it the same way: the whole path in one command.
# blur_sigma_max 2 and the ancestral 50-step sampler: at this tiny budget (1,500 steps) these gave
# clean digits in both samplers, where 5 (20 scaled from 32x32 to 8x8) collapsed to a few shapes and
# left the deterministic sampler noisy (grids compared side by side).
DEMO_STEPS ?= 1500
# The engine bdm-run gets: the FP16 TensorRT engine where one was built, else the FP32 ONNX graph
# (ONNX Runtime on CPU does not compute FP16 natively, so FP32 is the right choice there). An engine
# older than bdm.onnx is from an earlier export and never chosen (bdm-export refuses to leave one).
ENGINE = $$(test -f $(1)/bdm_fp16.plan && ! test $(1)/bdm.onnx -nt $(1)/bdm_fp16.plan && echo $(1)/bdm_fp16.plan || echo $(1)/bdm.onnx)

.PHONY: demo demo-train test install clean fmnist features figures study ship scale

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,export,ort,serve,openvino,dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests

demo: $(VENV)/.installed
	$(BIN)/bdm-export --ckpt $(SHIPPED)/model.pt --out-dir $(DEMO) --fp16 --check
	$(BIN)/bdm-run --engine $(call ENGINE,$(DEMO)) --n 64 --out $(DEMO)/grid.png --grid-scale 3
	@echo "demo: sample grid in $(DEMO)/grid.png"

demo-train: $(VENV)/.installed
	mkdir -p $(DEMO)/digits
	$(PY) examples/digits_npz.py $(DEMO)/digits/digits.npz
	$(BIN)/bdm-train --data $(DEMO)/digits/digits.npz --out $(DEMO)/digits --ch 32 --ch-mult 1,2 \
	    --num-res-blocks 1 --attn none --dropout 0 --blur-sigma-max 2 --steps $(DEMO_STEPS) \
	    --batch-size 64 --lr 1e-3 --warmup 100 --ckpt-every 500 --sample-steps 50 --sample-eta 1 \
	    $(if $(wildcard $(DEMO)/digits/model.pt),--resume)
	$(BIN)/bdm-export --ckpt $(DEMO)/digits/model.pt --fp16 --check
	$(BIN)/bdm-run --engine $(call ENGINE,$(DEMO)/digits) --n 64 --out $(DEMO)/digits/grid.png --grid-scale 4
	@echo "demo-train: sample grid in $(DEMO)/digits/grid.png"

# -- Fashion-MNIST study (issue 5): data from Debian's dataset-fashion-mnist ------------------------
FMNIST := /usr/share/datasets/fashion-mnist
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

fmnist:
	test -f $(FMNIST)/t10k-images-idx3-ubyte.gz || $(SUDO) apt-get install -y dataset-fashion-mnist

features: $(VENV)/.installed fmnist
	$(PY) -m benchmarks.feature_net train && $(PY) -m benchmarks.metrics stats

figures: $(VENV)/.installed fmnist
	$(PY) -m benchmarks.figures forward

# The study on 2 cores (spans sittings; resumable: run it again): two processes, one core each,
# each training its models round-robin, then exporting, sampling (through the runtime) and
# evaluating them; then the parity spot check and the report. ~1.3 h of one core per training.
STUDY_A ?= bdm-spectral,bdm10-spectral,bdm
STUDY_B ?= ddpm-spectral,ddpm
study: $(VENV)/.installed fmnist
	$(PY) -m benchmarks.study run --stages train,export,sample,eval --models $(STUDY_A) --threads 1 \
	    $(if $(HOURS),--hours $(HOURS)) & \
	$(PY) -m benchmarks.study run --stages train,export,sample,eval --models $(STUDY_B) --threads 1 \
	    $(if $(HOURS),--hours $(HOURS)) & \
	wait
	$(PY) -m benchmarks.study run --stages parity,report --allow-partial

# The third study (issue 19: blur strength, budget, capacity; docs/studies.md): resumable, two processes.
SCALE_A ?= bdm10-spectral,bdm3-spectral,bdm5-spectral
SCALE_B ?= ddpm,ddpm-ch32,bdm10-spectral-ch32,bdm-spectral
scale: $(VENV)/.installed fmnist
	$(PY) -m benchmarks.study scale --stages train,measure --models $(SCALE_A) $(if $(HOURS),--hours $(HOURS)) & \
	$(PY) -m benchmarks.study scale --stages train,measure --models $(SCALE_B) $(if $(HOURS),--hours $(HOURS)) & \
	wait
	$(PY) -m benchmarks.study scale --stages report

# The shipping rule on the third study's results (issue 19; benchmarks/study/scale_ship.py): replaces
# models/fmnist32 only when the rule says so, else says why not. (The second study's own ship stage,
# `python -m benchmarks.study run --stages ship`, refuses once the third study has shipped.)
ship: $(VENV)/.installed
	$(PY) -m benchmarks.study scale --stages ship

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
