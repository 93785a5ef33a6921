"""The FP16 step graph: network in float16, sampler update in float32, and how far it drifts.

ONNX Runtime's CPU provider has almost no float16 kernels on x86: it inserts casts and computes
float16 nodes in float32, rounding to float16 between nodes. So ORT here proves the graph valid
and runnable; accuracy is measured against torch's own FP16 model (``convert_to_fp16()``, run on
CPU) and against FP32. Real FP16 arithmetic is measured on a GPU (tests/test_trt_gpu.py).
Run with ``-s`` to see the measured drift.
"""
import numpy as np
import onnx
import pytest
import torch

from bdm_train import checkpoint
from bdm_train.analytic import MixtureDenoiser
from bdm_train.sampling import sample
from bdm_export import export_onnx
from bdm_export.fp16 import F16, F32, half_model, node_input_types, relative_error, value_types
from bdm_export.step import StepGraph
from bdm_runtime import format as fmt
from helpers import graph_step
from test_export import ALLOWED, GRID, N, dct_initializers, ort_sample, run_step, session


@pytest.fixture(scope="module")
def graphs(tiny_checkpoint, tmp_path_factory):
    model, process, config = checkpoint.load(tiny_checkpoint)
    folder = tmp_path_factory.mktemp("fp16")
    paths = {}
    for precision, half in (("fp32", False), ("fp16", True)):
        paths[precision] = folder / f"{precision}.onnx"
        meta = export_onnx(model, process, paths[precision], channels=1, fp16=half)
        assert meta[fmt.K_PRECISION] == precision
    return model, process, paths


def test_fp16_graph_is_valid_and_typed(graphs):
    _, _, paths = graphs
    m = onnx.load(str(paths["fp16"]))
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    assert {n.op_type for n in m.graph.node} <= ALLOWED
    # Graph inputs and outputs stay float32 (label int64).
    for v in list(m.graph.input) + list(m.graph.output):
        assert v.type.tensor_type.elem_type == F32, v.name
    inits = {i.name: i for i in m.graph.initializer}
    types = value_types(m)
    # The network runs in float16: every Conv/Gemm weight is a float16 initializer, its input float16.
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            assert inits[n.input[1]].data_type == F16, n.name
            assert types[n.input[0]] == F16, n.name
    # The update stays float32: the DCT MatMuls (float32 constant matrices) and every float Div (B8, B10).
    dct = dct_initializers(m, 16)
    dct_mm = [n for n in m.graph.node if n.op_type == "MatMul" and set(n.input) & dct]
    assert len(dct_mm) == 10
    assert all(types[i] == F32 for n in dct_mm for i in n.input)
    float_divs = [t for t in node_input_types(m, "Div") if t[0] in (F16, F32)]
    assert len(float_divs) >= 4 and all(set(t) == {F32} for t in float_divs)
    # What FP16 cannot hold stays float32: the time embedding's sinusoids of 1000 t (a float16 time
    # scaled by 1000 has a spacing of 0.5), GroupNorm statistics (InstanceNormalization) and softmax.
    for op in ("Sin", "Cos", "InstanceNormalization", "Softmax"):
        assert node_input_types(m, op) and all(set(t) == {F32} for t in node_input_types(m, op)), op
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    to = {a.i for n in casts for a in n.attribute if a.name == "to"}
    assert {F16, F32} <= to  # explicit casts at both boundaries


def test_fp16_needs_convert_to_fp16(tmp_path):
    from bdm_train.diffusion import BlurringDiffusion

    p = BlurringDiffusion(8)
    model = MixtureDenoiser(torch.zeros(2, 1, 8, 8), p)
    with pytest.raises(TypeError, match="convert_to_fp16"):
        half_model(model)
    with pytest.raises(TypeError, match="convert_to_fp16"):
        export_onnx(model, p, tmp_path / "x.onnx", channels=1, fp16=True)
    assert not list(tmp_path.iterdir())


def test_fp16_drift(graphs, images):
    """Drift of one step's z_next and of final images, FP16 vs FP32, in torch and through the graphs."""
    model, process, paths = graphs
    half = half_model(model)
    s32, s16 = session(paths["fp32"]), session(paths["fp16"])
    g32, g16 = StepGraph(model, process).eval(), StepGraph(half, process).eval()
    gen = torch.Generator().manual_seed(5)
    drift = {"torch16 vs torch32": 0.0, "onnx16 vs onnx32": 0.0, "onnx16 vs torch16": 0.0}
    for i in GRID:
        x = images[0][torch.randint(0, 96, (5,), generator=gen)]
        t = torch.full((5,), i / N)
        s = torch.full((5,), (i - 1) / N)
        z = process.q_sample(x, t, torch.randn(x.shape, generator=gen))
        noise = torch.randn(x.shape, generator=gen)
        eta = torch.tensor([0.0])
        t32 = graph_step(g32, z=z, t=t, s=s, eta=eta, noise=noise)[0]
        t16 = graph_step(g16, z=z, t=t, s=s, eta=eta, noise=noise)[0]
        o32 = run_step(s32, z.numpy(), t.numpy(), s.numpy(), 0.0, noise.numpy())[0]
        o16 = run_step(s16, z.numpy(), t.numpy(), s.numpy(), 0.0, noise.numpy())[0]
        for key, err in (("torch16 vs torch32", relative_error(t16, t32)),
                         ("onnx16 vs onnx32", relative_error(o16, o32)),
                         ("onnx16 vs torch16", relative_error(o16, t16))):
            drift[key] = max(drift[key], err)
    kw = dict(n=4, seed=1, steps=20, eta=0.0)
    img32 = sample(model, process, **kw).numpy()
    img16 = sample(half, process, channels=1, **kw).numpy()
    onnx32 = ort_sample(s32, (1, 16, 16), **kw)
    onnx16 = ort_sample(s16, (1, 16, 16), **kw)
    images_drift = {"torch16 vs torch32": np.abs(img16 - img32), "onnx16 vs onnx32": np.abs(onnx16 - onnx32),
                    "onnx16 vs torch16": np.abs(onnx16 - img16)}
    # Few steps: a step from t to s amplifies eps errors by up to alpha_s / alpha_t (blur), so FP16
    # drift grows as steps shrink in number; measured for the record, bounded loosely on the mean.
    kw7 = dict(kw, steps=7)
    few = {"torch16 vs torch32": np.abs(sample(half, process, channels=1, **kw7).numpy()
                                        - sample(model, process, **kw7).numpy()),
           "onnx16 vs onnx32": np.abs(ort_sample(s16, (1, 16, 16), **kw7) - ort_sample(s32, (1, 16, 16), **kw7))}
    print("\nFP16 drift of one step's z_next (max|a-b| / max|b| over t = 1 .. 0.05, batch 5): "
          + ", ".join(f"{k} {v:.2e}" for k, v in drift.items()))
    print("FP16 drift of final images in [-1, 1] (20 deterministic steps, 4 images, max / mean abs): "
          + ", ".join(f"{k} {v.max():.2e} / {v.mean():.2e}" for k, v in images_drift.items()))
    print("FP16 drift of final images, 7 deterministic steps (max / mean abs): "
          + ", ".join(f"{k} {v.max():.2e} / {v.mean():.2e}" for k, v in few.items()))
    assert all(v.mean() < 2e-2 for v in few.values())
    # Bounds: the measured values (printed; tiny checkpoint: 8.9e-3, 1.3e-3, 9.1e-3 for one step,
    # <= 1.8e-2 for images) times ~3-5. float16 has an 11-bit significand (relative step 9.8e-4), so
    # eps carries ~1e-3 relative error (3e-3 at t = 0.05); the float32 update passes it on scaled by
    # sigma, and 20 deterministic steps accumulate it. torch's CPU float16 kernels round more than
    # ORT's (float32 compute between float16 casts), hence the larger torch16 figures.
    assert drift["torch16 vs torch32"] < 3e-2
    assert drift["onnx16 vs onnx32"] < 1e-2
    assert drift["onnx16 vs torch16"] < 3e-2   # the --check tolerance of FP16 graphs
    for key, d in images_drift.items():
        assert d.max() < 0.1, key
    # The graphs compute what torch computes: the FP32 run is the torch run.
    assert np.abs(onnx32 - img32).max() < 1e-3


@pytest.fixture(scope="module")
def images(tiny_data):
    d = np.load(tiny_data)
    return torch.from_numpy(d["images"].astype(np.float32) / 127.5 - 1), torch.from_numpy(d["labels"])
