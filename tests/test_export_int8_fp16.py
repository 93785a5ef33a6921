"""INT8 in the FP16 graph (bdm_export.int8_fp16, ``bdm_int8_fp16.onnx``): the same quantization as bdm_int8.onnx,
the rest of the network float16, the update float32; checked layer by layer against float64."""
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import bdm_runtime
from bdm_export import read_metadata
from bdm_export.cli import main
from bdm_export.fp16 import F16, F32, value_types
from bdm_export.int8 import NETWORK
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from helpers import in_process
from test_export_cli import assert_one_line_error

STEPS, IMAGES = 4, 3
U = 2.0 ** -11    # float16's unit roundoff
TIE = 1e-6   # |x/scale - (k + 1/2)| below this: a rounding tie, where float32 and float64 may round apart


@pytest.fixture(scope="module")
def graphs(tiny_checkpoint, tmp_path_factory):
    """``{precision: path}`` of the unconditional tiny model's four graphs (ddim eta 0 by default)."""
    from bdm_export.int8 import export_int8
    from bdm_export.int8_fp16 import export_int8_fp16
    from bdm_export.onnx_export import export_onnx
    from bdm_train import checkpoint

    folder = tmp_path_factory.mktemp("int8_fp16")
    model, process, _ = checkpoint.load(tiny_checkpoint)
    paths = {p: str(folder / name) for p, (name, _) in fmt.EXPORT_FILES.items()}
    for precision in ("fp32", "fp16"):
        export_onnx(model, process, paths[precision], channels=1, default_steps=STEPS, default_eta=0.0,
                    fp16=precision == "fp16")
    export_int8(paths["fp32"], paths["int8"], images=IMAGES)
    meta = export_int8_fp16(paths["int8"], paths["fp16"], paths[fmt.INT8_FP16])
    assert meta[fmt.K_PRECISION] == fmt.INT8_FP16
    return dict(paths, process=process)


def _arrays(m):
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def _qdq_convs(m):
    """``{conv: (input Q, input DQ, weight DQ)}`` nodes of the Q/DQ convolutions of ``m`` (read here, not by
    the code under test)."""
    producer = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        w_dq = producer.get(n.input[1]) if n.op_type == "Conv" else None
        if w_dq is not None and w_dq.op_type == "DequantizeLinear":
            x_dq = producer[n.input[0]]
            out[n.name] = (producer[x_dq.input[0]], x_dq, w_dq)
    return out


def _network_ancestors(m):
    """Names of the nodes the network's output (the last ``/model/`` tensor) depends on: the network."""
    producer = {o: n for n in m.graph.node for o in n.output}
    last = [o for n in m.graph.node for o in n.output if o.startswith(NETWORK)][-1]
    seen, todo = set(), [last]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            todo += list(node.input)
    return seen


def test_graph_holds_int8_s_quantization_in_the_fp16_graph(graphs):
    m, m8 = onnx.load(graphs[fmt.INT8_FP16]), onnx.load(graphs["int8"])
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 19)]   # float16 Q/DQ scales need 19
    a, a8, a16 = _arrays(m), _arrays(m8), _arrays(onnx.load(graphs["fp16"]))
    types = value_types(m)
    nodes = {n.name: n for n in m.graph.node}
    convs, convs8 = _qdq_convs(m), _qdq_convs(m8)
    assert convs and set(convs) == set(convs8)                 # the same convolutions quantized
    for name, (q, x_dq, w_dq) in convs.items():
        q8, x_dq8, w_dq8 = convs8[name]
        assert q.input[1] == x_dq.input[1] and types[q.input[0]] == types[x_dq.output[0]] == F16, name
        for node, node8 in ((x_dq, x_dq8), (w_dq, w_dq8)):
            scale, zero = a[node.input[1]], a[node.input[2]]
            assert scale.dtype == np.float16 and zero.dtype == np.int8 and not zero.any(), name
            np.testing.assert_array_equal(scale, a8[node8.input[1]].astype(np.float16))  # int8's, rounded once
        assert a[w_dq.input[0]].dtype == np.int8
        assert a[w_dq.input[0]].tobytes() == a8[w_dq8.input[0]].tobytes(), name        # byte for byte
        assert all(n.name.startswith(NETWORK) for n in (q, x_dq, w_dq)), name
        bias = nodes[name].input[2]
        assert a[bias].dtype == np.float16 and a[bias].tobytes() == a16[bias].tobytes(), name  # the FP16 graph's
    # The float convolutions (first, last, skip) keep float16 weights; the update is untouched float32.
    kept = [n for n in m.graph.node if n.op_type == "Conv" and n.name not in convs]
    assert kept and all(a[n.input[1]].dtype == np.float16 for n in kept)
    network = _network_ancestors(m)
    update = [n for n in m.graph.node if n.name not in network]
    assert len(update) > 20 and any(n.op_type == "MatMul" for n in update)
    for n in update:
        assert n.op_type not in ("QuantizeLinear", "DequantizeLinear"), n.name
        assert all(types.get(o) != F16 for o in n.output), n.name
    assert all(v.type.tensor_type.elem_type in (F32, onnx.TensorProto.INT64) for v in m.graph.input)
    # Metadata: int8's calibration record, everything else as the two graphs it came from.
    meta, meta8, meta16 = (read_metadata(graphs[p]) for p in (fmt.INT8_FP16, "int8", "fp16"))
    assert meta[fmt.K_PRECISION] == "int8-fp16" and meta[fmt.K_CALIBRATION] == meta8[fmt.K_CALIBRATION]
    assert {k: v for k, v in meta.items() if k not in (fmt.K_PRECISION, fmt.K_CALIBRATION)} == \
        {k: v for k, v in meta16.items() if k != fmt.K_PRECISION}


def _run_with(path, names, feed):
    import onnxruntime as ort

    m = onnx.load(path)
    info = {v.name: v for v in m.graph.value_info}
    m.graph.output.extend(info[n] for n in names)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feed)))


def _conv64(x, w, b, node):
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    assert pads[:2] == pads[2:]
    t = [torch.from_numpy(np.asarray(v, np.float64)) for v in (x, w, b)]
    return torch.nn.functional.conv2d(*t, stride=list(attrs.get("strides", [1, 1])), padding=pads[:2],
                                      dilation=list(attrs.get("dilations", [1, 1])),
                                      groups=attrs.get("group", 1)).numpy()


def test_each_int8_convolution_against_float64(graphs):
    """Every Q/DQ convolution as ONNX Runtime runs it, against float64 from bdm_int8.onnx's own numbers.

    Not step outputs against bdm_int8.onnx's: INT8 rounding amplifies float16 rounding. Measured on the
    6,000-step DDPM shipped until issue 19, float16 moves 0.4% of the first quantized convolution's input
    codes by one step (relative change 2**-11 of values up to ~120 steps), the next convolution's input already by ~10%,
    and from the third on the two INT8 graphs differ by as much as INT8 differs from FP32 (their
    roundings are as good as independent). So each layer is checked on its own inputs: its INT8 codes are
    exactly ``round(x / scale)`` with bdm_int8.onnx's scale rounded to float16, and its output is the
    float64 convolution of the dequantized codes and bdm_int8.onnx's INT8 weights and scales (each
    dequantized value rounded to float16 once, as DequantizeLinear outputs it), to the float16 rounding of
    the result (``U |ref|``) plus the accumulation's: ONNX Runtime's CPU provider adds the ``K`` products
    in float16 where the CPU has AVX512-FP16 (in float32 elsewhere); Higham & Mary's probabilistic bound
    (SIAM J. Sci. Comput. 41, 2019) for a float16 sum of ``K`` terms is ``sqrt(K) U sum|terms|`` (measured
    here: at most ~15% of the bound; a wrong weight errs by ~|ref|, far above it). And per output channel
    the mean error, where rounding errors of either sign cancel, stays below ``U`` times the channel's rms
    sum of |terms| (what one correctly rounded output may err by); measured on that model at most
    0.18 of that, while a bias 0.01 off on one channel gave 5.8x and a 1% larger weight scale 2.0x it.
    """
    from bdm_export.check import make_inputs

    m, m8 = onnx.load(graphs[fmt.INT8_FP16]), onnx.load(graphs["int8"])
    a, a8, a16 = _arrays(m), _arrays(m8), _arrays(onnx.load(graphs["fp16"]))
    convs, convs8 = _qdq_convs(m), _qdq_convs(m8)
    nodes = {n.name: n for n in m.graph.node}
    names = [t for c, (q, _, _) in convs.items() for t in (q.input[0], q.output[0], nodes[c].output[0])]
    feed = make_inputs(read_metadata(graphs["fp32"]), graphs["process"], final=False, batch=2, seed=1)
    got = _run_with(graphs[fmt.INT8_FP16], list(dict.fromkeys(names)), feed)
    worst = drifts = 0.0
    for name, (q, _, _) in convs.items():
        _, x_dq8, w_dq8 = convs8[name]
        x, codes, y = got[q.input[0]], got[q.output[0]], got[nodes[name].output[0]]
        assert x.dtype == y.dtype == np.float16 and codes.dtype == np.int8, name
        scale = np.float64(a8[x_dq8.input[1]].astype(np.float16))
        ratio = x.astype(np.float64) / scale
        want = np.clip(np.rint(ratio), -128, 127)
        tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < TIE
        assert np.all((codes == want) | (tie & (np.abs(codes - want) <= 1))), name
        w = a8[w_dq8.input[0]].astype(np.float64) * a8[w_dq8.input[1]].astype(np.float16).reshape(-1, 1, 1, 1)
        x_dq = (codes * scale).astype(np.float16)      # DequantizeLinear's float16 outputs: one rounding each
        w = w.astype(np.float16)
        bias = a16[nodes[name].input[2]]
        ref = _conv64(x_dq, w, bias, nodes[name])
        size = _conv64(np.abs(x_dq), np.abs(w), np.abs(bias), nodes[name])
        err = np.abs(y.astype(np.float64) - ref)
        terms = w.shape[1] * w.shape[2] * w.shape[3] + 1            # products per output, and the bias
        assert np.all(err <= U * np.abs(ref) + np.sqrt(terms) * U * size + U * 2.0 ** -14), name
        # Rounding errors of either sign average out over a channel's outputs; a wrong bias or scale does not.
        drift = np.abs((y - ref).mean(axis=(0, 2, 3))) / (U * np.sqrt((size ** 2).mean(axis=(0, 2, 3))))
        assert np.all(drift <= 1), (name, drift.max())
        worst = max(worst, float((err / (np.sqrt(terms) * U * size + U * np.abs(ref))).max()))
        drifts = max(drifts, float(drift.max()))
    print(f"{len(convs)} INT8 convolutions: worst error {worst:.3f} of its bound, channel drift {drifts:.3f}")


def test_runtime_draws_the_int8_images_in_fp16(graphs):
    """Sampling: the images bdm_int8.onnx draws from the same seed, far closer than another seed's (deterministic
    DDIM, eta 0), and not bit-identical to them (the network really computes in float16)."""
    images = {}
    for p in ("fp32", "int8", fmt.INT8_FP16):
        with bdm_runtime.load(graphs[p], threads=1) as s:
            images[p] = s.sample(6, seed=3).astype(np.float64)
            if p == "fp32":
                other = s.sample(6, seed=4).astype(np.float64)
        assert s.info.precision == p

    def rms(x, y):
        return float(np.sqrt(np.mean((x - y) ** 2)))

    err, between = rms(images[fmt.INT8_FP16], images["int8"]), rms(other, images["fp32"])
    print(f"int8-fp16 vs int8 image rms {err:.4f}; int8 vs fp32 {rms(images['int8'], images['fp32']):.4f}; "
          f"fp32 seed 3 vs 4 {between:.4f}")
    assert 0 < err < 0.25 * between     # as test_export_int8's bound for INT8 against FP32
    assert not np.array_equal(images[fmt.INT8_FP16], images["fp32"])


def _edited(src, dst, change):
    m = onnx.load(src)
    change(m)
    onnx.save(m, dst)
    return dst


def test_graphs_of_two_models_are_refused(graphs, tmp_path):
    """Every quantized convolution of bdm_int8.onnx must be found in the FP16 graph, with its weights' shape,
    and the two graphs' metadata must agree: else one line naming the file, and nothing written."""
    from bdm_export.int8_fp16 import export_int8_fp16

    def rename(m):
        conv = next(n for n in m.graph.node if n.name in _qdq_convs(onnx.load(graphs["int8"])))
        conv.name = "/model/elsewhere/Conv"

    def restep(m):
        props = {p.key: p.value for p in m.metadata_props}
        props[fmt.K_DEFAULT_STEPS] = "7"
        del m.metadata_props[:]
        onnx.helper.set_model_props(m, props)

    out = str(tmp_path / "out.onnx")
    cases = [(graphs["int8"], _edited(graphs["fp16"], str(tmp_path / "renamed.onnx"), rename),
              "has no float16 convolution /model/"),
             (graphs["int8"], _edited(graphs["fp16"], str(tmp_path / "steps.onnx"), restep), "not of one export"),
             (graphs["fp32"], graphs["fp16"], "want an int8 and an fp16"),
             (graphs["int8"], graphs["fp32"], "want an int8 and an fp16")]
    for int8, fp16, words in cases:
        with pytest.raises(BdmError, match=words) as e:
            export_int8_fp16(int8, fp16, out)
        assert "\n" not in str(e.value)
    assert not os.path.exists(out)


def test_runtime_validates_int8_fp16_metadata(graphs, tmp_path):
    def drop(m):
        props = {p.key: p.value for p in m.metadata_props if p.key != fmt.K_CALIBRATION}
        del m.metadata_props[:]
        onnx.helper.set_model_props(m, props)

    path = _edited(graphs[fmt.INT8_FP16], str(tmp_path / "bad.onnx"), drop)
    with pytest.raises(BdmError, match="calibration record") as e:
        bdm_runtime.load(path)
    assert path in str(e.value)


def test_cli_writes_int8_fp16_with_int8_and_fp16_and_never_leaves_it_stale(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--ckpt", tiny_checkpoint, "--out-dir", out, "--no-engine", "--steps", STEPS, "--calib-images", IMAGES]
    code, stdout, err = in_process(main, args + ["--int8", "--fp16"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["bdm.onnx", "bdm_fp16.onnx", "bdm_int8.onnx", "bdm_int8_fp16.onnx"]
    assert f"wrote {out / 'bdm_int8_fp16.onnx'} (int8-fp16, 1x16x16, unconditional" in stdout
    assert read_metadata(out / "bdm_int8_fp16.onnx")[fmt.K_CALIBRATION]["images"] == IMAGES
    before = (out / "bdm_int8_fp16.onnx").read_bytes()
    code, _, err = in_process(main, args + ["--fp16"], capsys)      # graphs are named in writing order
    assert_one_line_error(code, err, str(out / "bdm_int8.onnx"), "add --int8 to replace it too")
    os.remove(out / "bdm_fp16.onnx")
    code, _, err = in_process(main, args + ["--int8"], capsys)     # would leave the INT8-FP16 graph of before
    assert_one_line_error(code, err, str(out / "bdm_int8_fp16.onnx"), "add --fp16 to replace it too")
    assert (out / "bdm_int8_fp16.onnx").read_bytes() == before


def test_openvino_runs_the_int8_fp16_graph(graphs):
    """The runtime takes the new precision on every backend: OpenVINO runs its Q/DQ convolutions in i8 and
    draws ONNX Runtime's images from the same file (same bound as test_export_int8's OpenVINO test)."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the [openvino] extra)")
    path = graphs[fmt.INT8_FP16]
    with bdm_runtime.load(path, backend="ort", threads=1) as s:
        want, other = s.sample(6, seed=3).astype(np.float64), s.sample(6, seed=4)
    with bdm_runtime.load(path, backend="openvino", precision="fp32", threads=1) as s:
        got = s.sample(6, seed=3)
        assert "network i8" in s.provider
    err = float(np.sqrt(np.mean((got - want) ** 2)))
    between = float(np.sqrt(np.mean((other - want) ** 2)))
    print(f"openvino vs ort on int8-fp16: {err:.4f}; another seed {between:.4f}")
    assert err < 0.25 * between
