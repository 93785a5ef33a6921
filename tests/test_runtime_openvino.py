"""The OpenVINO backend: parity with ONNX Runtime at FP32, the noise protocol, the FP32 update per node.

References are independent of the backend: ONNX Runtime's images (another library on the same
graph) for parity, the noise protocol's own splits for chunking, and OpenVINO's runtime model
(what its CPU plugin really executed, node by node) for the precisions.
"""
import os

import numpy as np
import pytest
import torch

import bdm_runtime
from bdm_runtime.errors import BdmError

ov = pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from bdm_runtime.backends import ov_split  # noqa: E402
from bdm_runtime.backends.openvino import native_precisions  # noqa: E402
from helpers import export_mixture, in_process  # noqa: E402

PARITY_TOL = 1e-3  # tests/test_runtime.py's backend parity tolerance (its comment says why)
REDUCED = ("bf16", "f16")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _export(ckpt, path, **kw):
    from bdm_train.checkpoint import load
    from bdm_export import export_onnx

    model, process, config = load(ckpt)
    export_onnx(model, process, path, channels=model.in_channels, num_classes=model.num_classes,
                default_steps=8, default_eta=0.0, **kw)
    return path


@pytest.fixture(scope="module")
def unet_onnx(tiny_checkpoint, tmp_path_factory):
    return _export(tiny_checkpoint, str(tmp_path_factory.mktemp("ov_unet") / "bdm.onnx"))


@pytest.fixture(scope="module")
def cond_onnx(tiny_cond_checkpoint, tmp_path_factory):
    return _export(tiny_cond_checkpoint, str(tmp_path_factory.mktemp("ov_cond") / "bdm.onnx"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ov_cache"))


def _ov(path, cache, **kw):
    return bdm_runtime.load(path, backend="openvino", threads=1, cache_dir=cache, **kw)


def _both(path, cache, n, precision="fp32", ov_kw=None, **kw):
    with _ov(path, cache, precision=precision, **(ov_kw or {})) as s:
        got = s.sample(n, seed=3, **kw)
    with bdm_runtime.load(path, threads=1) as s:
        ref = s.sample(n, seed=3, **kw)
    return got, ref


# -- parity at FP32 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("eta,solver,grid", [(0.0, "ddim", "uniform"), (1.0, "ddim", "power"),
                                             (None, "dpmpp2m", "logsnr"), (1.0, "dpmpp2m", "edm")])
def test_fp32_parity_with_onnx_runtime(unet_onnx, cache, eta, solver, grid):
    got, ref = _both(unet_onnx, cache, 4, steps=6, eta=eta, solver=solver, grid=grid)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < PARITY_TOL


@pytest.mark.parametrize("eta,labels,guidance", [(1.0, [2, 0, 1, 0], 2.0), (0.0, None, 0.0)])
def test_fp32_parity_conditional(cond_onnx, cache, eta, labels, guidance):
    got, ref = _both(cond_onnx, cache, 4, steps=5, eta=eta, labels=labels, guidance=guidance)
    # B12's (1 + w) eps_c - w eps_u adds both branches' rounding (tests/test_runtime.py, same bound)
    assert np.abs(got - ref).max() < PARITY_TOL * (1 + 2 * guidance)


def test_format1_fp16_and_closed_form_graphs(tiny_checkpoint, tmp_path, cache):
    old = _export(tiny_checkpoint, str(tmp_path / "v1.onnx"), format_version=1)
    got, ref = _both(old, cache, 3, steps=5, eta=1.0)
    assert np.abs(got - ref).max() < PARITY_TOL
    got, ref = _both(old, cache, 3, precision="auto", steps=5, eta=0.0)  # the split serves format 1 too
    assert np.isfinite(got).all()
    half = _export(tiny_checkpoint, str(tmp_path / "fp16.onnx"), fp16=True)  # Casts around the network
    with _ov(half, cache, precision="fp32") as s:
        assert s._backend.compiled_models[0].inputs[0].get_names() >= {"z"} and np.isfinite(s.sample(2, steps=3)).all()
    mix = export_mixture(tmp_path, default_steps=6)[0]  # a closed-form denoiser: no convolutions
    got, ref = _both(mix, cache, 5, steps=6, eta=1.0)
    assert np.abs(got - ref).max() < PARITY_TOL


# -- the noise protocol --------------------------------------------------------------------------------
def test_chunking_and_first_index_draw_the_same_noise(unet_onnx, cache):
    with _ov(unet_onnx, cache, precision="fp32") as s:
        a = s.sample(7, seed=5, steps=4, eta=1.0)
        assert np.array_equal(a, s.sample(7, seed=5, steps=4, eta=1.0))
        assert not np.array_equal(a, s.sample(7, seed=6, steps=4, eta=1.0))
        head = s.sample(3, seed=5, steps=4, eta=1.0)
        tail = s.sample(4, seed=5, steps=4, eta=1.0, first_index=3)
    with _ov(unet_onnx, cache, precision="fp32", batch=2) as s2:
        chunked = s2.sample(7, seed=5, steps=4, eta=1.0)
    # Same latents and noise per image; kernels may round differently at another batch size (1 ulp).
    np.testing.assert_allclose(chunked, a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([head, tail]), a, rtol=0, atol=1e-6)


# -- precision, node by node ---------------------------------------------------------------------------
def _precisions(compiled):
    return ov_split.runtime_precisions(compiled)


def test_fp32_runs_every_node_in_fp32(unet_onnx, cache):
    with _ov(unet_onnx, cache, precision="fp32") as s:
        network, update = s._backend.compiled_models
        assert s.precision == "fp32" and "network fp32, update fp32" in s.provider
    rows = _precisions(network) + _precisions(update)
    assert any(layer == "Convolution" for layer, _ in rows)
    assert [r for r in rows if r[1] in REDUCED] == []


@pytest.mark.parametrize("graph,precision", [("unet_onnx", "bf16"), ("cond_onnx", "bf16"), ("unet_onnx", "fp16")])
def test_reduced_network_fp32_update_per_node(graph, precision, cache, request):
    path = request.getfixturevalue(graph)  # the conditional graph: B12's guided combination is update
    native = native_precisions(ov.Core(), "CPU")
    if precision not in native:
        pytest.skip(f"this CPU has no {precision} units (OpenVINO CPU capabilities: {native})")
    try:
        s = _ov(path, cache, precision=precision)
    except BdmError as e:  # OpenVINO lists the type but its CPU plugin computes it in fp32 here
        assert "ran the network in fp32" in str(e)
        pytest.skip(f"{precision}: {e}")
    with s:
        network, update = s._backend.compiled_models
        assert s.precision == precision and f"network {precision}, update fp32" in s.provider
        x = s.sample(2, seed=1, steps=3, **({"labels": [0, 2], "guidance": 1.5} if graph == "cond_onnx" else {}))
    assert np.isfinite(x).all()
    want = {"bf16": "bf16", "fp16": "f16"}[precision]
    convs = [p for layer, p in _precisions(network) if layer == "Convolution"]
    assert convs and all(p == want for p in convs), convs
    rows = _precisions(update)
    assert [r for r in rows if r[1] in REDUCED] == []
    assert sum(layer in ("MatMul", "FullyConnected") for layer, _ in rows) >= 4  # the DCTs (B1) are here


def test_the_whole_graph_under_the_bf16_hint_is_what_the_split_avoids(unet_onnx):
    # Guarding the test above: without the split, OpenVINO runs DCT MatMuls of the update in bf16.
    if "bf16" not in native_precisions(ov.Core(), "CPU"):
        pytest.skip("this CPU has no bf16 units")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(unet_onnx), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    network_names = {"Convolution"}
    reduced = [layer for layer, p in _precisions(compiled) if p in REDUCED and layer not in network_names]
    assert any(layer in ("MatMul", "FullyConnected") for layer in reduced)


def test_bf16_is_close_to_fp32(unet_onnx, cache, tiny_checkpoint):
    """bf16 against fp32 (deterministic sampler) is bounded by what PyTorch's bf16 autocast does to the
    same network: another library's rounding of the same type, the error a user of it accepts."""
    if "bf16" not in native_precisions(ov.Core(), "CPU"):
        pytest.skip("this CPU has no bf16 units")
    from bdm_train.checkpoint import load
    from bdm_train.sampling import sample

    kw = dict(steps=6, eta=0.0, solver="ddim", grid="uniform")
    with _ov(unet_onnx, cache, precision="bf16") as s:
        low = s.sample(8, seed=4, **kw)
    with _ov(unet_onnx, cache, precision="fp32") as s:
        ref = s.sample(8, seed=4, **kw)
    model, process, _ = load(tiny_checkpoint)
    ref_t = sample(model, process, 8, seed=4, channels=1, **kw).numpy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_t = sample(model, process, 8, seed=4, channels=1, **kw).float().numpy()
    err, err_torch = np.abs(low - ref), np.abs(low_t - ref_t)
    print(f"bf16 vs fp32 mean/max abs: OpenVINO {err.mean():.4g}/{err.max():.4g}, "
          f"PyTorch autocast {err_torch.mean():.4g}/{err_torch.max():.4g}")
    assert 0 < err.mean() < 2 * err_torch.mean() + 1e-4
    assert np.quantile(err, 0.99) < 2 * np.quantile(err_torch, 0.99) + 1e-3


# -- loading, options, cache, errors -----------------------------------------------------------------
def test_cache_dir_and_user_config(unet_onnx, tmp_path):
    folder = tmp_path / "c"
    with _ov(unet_onnx, str(folder), precision="fp32") as s:
        s.sample(1, seed=0, steps=2)
    assert len(os.listdir(folder)) >= 1  # OpenVINO wrote its compiled blob
    with bdm_runtime.load(unet_onnx, backend="openvino", precision="fp32", cache_dir=False, core=ov.Core(),
                          config={"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "THROUGHPUT"}) as s:
        network, whole = s._backend.compiled_models
        assert int(whole.get_property("INFERENCE_NUM_THREADS")) == 1
        assert str(whole.get_property("PERFORMANCE_HINT")) in ("THROUGHPUT", "PerformanceMode.THROUGHPUT")


def test_refusals(unet_onnx, cache, monkeypatch):
    with pytest.raises(BdmError, match="precision must be one of"):
        _ov(unet_onnx, cache, precision="int4")
    with pytest.raises(BdmError, match="backend='openvino'"):
        bdm_runtime.load(unet_onnx, precision="bf16")
    with pytest.raises(BdmError, match="INFERENCE_PRECISION_HINT"):
        _ov(unet_onnx, cache, config={"INFERENCE_PRECISION_HINT": "bf16"})
    with pytest.raises(BdmError, match="no device 'NOSUCH'"):
        _ov(unet_onnx, cache, device="NOSUCH")
    with pytest.raises(BdmError, match="ONNX Runtime options"):
        bdm_runtime.load(unet_onnx, backend="openvino", providers=["CPUExecutionProvider"])
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    with pytest.raises(BdmError, match="OpenVINO is not installed: pip install openvino"):
        _ov(unet_onnx, cache)


def test_bdm_run_says_which_precision_ran(unet_onnx, tmp_path, capsys):
    from bdm_runtime.cli import main

    code, out, err = in_process(main, ["--engine", unet_onnx, "--backend", "openvino", "--precision", "auto",
                                       "--ov-cache", "none", "--n", "2", "--steps", "2", "--quiet",
                                       "--npz", str(tmp_path / "a.npz")], capsys)
    assert code == 0, err
    ran = "bf16" if "bf16" in native_precisions(ov.Core(), "CPU") else "fp32"
    assert "backend openvino (OpenVINO" in out and f"network {ran}, update fp32" in out
    code, out, err = in_process(main, ["--engine", unet_onnx, "--precision", "bf16", "--n", "1",
                                       "--npz", str(tmp_path / "b.npz")], capsys)
    assert code != 0 and err.strip().splitlines() == ["Error: --precision: OpenVINO options; add --backend openvino"]
