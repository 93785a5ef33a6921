"""TensorRT engines from step graphs (bdm_runtime.trt_build): run where TensorRT and an NVIDIA GPU exist.

Per TensorRT major version the builder takes a different path (8/9: FP16 flag + "prefer"
precision constraints pinned from the graph's types; 10: STRONGLY_TYPED; 11: always strongly
typed); ``test_trt_fake.py`` checks the path's API calls per version on the CPU. These tests check
the result, whatever the path: the engine's interface, its metadata side file, that an FP16 graph
gives an engine with FP16 layers and an FP32 graph one without, that every tensor the graph keeps
float32 (update, DCTs, GroupNorm statistics, time embedding) is FP32 in the engine (engine
inspector, per layer), and that engines agree with ONNX Runtime and torch on realistic inputs
(also through ``check_onnx``).
"""
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU machines with TensorRT only)")

from bdm_runtime.trt_build import build_engine, unavailable_reason  # noqa: E402

_reason = unavailable_reason()
if _reason:
    pytest.skip(f"cannot build TensorRT engines here: {_reason}", allow_module_level=True)

from bdm_train import checkpoint  # noqa: E402
from bdm_export import export_onnx  # noqa: E402
from bdm_export.check import check_onnx, make_inputs  # noqa: E402
from bdm_export.cli import main  # noqa: E402
from bdm_export.fp16 import relative_error  # noqa: E402
from bdm_runtime import format as fmt  # noqa: E402
from bdm_runtime import onnx_meta  # noqa: E402
from test_export import session  # noqa: E402

BATCH = (1, 4, 8)


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tiny_cond_checkpoint, tmp_path_factory):
    """FP32 and FP16 engines of the unconditional graph and an FP16 engine of the guided one."""
    folder = tmp_path_factory.mktemp("trt")
    cache = folder / "timing.cache"
    out = {}
    for name, ckpt, half in (("fp32", tiny_checkpoint, False), ("fp16", tiny_checkpoint, True),
                             ("guided16", tiny_cond_checkpoint, True)):
        model, process, _ = checkpoint.load(ckpt)
        onnx_path = folder / f"{name}.onnx"
        export_onnx(model, process, onnx_path, channels=1, num_classes=model.num_classes, fp16=half)
        plan = folder / f"{name}.plan"
        side = build_engine(str(onnx_path), str(plan), batch=BATCH, workspace_mib=512, timing_cache=str(cache))
        out[name] = dict(model=model, process=process, onnx=onnx_path, plan=plan, side=side)
    assert cache.exists()
    return out


def _engine(plan):
    """Deserialized as the runtime does (Polygraphy's logger; EngineFromBytes registers the plugins)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes

    return EngineFromBytes(BytesFromPath(str(plan)))()


def _layer_info(engine):
    """The engine inspector's JSON (Polygraphy builds with ProfilingVerbosity.DETAILED), with every
    input at its profile's optimum shape, so that tensor formats are concrete, not "N/A due to
    dynamic shapes"."""
    context = engine.create_execution_context()
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = tuple(engine.get_tensor_shape(name))
            if -1 in shape:
                shape = tuple(engine.get_tensor_profile_shape(name, 0)[1])
            assert context.set_input_shape(name, shape), name
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def _tensor_kinds(info):
    """``{tensor name: {"half" | "float" | other format}}`` from the inspector's per-layer inputs and outputs."""
    kinds = {}
    for layer in json.loads(info)["Layers"]:
        for t in (layer.get("Inputs", []) + layer.get("Outputs", [])) if isinstance(layer, dict) else []:
            f = str(t.get("Format/Datatype", "")).lower()
            kind = "half" if ("fp16" in f or "half" in f) else "float" if ("fp32" in f or "float" in f) else f
            kinds.setdefault(t.get("Name"), set()).add(kind)
    return kinds


def test_engines_and_side_files(built):
    for name, b in built.items():
        side = json.loads(open(str(b["plan"]) + ".json").read())
        assert side == b["side"]
        assert set(side) == set(fmt.REQUIRED_KEYS) | {fmt.K_TRT_VERSION, fmt.K_PROFILE, fmt.K_TRT_DEVICE}
        assert side[fmt.K_TRT_VERSION] == trt.__version__
        device = side[fmt.K_TRT_DEVICE]
        assert device["name"] and len(device["compute_capability"]) == 2
        assert side[fmt.K_PROFILE] == {"min": 1, "opt": 4, "max": 8}
        engine = _engine(b["plan"])
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = list(fmt.INPUTS) + ([fmt.LABEL, fmt.GUIDANCE] if name == "guided16" else []) + list(fmt.OUTPUTS)
        assert sorted(names) == sorted(want)
        for n in (fmt.Z, fmt.NOISE, fmt.Z_NEXT, fmt.X0, fmt.T, fmt.S, fmt.ETA):
            assert engine.get_tensor_dtype(n) == trt.float32, (name, n)
        lo, _, hi = engine.get_tensor_profile_shape(fmt.Z, 0)
        assert tuple(lo) == (1, 1, 16, 16) and tuple(hi) == (8, 1, 16, 16)  # images, not internal batch


def test_precision_follows_the_graph(built):
    """FP16 graph -> FP16 layers (not a silent FP32 engine); FP32 graph -> none (TF32 off too)."""
    info = {name: _layer_info(_engine(b["plan"])).lower() for name, b in built.items()}
    print(f"\nTensorRT {trt.__version__}")
    assert "half" in info["fp16"] or "fp16" in info["fp16"]
    assert "half" in info["guided16"] or "fp16" in info["guided16"]
    assert "half" not in info["fp32"] and "fp16" not in info["fp32"]


def test_float32_islands_stay_float32(built):
    """FP16 engines: every tensor the graph types float32 is FP32 in the engine (per layer, both sides).

    On TensorRT 8.x the builder only *prefers* the pinned precisions ("obey" aborts builds where a
    layer has no FP16 kernel); this checks that the preference held for the update, the DCTs and
    the GroupNorm statistics. On 10/11 strong typing guarantees it.
    """
    for name in ("fp16", "guided16"):
        b = built[name]
        types = onnx_meta.value_types(str(b["onnx"]))
        kinds = _tensor_kinds(_layer_info(_engine(b["plan"])))
        floats = {n: k for n, k in kinds.items() if types.get(n) == 1}  # onnx.TensorProto.FLOAT
        print(f"\n{name}: {len(floats)} float32 graph tensors named in the engine, "
              f"{sum('half' in k for k in kinds.values())} FP16 tensors")
        assert len(floats) >= 5, sorted(kinds)[:20]
        assert not [n for n, k in floats.items() if "half" in k]
        assert any("half" in k for k in kinds.values())


def _trt_run(plan, feed):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan)))) as runner:
        types = runner.get_input_metadata()  # NumPy dtypes (Polygraphy's default)
        # TensorRT < 10 turns the int64 label input into int32.
        feed = {k: np.ascontiguousarray(v.astype(types[k].dtype)) for k, v in feed.items()}
        out = runner.infer(feed)
        return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("batch", [1, 5])
def test_engines_match_onnxruntime(built, batch):
    # FP32 engine vs ORT: TF32 is off, so ~1e-6 like ORT vs torch; bound 1e-3. FP16 engines vs the
    # same FP16 graph in ORT (FP32 compute between float16 casts): the --check tolerance, 3e-2.
    for name, b in built.items():
        meta = dict(b["side"])
        meta[fmt.K_DEFAULT_STEPS] = 50
        bound = 1e-3 if name == "fp32" else 3e-2
        sess = session(b["onnx"])
        for final in (False, True):
            feed = make_inputs(meta, b["process"], final=final, batch=batch, seed=batch)
            want = dict(zip([fmt.Z_NEXT, fmt.X0], sess.run([fmt.Z_NEXT, fmt.X0], feed)))
            got = _trt_run(b["plan"], feed)
            err = relative_error(got[fmt.Z_NEXT], want[fmt.Z_NEXT])
            print(f"\n{name} engine vs ORT, batch {batch}, {'last' if final else 'trajectory'} step: z_next {err:.2e}")
            assert err < bound
            if final:
                assert relative_error(got[fmt.X0], want[fmt.X0]) < bound


def test_check_with_tensorrt(built):
    for name, b in built.items():
        lines = []
        assert check_onnx(b["onnx"], b["model"], b["process"], plan_path=b["plan"], log=lines.append), lines
        assert any("tensorrt vs torch" in line for line in lines)
        print("\n" + "\n".join(lines))


def test_cli_builds_engines(tiny_cond_checkpoint, tmp_path, capsys):
    try:
        main(["--ckpt", str(tiny_cond_checkpoint), "--out-dir", str(tmp_path), "--fp16", "--batch", "1:2:4",
              "--timing-cache", str(tmp_path / "cache")])
    except SystemExit as e:
        pytest.fail(f"bdm-export exited {e.code}: {capsys.readouterr().err}")
    out = capsys.readouterr().out
    for stem in ("bdm", "bdm_fp16"):
        assert os.path.exists(tmp_path / f"{stem}.plan") and os.path.exists(tmp_path / f"{stem}.plan.json")
        assert f"wrote {tmp_path / stem}.plan" in out


@pytest.fixture(scope="module")
def built_int8(tiny_checkpoint, tmp_path_factory):
    """An INT8 (Q/DQ) graph of the unconditional tiny model and its engine."""
    from bdm_export.int8 import export_int8

    folder = tmp_path_factory.mktemp("trt_int8")
    model, process, _ = checkpoint.load(tiny_checkpoint)
    fp32 = folder / "bdm.onnx"
    export_onnx(model, process, fp32, channels=1, default_steps=4)
    onnx_path = folder / "bdm_int8.onnx"
    export_int8(str(fp32), str(onnx_path), images=3)
    plan = folder / "bdm_int8.plan"
    side = build_engine(str(onnx_path), str(plan), batch=BATCH, workspace_mib=512)
    return dict(model=model, process=process, onnx=onnx_path, plan=plan, side=side)


def test_int8_engine_has_int8_layers_and_an_fp32_update(built_int8):
    """The Q/DQ convolutions run in INT8 (not a silently float engine); the sampler update stays FP32
    on every version (8.x: pinned; 10/11: strongly typed from the graph's FP32)."""
    b = built_int8
    assert b["side"][fmt.K_PRECISION] == "int8" and b["side"][fmt.K_CALIBRATION]["quantized"] > 0
    info = _layer_info(_engine(b["plan"]))
    print(f"\nTensorRT {trt.__version__}")
    assert "int8" in info.lower()
    kinds = _tensor_kinds(info)
    for name in (fmt.Z_NEXT, fmt.X0):
        assert kinds.get(name, {"float"}) <= {"float"}, (name, kinds.get(name))


@pytest.mark.parametrize("batch", [1, 5])
def test_int8_engine_matches_onnxruntime_int8(built_int8, batch):
    # Same Q/DQ graph, same scales: TensorRT and ONNX Runtime differ in where they requantize and in
    # rounding ties, an INT8 step (1/127 of a tensor's range) at some elements of the network's output,
    # which z_next (dominated by z) carries at ~1e-3 of its scale; bound as the FP16 engines, 3e-2.
    b = built_int8
    meta = dict(b["side"])
    meta[fmt.K_DEFAULT_STEPS] = 50
    sess = session(b["onnx"])
    feed = make_inputs(meta, b["process"], final=False, batch=batch, seed=batch)
    want = sess.run([fmt.Z_NEXT], feed)[0]
    got = _trt_run(b["plan"], feed)[fmt.Z_NEXT]
    err = relative_error(got, want)
    print(f"\nint8 engine vs ORT int8, batch {batch}: z_next {err:.2e}")
    assert err < 3e-2


@pytest.fixture(scope="module")
def int8_fp16_graph(built_int8, tmp_path_factory):
    """``bdm_int8_fp16.onnx`` of the same model and calibration as ``built_int8`` (``bdm_export.int8_fp16``)."""
    from bdm_export.int8_fp16 import export_int8_fp16

    b = built_int8
    folder = tmp_path_factory.mktemp("trt_int8_fp16")
    fp16 = folder / "bdm_fp16.onnx"
    export_onnx(b["model"], b["process"], fp16, channels=1, default_steps=4, fp16=True)
    onnx_path = folder / "bdm_int8_fp16.onnx"
    export_int8_fp16(str(b["onnx"]), str(fp16), str(onnx_path))
    return dict(b, onnx=onnx_path, plan=folder / "bdm_int8_fp16.plan")


def test_int8_fp16_engine_runs_int8_and_fp16_with_an_fp32_update(int8_fp16_graph):
    """TensorRT 10/11 (strongly typed): INT8 layers, FP16 layers (the rest of the network, as the graph types
    it), FP32 outputs, and the same step as ONNX Runtime on the graph (the INT8 engine's bound). 8.x/9.x
    refuse the opset-19 graph in one line naming bdm_int8.onnx."""
    from bdm_runtime.errors import BdmError

    b = int8_fp16_graph
    if int(trt.__version__.split(".")[0]) < 10:
        with pytest.raises(BdmError, match="build bdm_int8.onnx here") as e:
            build_engine(str(b["onnx"]), str(b["plan"]), batch=BATCH, workspace_mib=512)
        assert "\n" not in str(e.value) and not os.path.exists(b["plan"])
        return
    side = build_engine(str(b["onnx"]), str(b["plan"]), batch=BATCH, workspace_mib=512)
    assert side[fmt.K_PRECISION] == "int8-fp16"
    info = _layer_info(_engine(b["plan"]))
    print(f"\nTensorRT {trt.__version__}")
    assert "int8" in info.lower() and ("half" in info.lower() or "fp16" in info.lower())
    kinds = _tensor_kinds(info)
    for name in (fmt.Z_NEXT, fmt.X0):
        assert kinds.get(name, {"float"}) <= {"float"}, (name, kinds.get(name))
    meta = dict(side)
    meta[fmt.K_DEFAULT_STEPS] = 50
    feed = make_inputs(meta, b["process"], final=False, batch=5, seed=5)
    want = session(b["onnx"]).run([fmt.Z_NEXT], feed)[0]
    err = relative_error(_trt_run(b["plan"], feed)[fmt.Z_NEXT], want)
    print(f"int8-fp16 engine vs ORT int8-fp16, batch 5: z_next {err:.2e}")
    assert err < 3e-2
