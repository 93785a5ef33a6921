"""The torch-free runtime (``bdm_runtime.load`` / ``Sampler``) through ONNX Runtime on the CPU.

References are independent of the runtime: ``bdm_train.sampling.sample`` (the torch loop) for
parity, files written by the ``onnx`` package for the metadata reader, and the noise protocol's
own definition for determinism.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import export_mixture
import torch

import bdm_runtime
from bdm_runtime import format as fmt
from bdm_runtime import onnx_meta
from bdm_runtime.errors import BdmError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parity tolerance of the issue. The loop's only differences from the torch loop are kernel
# rounding (ORT vs torch, ~1e-7 relative per op), amplified by at most alpha_s/alpha_t on the
# final step; measured below ~1e-5, so 1e-3 leaves room without hiding a wrong step or draw.
PARITY_TOL = 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores
    yield
    torch.set_num_threads(n)


# -- models -----------------------------------------------------------------------------------------
def _export_checkpoint(ckpt, path, **kw):
    """Export a bdm_train checkpoint with ``bdm_export.export_onnx``; returns ``(model, process, config)``."""
    from bdm_train.checkpoint import load
    from bdm_export import export_onnx

    model, process, config = load(ckpt)
    s = config["sampler"]
    export_onnx(model, process, path, channels=model.in_channels, num_classes=model.num_classes,
                clip_denoised=s["clip_denoised"], default_steps=s["steps"], default_eta=s["eta"], **kw)
    return model, process, config


@pytest.fixture(scope="module")
def mixture_onnx(tmp_path_factory):
    """The exact mixture denoiser as a step graph: ``(path, model, process)``."""
    return export_mixture(tmp_path_factory.mktemp("mix"), default_steps=12)


@pytest.fixture(scope="module")
def unet_onnx(tiny_checkpoint, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("unet") / "bdm.onnx")
    model, process, config = _export_checkpoint(tiny_checkpoint, path)
    return path, model, process


@pytest.fixture(scope="module")
def cond_onnx(tiny_cond_checkpoint, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cond") / "bdm_cond.onnx")
    model, process, config = _export_checkpoint(tiny_cond_checkpoint, path)  # with the guided branch
    return path, model, process


# -- the metadata reader -----------------------------------------------------------------------------
def _toy_model(props=None, n_weights=3):
    """A small valid ONNX model (MatMul chain with weights), written by the onnx package."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes, inits, prev = [], [], "z"
    for i in range(n_weights):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["out"]))
    graph = helper.make_graph(nodes, "toy",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 4]),
                               helper.make_tensor_value_info("t", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if props:
        helper.set_model_props(model, props)
    return model


def test_onnx_meta_reads_what_the_onnx_package_wrote(tmp_path):
    props = {"bdm.format_version": "1", "bdm.image_shape": "[3, 16, 16]", "note": "ünïcode ✓", "empty": ""}
    path = tmp_path / "toy.onnx"
    onnx.save(_toy_model(props, n_weights=5), str(path))
    info = onnx_meta.read(path)
    assert info.metadata == props
    assert info.metadata == {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert info.inputs == ["z", "t"] and info.outputs == ["out"]
    assert info.ir_version == onnx.load(str(path)).ir_version
    onnx.save(_toy_model(None), str(path))
    assert onnx_meta.read(path).metadata == {}


def test_onnx_meta_skips_every_wire_type():
    # Unknown top-level fields of each wire type (varint, fixed64, fixed32, bytes) around the real ones.
    real = _toy_model({"k": "v"}).SerializeToString()
    extra = bytes([(90 << 3 | 0) & 0x7F | 0x80, 90 >> 4, 0x96, 0x01])          # field 90 varint 150
    extra += bytes([(91 << 3 | 1) & 0x7F | 0x80, 91 >> 4]) + b"\x01" * 8        # field 91 fixed64
    extra += bytes([(92 << 3 | 5) & 0x7F | 0x80, 92 >> 4]) + b"\x02" * 4        # field 92 fixed32
    extra += bytes([(93 << 3 | 2) & 0x7F | 0x80, 93 >> 4, 3]) + b"abc"          # field 93 bytes
    info = onnx_meta.parse(extra + real + extra)
    assert info.metadata == {"k": "v"} and info.inputs == ["z", "t"]
    assert onnx.load_from_string(extra + real).metadata_props[0].key == "k"  # protobuf agrees it is valid


def test_onnx_meta_refuses_non_onnx(tmp_path):
    cases = {"random.onnx": np.random.default_rng(0).bytes(4096), "empty.onnx": b"",
             "text.onnx": b"hello, this is not a model\n",
             "truncated.onnx": _toy_model({"k": "v"}).SerializeToString()[:-7]}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BdmError, match=name):
            onnx_meta.read(path)
    with pytest.raises(BdmError, match="no such file"):
        onnx_meta.read(tmp_path / "missing.onnx")


def test_onnx_meta_on_an_exported_graph(mixture_onnx):
    path = mixture_onnx[0]
    info = onnx_meta.read(path)
    proto = onnx.load(path)
    assert info.metadata == {p.key: p.value for p in proto.metadata_props}
    assert info.inputs == [i.name for i in proto.graph.input] == fmt.inputs(fmt.FORMAT_VERSION)
    assert info.outputs == fmt.outputs(fmt.FORMAT_VERSION)


# -- load: refusals name the file --------------------------------------------------------------------
def _with_meta(src, dst, **changes):
    proto = onnx.load(src)
    props = {p.key: p.value for p in proto.metadata_props}
    for k, v in changes.items():
        key = "bdm." + k
        if v is None:
            props.pop(key)
        else:
            props[key] = v
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, dst)
    return dst


def test_load_refuses_what_it_cannot_run(mixture_onnx, tmp_path):
    src = mixture_onnx[0]
    plain = str(tmp_path / "plain.onnx")
    onnx.save(_toy_model(), plain)
    cases = [
        (plain, "not a bdm step graph"),
        (_with_meta(src, str(tmp_path / "v3.onnx"), format_version="3"), "format version 3"),
        (_with_meta(src, str(tmp_path / "v1.onnx"), format_version="1"), "inputs"),   # state inputs of format 2
        (_with_meta(src, str(tmp_path / "solver.onnx"), default_solver='"heun"'), "default_solver"),
        (_with_meta(src, str(tmp_path / "grid.onnx"), default_grid='"cosine"'), "default_grid"),
        (_with_meta(src, str(tmp_path / "nogrid.onnx"), default_grid=None), "bdm.default_grid"),
        (_with_meta(src, str(tmp_path / "eta.onnx"), default_solver='"dpmpp2m"', default_eta="1.5"), "eta"),
        (_with_meta(src, str(tmp_path / "noshape.onnx"), image_shape=None), "bdm.image_shape"),
        (_with_meta(src, str(tmp_path / "badshape.onnx"), image_shape="[1, 8]"), "image_shape"),
        (_with_meta(src, str(tmp_path / "cond.onnx"), num_classes="3"), "inputs"),
        (_with_meta(src, str(tmp_path / "json.onnx"), process="{not json"), "metadata"),
        (str(tmp_path / "missing.onnx"), "no such file"),
        (str(tmp_path), "directory"),
    ]
    for path, what in cases:
        with pytest.raises(BdmError) as e:
            bdm_runtime.load(path)
        assert what in str(e.value) and os.path.basename(path) in str(e.value)
    with pytest.raises(BdmError, match="backend"):
        bdm_runtime.load(src, backend="cuda")


def test_plan_refusals(tmp_path, mixture_onnx):
    plan = tmp_path / "random.plan"
    plan.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(BdmError, match="random.plan.json is missing"):
        bdm_runtime.load(plan)
    with pytest.raises(BdmError, match="--backend trt"):
        bdm_runtime.load(plan, backend="ort")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        # A well-formed side file gets as far as TensorRT, which is absent here: say what to use.
        meta = onnx_meta.read(mixture_onnx[0]).metadata
        side = {k: json.loads(v) for k, v in meta.items()}
        side.update({fmt.K_TRT_VERSION: "10.0.0", fmt.K_PROFILE: {"min": 1, "opt": 4, "max": 8}})
        (tmp_path / "random.plan.json").write_text(json.dumps(side))
        with pytest.raises(BdmError, match="--backend ort"):
            bdm_runtime.load(plan)
        with pytest.raises(BdmError, match="--backend ort"):
            bdm_runtime.load(mixture_onnx[0], backend="trt")


# -- parity with the torch loop ----------------------------------------------------------------------
def _parity(path, model, process, n, steps, **kw):
    from bdm_train.sampling import sample

    with bdm_runtime.load(path) as s:
        got = s.sample(n, seed=11, steps=steps, **kw)
    ref = sample(model, process, n, seed=11, steps=steps, channels=s.image_shape[0], **kw).numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_parity_mixture(mixture_onnx, eta):
    path, model, process = mixture_onnx
    assert _parity(path, model, process, 6, 10, eta=eta) < PARITY_TOL


@pytest.mark.parametrize("eta,solver,grid", [(0.0, "ddim", "uniform"), (1.0, "ddim", "uniform"),
                                             (None, "dpmpp2m", "spectral"), (None, "dpmpp2m", "power")])
def test_parity_trained_checkpoint(unet_onnx, eta, solver, grid):
    path, model, process = unet_onnx
    err = _parity(path, model, process, 4, 8, eta=eta, solver=solver, grid=grid)
    print(f"parity {solver} eta={eta} {grid}: max abs err {err:.3g}")
    assert err < PARITY_TOL


@pytest.mark.parametrize("eta,labels,guidance", [(0.0, [0, 1, 2, 1], 0.0), (1.0, [2, 0, 1, 0], 2.0),
                                                 (1.0, None, 0.0)])
def test_parity_conditional(cond_onnx, eta, labels, guidance):
    path, model, process = cond_onnx
    err = _parity(path, model, process, 4, 6, eta=eta, labels=labels, guidance=guidance)
    print(f"parity conditional eta={eta} guidance={guidance}: max abs err {err:.3g}")
    # B12 combines two network evaluations as (1 + w) eps_c - w eps_u: their independent rounding
    # differences (ORT vs torch) add up to (1 + 2w) times one branch's (measured 1.3e-3 at w = 2).
    assert err < PARITY_TOL * (1 + 2 * guidance)


def test_guidance_changes_the_images(cond_onnx):
    # Guarding the parity test above: w really reaches the graph (else w=0 and w=3 would coincide).
    with bdm_runtime.load(cond_onnx[0]) as s:
        a = s.sample(3, seed=2, steps=4, eta=0.0, labels=[0, 1, 2], guidance=0.0)
        b = s.sample(3, seed=2, steps=4, eta=0.0, labels=[0, 1, 2], guidance=3.0)
    assert np.abs(a - b).max() > 1e-3


# -- determinism ---------------------------------------------------------------------------------------
def test_determinism_and_chunking(mixture_onnx):
    path = mixture_onnx[0]
    with bdm_runtime.load(path) as s:
        a = s.sample(7, seed=5, steps=6, eta=1.0)
        b = s.sample(7, seed=5, steps=6, eta=1.0)
        assert np.array_equal(a, b)                               # same seed twice: identical
        assert not np.array_equal(a, s.sample(7, seed=6, steps=6, eta=1.0))
        head = s.sample(3, seed=5, steps=6, eta=1.0)
        tail = s.sample(4, seed=5, steps=6, eta=1.0, first_index=3)
    with bdm_runtime.load(path, batch=2) as s2:                        # chunks of 2, 2, 2, 1
        assert s2.batch == 2
        chunked = s2.sample(7, seed=5, steps=6, eta=1.0)
    # Chunks and first_index splits draw exactly the same noise per image (bdm_runtime.noise); ORT's
    # CPU kernels may round differently at another batch size (seen: 1 ulp, 1.2e-7), hence 1e-6.
    np.testing.assert_allclose(chunked, a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([head, tail]), a, rtol=0, atol=1e-6)


def test_threads_reach_the_session(mixture_onnx):
    """``threads`` sets ONNX Runtime's intra-op threads; the images do not depend on it."""
    path = mixture_onnx[0]
    with bdm_runtime.load(path, threads=1) as one, bdm_runtime.load(path, threads=2) as two:
        assert one._backend.session.get_session_options().intra_op_num_threads == 1
        assert two._backend.session.get_session_options().intra_op_num_threads == 2
        # one thread vs two only reorders float32 sums inside kernels (~1 ulp)
        np.testing.assert_allclose(one.sample(3, seed=1, steps=4), two.sample(3, seed=1, steps=4), atol=1e-6)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BdmError, match="threads"):
            bdm_runtime.load(path, threads=bad)


def test_defaults_come_from_the_metadata(mixture_onnx):
    with bdm_runtime.load(mixture_onnx[0]) as s:
        assert s.info.default_steps == 12 and s.info.default_eta == 1.0
        assert np.array_equal(s.sample(2, seed=1), s.sample(2, seed=1, steps=12, eta=1.0))
        assert s.image_shape == (1, 8, 8) and s.num_classes == 0
        assert s.backend == "ort" and s.provider == "CPUExecutionProvider" and s.device == "cpu"
        assert np.array_equal(s.sample(2, seed=1, guidance=0.0), s.sample(2, seed=1))  # w = 0: no-op


def test_out_arrays_and_generate(mixture_onnx):
    with bdm_runtime.load(mixture_onnx[0]) as s:
        ref = s.sample(3, seed=4, steps=5)
        buf = np.full((3, 1, 8, 8), 7.0, dtype=np.float32)
        assert s.sample(3, seed=4, steps=5, out=buf) is buf
        assert np.array_equal(buf, ref) and buf.min() >= -1 and buf.max() <= 1
        img = np.zeros((3, 8, 8, 1), dtype=np.uint8)
        assert s.generate(3, seed=4, steps=5, out=img) is img
        assert np.array_equal(img, np.clip((ref.transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8))
        for bad in (np.zeros((3, 1, 8, 8), np.float64), np.zeros((2, 1, 8, 8), np.float32), [0.0]):
            with pytest.raises(BdmError, match="out"):
                s.sample(3, seed=4, steps=5, out=bad)


def test_progress_callback(mixture_onnx):
    seen = []
    with bdm_runtime.load(mixture_onnx[0], batch=2) as s:
        s.sample(3, steps=4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 8) for k in range(1, 9)]  # 4 steps x 2 chunks


def test_bad_arguments(mixture_onnx):
    with bdm_runtime.load(mixture_onnx[0]) as s:
        for kw, what in [({"n": 0}, "n must"), ({"n": -2}, "n must"), ({"n": 2.5}, "n must"),
                         ({"steps": 0}, "steps"), ({"eta": 2.0}, "eta"), ({"eta": -0.1}, "eta"),
                         ({"eta": float("nan")}, "eta"), ({"seed": -1}, "seed"), ({"first_index": -3}, "first_index"),
                         ({"labels": [1]}, "unconditional"), ({"guidance": 1.0}, "conditional")]:
            args = {"n": 2, "steps": 2}
            args.update(kw)
            with pytest.raises(BdmError, match=what):
                s.sample(**args)


def test_bad_labels_and_guidance(cond_onnx, tmp_path):
    path, model, process = cond_onnx
    k = model.num_classes
    with bdm_runtime.load(path) as s:
        assert s.num_classes == k and s.info.guided
        for labels in ([k + 1], [-1], [0, 1], "x", 1.5, [0.5, 1, 2]):
            with pytest.raises(BdmError, match="label"):
                s.sample(3, steps=2, labels=labels)
        # labels=None is the null label k: the same images as asking for it explicitly.
        assert np.array_equal(s.sample(2, steps=2, eta=0.0), s.sample(2, steps=2, eta=0.0, labels=[k, k]))
    plain = str(tmp_path / "noguide.onnx")
    _export_checkpoint_model(model, process, plain, guidance=False)
    with bdm_runtime.load(plain) as s:
        assert not s.info.guided
        s.sample(1, steps=2, labels=[0], guidance=0.0)  # w = 0 needs no guided branch
        with pytest.raises(BdmError, match="guid"):
            s.sample(1, steps=2, labels=[0], guidance=1.5)


def _export_checkpoint_model(model, process, path, **kw):
    from bdm_export import export_onnx

    export_onnx(model, process, path, channels=model.in_channels, num_classes=model.num_classes, **kw)


def test_close_and_context_manager(mixture_onnx):
    s = bdm_runtime.load(mixture_onnx[0])
    with s as same:
        assert same is s
        s.sample(1, steps=1)
    with pytest.raises(BdmError, match="closed"):
        s.sample(1, steps=1)
    s.close()  # idempotent
    assert "closed" in repr(s)


# -- shared argument rules --------------------------------------------------------------------------
def test_normalize_labels_is_strict():
    from bdm_runtime.labels import normalize_labels

    assert normalize_labels(None, 3, 0) is None
    assert normalize_labels(None, 3, 5).tolist() == [5, 5, 5]          # the null label
    assert normalize_labels(2, 3, 5).tolist() == [2, 2, 2]             # one label for all
    assert normalize_labels(np.array([1.0, 5.0]), 2, 5).tolist() == [1, 5]  # whole floats are labels
    out = normalize_labels([0, 4, 1], 3, 5)
    assert out.dtype == np.int64 and out.tolist() == [0, 4, 1]
    for labels, n, k, what in [(1.5, 2, 5, "integers"), ([0, 1.5], 2, 5, "integers"), (float("inf"), 1, 5, "integers"),
                               (["a"], 1, 5, "integers"), ([True], 1, 5, "integers"), ([0, 1], 3, 5, "n=3"),
                               ([6], 1, 5, "0..4"), ([-1], 1, 5, "0..4"), ([0], 1, 0, "unconditional")]:
        with pytest.raises(ValueError, match=what):
            normalize_labels(labels, n, k)
    with pytest.raises(BdmError):
        normalize_labels(1.5, 1, 5, BdmError)


def test_parse_labels():
    from bdm_runtime.labels import parse_labels

    assert parse_labels(None) is None
    assert parse_labels("3") == [3] and parse_labels(" 0, 1,2 ") == [0, 1, 2]
    for bad in ("1.5", "a", "", ",", "1;2"):
        with pytest.raises(BdmError, match="--label"):
            parse_labels(bad)


def test_check_positive_int():
    from bdm_runtime.noise import check_positive_int

    assert check_positive_int(3, "n") == 3 and check_positive_int(np.int64(2), "n") == 2
    for bad in (0, -1, 2.0, True, np.bool_(True), "3", None):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            check_positive_int(bad, "n")
    with pytest.raises(BdmError, match="steps"):
        check_positive_int(0, "steps", BdmError)


def _run_cli_error(exc, capsys):
    """``(exit status, stderr)`` of ``run_cli`` on a command that raises ``exc``."""
    import click

    from bdm_runtime.errors import run_cli

    @click.command()
    def cmd():
        raise exc

    with pytest.raises(SystemExit) as e:
        run_cli(cmd, [], prog_name="x")
    return e.value.code, capsys.readouterr().err


def test_run_cli_maps_missing_modules_and_os_errors(capsys, tmp_path):
    import errno

    code, err = _run_cli_error(ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"), capsys)
    assert code == 1 and err.startswith("Error: missing dependency onnxruntime: pip install onnxruntime")
    code, err = _run_cli_error(ModuleNotFoundError("No module named 'PIL'", name="PIL"), capsys)
    assert err.strip() == "Error: missing dependency PIL: pip install Pillow"
    code, err = _run_cli_error(ImportError("cannot import name 'X' from 'polygraphy.comparator'",
                                           name="polygraphy.comparator"), capsys)
    assert code == 1 and "pip install -U polygraphy" in err and len(err.strip().splitlines()) == 1
    path = str(tmp_path / "x.npz")
    code, err = _run_cli_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path), capsys)
    assert code == 1 and err.strip() == f"Error: {path}: {os.strerror(errno.ENOSPC)}"
    with pytest.raises(ModuleNotFoundError):  # bdm's own modules missing: a bug, with its traceback
        _run_cli_error(ModuleNotFoundError("No module named 'bdm_runtime.nope'", name="bdm_runtime.nope"), capsys)


def test_run_cli_turns_only_user_errors_into_one_line(capsys):
    """``BdmError`` (a ``ValueError``) is one line; any other ``ValueError`` is a bug and keeps its traceback."""
    assert issubclass(BdmError, ValueError)
    code, err = _run_cli_error(BdmError("x.onnx: not a bdm step graph"), capsys)
    assert code == 1 and err == "Error: x.onnx: not a bdm step graph\n"
    for bug in (ValueError("operands could not be broadcast together"), TypeError("'NoneType' object"),
                KeyError("bdm.image_shape")):
        with pytest.raises(type(bug)):
            _run_cli_error(bug, capsys)


# -- TensorRT helpers that need no TensorRT ----------------------------------------------------------
def test_trt_version_refuses_before_8_5():
    from types import SimpleNamespace

    from bdm_runtime.backends.trt import trt_version

    assert trt_version(SimpleNamespace(__version__="8.5.2.2")) == (8, 5)
    assert trt_version(SimpleNamespace(__version__="10.13.0.35")) == (10, 13)
    for old in ("8.4.3.1", "7.2.3", "garbage"):
        with pytest.raises(BdmError):
            trt_version(SimpleNamespace(__version__=old))


def test_engine_cache_key_includes_the_profile_and_the_gpu(tmp_path):
    from bdm_runtime.backends.trt import device_tag
    from bdm_runtime.trt_build import _is_current

    orin = {"name": "NVIDIA Orin", "compute_capability": [8, 7]}
    onnx_path, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    onnx_path.write_bytes(b"x")
    plan.write_bytes(b"y")
    side = {fmt.K_TRT_VERSION: "10.0.1", fmt.K_PROFILE: {"min": 1, "opt": 4, "max": 4}, fmt.K_TRT_DEVICE: orin}
    (tmp_path / "m.plan.json").write_text(json.dumps(side))
    os.utime(onnx_path, (1, 1))
    assert _is_current(str(plan), str(onnx_path), "10.0.1", (1, 4, 4), orin)
    assert not _is_current(str(plan), str(onnx_path), "10.0.1", (1, 8, 8), orin)   # another batch profile
    assert not _is_current(str(plan), str(onnx_path), "10.3.0", (1, 4, 4), orin)   # another TensorRT
    for other in ({"name": "NVIDIA Orin", "compute_capability": [8, 6]},
                  {"name": "Orin (nvgpu)", "compute_capability": [8, 7]}):
        assert not _is_current(str(plan), str(onnx_path), "10.0.1", (1, 4, 4), other)  # another GPU
    os.utime(onnx_path, None)
    os.utime(plan, (1, 1))
    assert not _is_current(str(plan), str(onnx_path), "10.0.1", (1, 4, 4), orin)   # older than the .onnx
    os.utime(plan, None)
    (tmp_path / "m.plan.json").write_text("{not json")
    assert not _is_current(str(plan), str(onnx_path), "10.0.1", (1, 4, 4), orin)   # unreadable side file
    assert device_tag(orin) == "nvidia-orin-sm87"
    assert device_tag({"name": " Tesla T4 (PCIe) ", "compute_capability": [7, 5]}) == "tesla-t4-pcie-sm75"


# -- Python 3.8 ------------------------------------------------------------------------------------
def test_runtime_is_python38_compatible(tmp_path):
    pytest.importorskip("vermin")
    # JetPack 5 ships Python 3.8; no 3.8 interpreter can be installed here, so vermin checks the syntax
    # and standard-library use of runtime/ (and the torch-free engine builder) against a 3.8 target.
    # --eval-annotations: annotations are evaluated at definition time on 3.8 (no PEP 563 default).
    targets = ["runtime/"]  # the engine builder, runtime/trt_build.py, included
    vermin = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "-t=3.8-", "--no-tips", "--violations", "--eval-annotations"]
    proc = subprocess.run(vermin + targets, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The check bites: 3.9/3.10 constructs in a scratch file are reported.
    probe = tmp_path / "probe.py"
    probe.write_text("def f(x):\n    match x:\n        case _:\n            return 'a'.removeprefix('b')\n")
    bad = subprocess.run(vermin + [str(probe)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "removeprefix" in bad.stdout
