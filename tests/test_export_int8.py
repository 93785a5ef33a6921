"""INT8 step graphs (bdm_export.int8): what bdm-export --int8 writes, its calibration, and the runtime on it."""
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bdm_runtime
from bdm_export import read_metadata
from bdm_export.cli import main
from bdm_export.int8 import NETWORK, network_convs
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from helpers import in_process
from test_export import ALLOWED, FORBIDDEN
from test_export_cli import assert_one_line_error

STEPS, IMAGES = 4, 3


def _export(ckpt, out, capsys, *extra):
    code, stdout, err = in_process(main, ["--ckpt", ckpt, "--out-dir", out, "--no-engine", "--steps", STEPS,
                                          "--int8", "--calib-images", IMAGES, *extra], capsys)
    assert code == 0, err
    return stdout, err


def test_cli_writes_int8_beside_fp32_with_its_calibration(tiny_cond_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    stdout, err = _export(tiny_cond_checkpoint, out, capsys, "--check", "--calib-method", "max")
    assert sorted(os.listdir(out)) == ["bdm.onnx", "bdm_int8.onnx"]
    assert f"wrote {out / 'bdm_int8.onnx'} (int8, 1x16x16, 3 classes, guided" in stdout
    assert "onnxrt [int8] vs torch [fp32] z_next" in stdout and stdout.rstrip().endswith("check passed")
    assert "calibrating" in err  # the progress bar (stderr)
    meta = read_metadata(out / "bdm_int8.onnx")
    calib = meta[fmt.K_CALIBRATION]
    assert meta[fmt.K_PRECISION] == "int8"
    assert (calib["method"], calib["images"], calib["steps"], calib["seed"]) == ("max", IMAGES, STEPS, 0)
    assert calib["float_layers"] == ["first", "last", "skip"]
    fp32 = read_metadata(out / "bdm.onnx")
    assert {k: v for k, v in meta.items() if k not in (fmt.K_PRECISION, fmt.K_CALIBRATION)} == \
        {k: v for k, v in fp32.items() if k != fmt.K_PRECISION}
    info = bdm_runtime.load(str(out / "bdm_int8.onnx")).info   # the runtime's validation accepts it
    assert info.precision == "int8"


@pytest.fixture(scope="module")
def int8_uncond(tiny_checkpoint, tmp_path_factory):
    """``(fp32 path, int8 path)`` of the unconditional tiny model, ddim eta 0 by default (deterministic)."""
    from bdm_export.int8 import export_int8
    from bdm_export.onnx_export import export_onnx
    from bdm_train import checkpoint

    folder = tmp_path_factory.mktemp("int8_uncond")
    model, process, _ = checkpoint.load(tiny_checkpoint)
    fp32 = str(folder / "bdm.onnx")
    export_onnx(model, process, fp32, channels=1, default_steps=STEPS, default_eta=0.0)
    int8 = str(folder / "bdm_int8.onnx")
    export_int8(fp32, int8, images=IMAGES)
    return fp32, int8


def test_graph_is_symmetric_per_channel_qdq_of_network_convs_only(int8_uncond):
    fp32, int8 = int8_uncond
    m = onnx.load(int8)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and ops <= ALLOWED and not ops & FORBIDDEN
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = inits[n.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), n.name   # symmetric INT8: zero points 0 (no INT32 bias)
    quantized, kept = network_convs(onnx.load(fp32))
    assert quantized and kept and any("conv_in" in k for k in kept) and any("skip" in k for k in kept)
    convs = {n.name: n for n in m.graph.node if n.op_type == "Conv"}
    for name in quantized:
        x, w = (producer.get(i) for i in convs[name].input[:2])
        assert x.op_type == w.op_type == "DequantizeLinear", name
        wq = inits[w.input[0]]                          # INT8 weights, one scale per output channel
        assert wq.dtype == np.int8 and inits[w.input[1]].shape == (wq.shape[0],), name
    for name in kept:                                   # float convs: weights straight from an initializer
        assert convs[name].input[1] in inits and inits[convs[name].input[1]].dtype == np.float32, name
    # The sampler update is never quantized: every Q/DQ feeds (or is fed by) the network only.
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            users = [u for u in m.graph.node if n.output[0] in u.input]
            assert users and all(u.op_type == "DequantizeLinear" for u in users)
            assert all(c.name.startswith(NETWORK) for u in users for c in m.graph.node if u.output[0] in c.input)
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul" and not n.name.startswith(NETWORK)]
    assert matmuls and all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                           for n in matmuls for i in n.input)


def test_calibration_is_reproducible(int8_uncond, tmp_path):
    from bdm_export.int8 import export_int8

    fp32, int8 = int8_uncond
    again = str(tmp_path / "again.onnx")
    export_int8(fp32, again, images=IMAGES)
    with open(int8, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    other = str(tmp_path / "seed1.onnx")
    export_int8(fp32, other, images=IMAGES, seed=1)    # another calibration set: other scales
    with open(int8, "rb") as a, open(other, "rb") as b:
        assert a.read() != b.read()


def test_runtime_int8_close_to_fp32_and_bit_exact_across_chunking(int8_uncond):
    fp32, int8 = int8_uncond
    with bdm_runtime.load(fp32) as s:
        want = s.sample(6, seed=3)
        other = s.sample(6, seed=4)
    with bdm_runtime.load(int8, batch=6) as s:
        got = s.sample(6, seed=3)
    with bdm_runtime.load(int8, batch=4) as s:
        chunked = s.sample(6, seed=3)
    np.testing.assert_array_equal(got, chunked)        # the noise protocol holds at any chunking

    def rms(a, b):
        return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))

    err, between = rms(got, want), rms(other, want)
    print(f"int8 vs fp32 image rms {err:.4f}; fp32 seed 3 vs seed 4 {between:.4f}")
    # INT8 must draw the same images as FP32 from the same seed (deterministic DDIM, eta 0): much
    # closer than FP32's own images of another seed, the distance at which the model would have lost
    # the sample. Rounding each quantized activation by half a step (max|a| / 254) moves them ~0.08
    # rms on this barely trained model (x_hat at t = 1 amplifies eps errors by sigma/alpha), another
    # seed ~0.6; a wrong scale or a lost channel gives another image.
    assert 0 < err < 0.25 * between


def _altered(src, dst, change):
    m = onnx.load(src)
    meta = fmt.decode({p.key: p.value for p in m.metadata_props})
    change(meta)
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, fmt.encode(meta))
    onnx.save(m, dst)
    return dst


def test_runtime_validates_int8_metadata(int8_uncond, tmp_path):
    _, int8 = int8_uncond
    cases = [(lambda m: m.pop(fmt.K_CALIBRATION), "calibration record"),
             (lambda m: m[fmt.K_CALIBRATION].pop("method"), "method missing"),
             (lambda m: m[fmt.K_CALIBRATION].update(method="magic"), "bad bdm.int8_calibration"),
             (lambda m: m[fmt.K_CALIBRATION].update(images=0), "images"),
             (lambda m: m.update({fmt.K_PRECISION: "int4"}), "upgrade bdm")]
    for k, (change, words) in enumerate(cases):
        path = _altered(int8, str(tmp_path / f"bad{k}.onnx"), change)
        with pytest.raises(BdmError, match=words) as e:
            bdm_runtime.load(path)
        assert path in str(e.value)


def test_cli_int8_errors(tiny_checkpoint, uncond_graph_path, tmp_path, capsys):
    code, _, err = in_process(main, ["--onnx", uncond_graph_path, "--out", tmp_path / "x.plan", "--int8"], capsys)
    assert_one_line_error(code, err, "--int8", "--ckpt")
    code, _, err = in_process(main, ["--ckpt", tiny_checkpoint, "--int8", "--calib-method", "mean"], capsys)
    assert code != 0 and "mean" in err and "Traceback" not in err
    assert not os.listdir(tmp_path)


@pytest.fixture
def uncond_graph_path(int8_uncond):
    return int8_uncond[0]


def test_an_earlier_int8_graph_is_never_left_stale(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    _export(tiny_checkpoint, out, capsys)
    before = (out / "bdm_int8.onnx").read_bytes()
    code, _, err = in_process(main, ["--ckpt", tiny_checkpoint, "--out-dir", out, "--no-engine", "--steps", STEPS],
                              capsys)
    assert_one_line_error(code, err, str(out / "bdm_int8.onnx"), "add --int8")
    assert (out / "bdm_int8.onnx").read_bytes() == before


def test_openvino_runs_the_int8_graph(int8_uncond):
    """The same file on OpenVINO (i8 convolutions): the images ONNX Runtime draws from it, to far less than
    another seed's distance (FP32 hint: both compute the float layers in FP32, only kernels differ)."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the [openvino] extra)")
    _, int8 = int8_uncond
    with bdm_runtime.load(int8, backend="ort") as s:
        want, other = s.sample(6, seed=3), s.sample(6, seed=4)
    with bdm_runtime.load(int8, backend="openvino", precision="fp32") as s:
        got = s.sample(6, seed=3)
        assert "network i8" in s.provider
    err = float(np.sqrt(np.mean((got.astype(np.float64) - want) ** 2)))
    between = float(np.sqrt(np.mean((other.astype(np.float64) - want) ** 2)))
    print(f"openvino vs ort on int8: {err:.4f}; another seed {between:.4f}")
    assert err < 0.25 * between
