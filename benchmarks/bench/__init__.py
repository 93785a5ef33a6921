"""Deployment numbers, in one process run: the runtime (ONNX Runtime; TensorRT where present)
against the PyTorch reference ``bdm_train.sampling.sample``, on the same weights, steps, eta,
seed and batch.

    python -m benchmarks.bench                  # full run, ~5 min on 2 cores: benchmarks/results/bench_cpu.{json,md}
    python -m benchmarks.bench --quick          # a tiny network in seconds (the smoke test); prints the table
    python -m benchmarks.bench --max-load 0.5   # first wait (up to --wait s) for a quiet machine

Method. Networks get random weights (every parameter re-drawn: the UNet zero-initialises its
output convolutions, which would make eps = 0), are exported as FP32 and FP16 step graphs, and
sampled through ``bdm_runtime.load(...).sample`` and ``bdm_train.sampling.sample``. The backends of
one (network, batch) are interleaved repeat by repeat (their order rotated), so each repeat gives
one runtime/PyTorch pair measured under the same machine conditions; ratios are the median of the
per-pair ratios, times the medians. Loop overhead comes from the same timed calls: the runtime's
public step-timing hook (``Sampler.sample(..., timing=)``) gives each step's own time, and overhead
= (sampling time - sum of step times) / sum of step times. Thread settings are pinned:
``torch.set_num_threads(T)`` and ONNX Runtime ``intra_op_num_threads = T``, in an ONNX Runtime
``SessionOptions`` given to ``bdm_runtime.load(..., session_options=)``
(``ort_settings.ort_session_options``). The sampler-default section (``benchmarks.defaults``) times
the shipped model at its sampler default against the old one (100 ancestral DDIM steps) in the
same run. Cold start, peak
RSS and ``import bdm_runtime`` are measured in fresh subprocesses (the runtime ones check that torch
never enters ``sys.modules``). FLOPs per network evaluation come from the exported graph's
shapes (``benchmarks.flops``), the peak from a float32 matmul with the same thread count.

Stages, one module each: ``config`` (networks, settings, targets), ``machine`` (CPU, load, matmul
peak), ``networks`` (random weights, export, FLOPs), ``ort_settings`` and ``timing`` (the runtime
against PyTorch, the ONNX Runtime sweep), ``fresh`` with ``children/`` (cold start, memory, import
time in fresh processes), ``gpu``, ``report`` (targets, markdown), ``run`` (the stages in order) and
``__main__`` (the command line).
"""
