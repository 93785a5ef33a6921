"""The TensorRT path against each TensorRT version's Python API, on the CPU (no TensorRT, no GPU).

``fake_trt`` builds a ``tensorrt`` module per version from the bindings' own name lists (8.5.3,
8.6.1, 10.0.1, 10.3.0, 10.16, 11.1): an absent name raises ``AttributeError`` as it would on that
TensorRT, so every test here also checks that only that version's names are used. Below it sits
a fake ``libcudart`` (``fake_trt.cudart``) where Polygraphy's CUDA library handle would be. What
runs is the real code: ``bdm_runtime.backends.trt``, ``bdm_runtime.backends.cudart``, ``bdm_runtime.trt_build`` and
Polygraphy's ``network_from_onnx_path``, ``get_trt_logger`` and ``EngineFromBytes``; only
Polygraphy's ``CreateConfig`` (kept, its arguments recorded) and ``engine_bytes_from_network``
(which would call TensorRT's builder) are stood in for, after checking the arguments against the
real signatures. Fake engines run their ONNX graph with ONNX Runtime on the fake device memory,
so sampled images are compared with the ONNX Runtime backend on the same graph.
"""
import json
import os
import re
import sys
import types

import numpy as np
import pytest

import bdm_runtime
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError

import fake_trt
from fake_trt.cudart import D2D, H2D, FakeCudart
from fake_trt.graphs import write_step_graph

pytest.importorskip("polygraphy")
pytest.importorskip("onnxruntime")
VERSIONS = sorted(fake_trt.VERSIONS, key=lambda k: [int(p) if p.isdigit() else 99 for p in re.split(r"[.-]", k)])
MAJOR = {k: int(fake_trt.API[k]["version"].split(".")[0]) for k in VERSIONS}
PROFILE = (2, 4, 8)   # min 2: padding below it; max 8: chunks of 8 and 3 for n = 11
ORIN = ("NVIDIA Orin", (8, 7))


# -- installing a fake -----------------------------------------------------------------------------
def _reset_polygraphy():
    """Forget Polygraphy's cached ``tensorrt`` (its lazy modules and its TensorRT logger)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("polygraphy"):
            continue
        for value in list(vars(module).values()):
            cached = vars(value).get("module") if type(value).__name__ == "LazyModule" else None
            if getattr(cached, "__name__", None) == "tensorrt":
                object.__setattr__(value, "module", None)
    import polygraphy.backend.trt.util as trt_util

    trt_util.TRT_LOGGER = None


class Env:
    """One fake machine: a GPU (``cudart``) and a TensorRT ``key``; ``process()`` starts a fresh process."""

    def __init__(self, monkeypatch, key, gpu=ORIN):
        import polygraphy.backend.trt as ptrt
        import polygraphy.cuda.cuda as pcuda

        self.mp, self.key, self.builds, self.configs = monkeypatch, key, [], []
        self.cudart = FakeCudart(*gpu)
        monkeypatch.setattr(pcuda, "G_CUDA", types.SimpleNamespace(handle=self.cudart))
        real_config, real_bytes = ptrt.CreateConfig, ptrt.EngineBytesFromNetwork

        def create_config(**kwargs):
            self.configs.append(kwargs)
            return real_config(**kwargs)  # the real loader checks the arguments; it is never called

        def engine_bytes_from_network(network, config=None, save_timing_cache=None):
            real_bytes(network, config=config, save_timing_cache=save_timing_cache)  # same signature
            self.builds.append(dict(network=network, config=config, timing_cache=save_timing_cache))
            return _plan_bytes(self.trt, network, config)

        monkeypatch.setattr(ptrt, "CreateConfig", create_config)
        monkeypatch.setattr(ptrt, "engine_bytes_from_network", engine_bytes_from_network)
        self.process()

    def process(self):
        """A fresh process: a new ``tensorrt`` module (no plugins registered) on the same GPU."""
        self.trt = fake_trt.make_tensorrt(self.key, self.cudart)
        self.fake = self.trt._fake
        self.mp.setitem(sys.modules, "tensorrt", self.trt)
        _reset_polygraphy()
        return self.trt


def _plan_bytes(trt, network, config):
    """What the stand-in builder "serializes": the network's interface, plugins and the config."""
    builder, net, parser = network
    profile = config.profiles[0]
    return json.dumps({
        "version": trt.__version__, "onnx": parser._path,
        "plugins": ["InstanceNormalization_TRT" for layer in net._layers if layer._kind.name == "PLUGIN_V2"],
        "inputs": {t._name: t._dtype.name for t in net._inputs}, "outputs": [t._name for t in net._outputs],
        "profile": {n: [list(s.min), list(s.opt), list(s.max)] for n, s in profile.items()}}).encode()


@pytest.fixture(autouse=True)
def _forget_fakes():
    yield
    _reset_polygraphy()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_trt_graphs")
    return {"fp32": write_step_graph(folder / "fp32.onnx"), "fp16": write_step_graph(folder / "fp16.onnx", fp16=True),
            "cond": write_step_graph(folder / "cond.onnx", num_classes=3),
            "fmt2": write_step_graph(folder / "fmt2.onnx", format_version=2),
            "int8": write_step_graph(folder / "int8.onnx", format_version=2, int8=True),
            fmt.INT8_FP16: write_step_graph(folder / "int8_fp16.onnx", format_version=2, int8="fp16")}


def _build(env, onnx_path, folder, name="m", **kw):
    from bdm_runtime.trt_build import build_engine

    plan = str(folder / f"{name}.plan")
    side = build_engine(onnx_path, plan, batch=PROFILE, **kw)
    return plan, side


def _reference(onnx_path, n, **kw):
    with bdm_runtime.load(onnx_path, backend="ort", providers=["CPUExecutionProvider"], threads=1) as s:
        return s.sample(n, **kw)


def _version_names(key):
    entry = fake_trt.API[key]
    names = set(entry["functions"]) | set(entry["dtypes"]) | set(entry["classes"]) | set(entry["enums"])
    for cls, members in entry["classes"].items():
        names |= {f"{cls}.{m}" for m in members["methods"] + members["properties"]}
    for enum, values in entry["enums"].items():
        names |= {f"{enum}.{v}" for v in values}
    return names


def _only_this_version(env):
    assert env.fake.touched <= _version_names(env.key), env.fake.touched - _version_names(env.key)
    assert "Logger.__init__" not in env.fake.names("Logger")  # Polygraphy's logger, never a second one


# -- the builder -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key", VERSIONS)
def test_builder_route_follows_the_version(key, graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, key)
    trt, major = env.trt, MAJOR[key]
    plan, side = _build(env, graphs["fp16"], tmp_path, workspace_mib=64)
    _only_this_version(env)
    flags = env.fake.calls[env.fake.names("").index("Builder.create_network")][2]["flags"]
    enum = trt.NetworkDefinitionCreationFlag
    # Network: 8.x explicit batch (weakly typed), 10.x STRONGLY_TYPED, 11.x no flag (always strongly typed).
    assert flags == {8: lambda: 1 << int(enum.EXPLICIT_BATCH), 10: lambda: 1 << int(enum.STRONGLY_TYPED),
                     11: lambda: 0}[major]()
    # Parser: NATIVE_INSTANCENORM set on 8.6 (off by default there), untouched elsewhere.
    set_flags = [c[1][0] for c in env.fake.calls if c[0] == "OnnxParser.flags="]
    assert set_flags == ([1 << int(trt.OnnxParserFlag.NATIVE_INSTANCENORM)] if key == "8.6" else [])
    assert json.loads(open(plan, "rb").read())["plugins"] == (["InstanceNormalization_TRT"] if key == "8.5" else [])
    # Precision: 8.x FP16 flag + "prefer" constraints with pinned layers; 10/11 nothing to set.
    (config,) = env.configs
    assert config["fp16"] is (major == 8) and config["precision_constraints"] == ("prefer" if major == 8 else None)
    for flag in ("FP16", "PREFER_PRECISION_CONSTRAINTS") if major == 8 else ():
        assert flag in env.fake.enums["BuilderFlag"]  # what Polygraphy will set exists in this version
    layers = {layer._name: layer for layer in env.builds[0]["network"][1]._layers}
    if major == 8:
        assert layers["to_half"]._precision == trt.float16 and layers["to_half"]._output_types == {0: trt.float16}
        for name in ("norm", "add_noise", "x0", "z_next", "to_float"):   # the float32 islands stay float32
            assert layers[name]._precision == trt.float32, name
        assert layers["shape4"]._precision is None                       # constants are left alone
    else:
        assert not any(n.startswith(("ILayer.precision", "ILayer.set_output_type")) for n in env.fake.names("ILayer"))
    assert config["memory_pool_limits"] == {trt.MemoryPoolType.WORKSPACE: 64 << 20}
    assert side[fmt.K_TRT_VERSION] == trt.__version__ and side[fmt.K_PROFILE] == {"min": 2, "opt": 4, "max": 8}
    assert side[fmt.K_TRT_DEVICE] == {"name": ORIN[0], "compute_capability": list(ORIN[1])}
    assert json.loads(open(plan + ".json").read()) == side


@pytest.mark.parametrize("key", VERSIONS)
def test_int8_route_follows_the_version(key, graphs, tmp_path, monkeypatch, capsys):
    """INT8 (Q/DQ) graphs: 8.x INT8 + FP16 flags, the update pinned to FP32 and the network left to the
    builder; 10.x/11.x strongly typed with no flag (the graph's Q/DQ and types decide: one note says its
    float layers run FP32 and which file runs them FP16); the graph given is the .onnx itself, and the
    engine samples as ONNX Runtime does on it."""
    env = Env(monkeypatch, key)
    trt, major = env.trt, MAJOR[key]
    plan, side = _build(env, graphs["int8"], tmp_path)
    _only_this_version(env)
    note = capsys.readouterr().err.strip().splitlines()
    if major >= 10:
        assert len(note) == 1 and note[0].startswith(f"note: TensorRT {trt.__version__} builds int8.onnx strongly")
        assert "run FP32" in note[0] and "bdm-export --int8 --fp16 also writes bdm_int8_fp16.onnx" in note[0]
    else:
        assert note == []
    assert json.loads(open(plan, "rb").read())["onnx"] == os.path.abspath(graphs["int8"])
    flags = env.fake.calls[env.fake.names("").index("Builder.create_network")][2]["flags"]
    enum = trt.NetworkDefinitionCreationFlag
    assert flags == {8: lambda: 1 << int(enum.EXPLICIT_BATCH), 10: lambda: 1 << int(enum.STRONGLY_TYPED),
                     11: lambda: 0}[major]()
    (config,) = env.configs
    weak = major == 8
    assert (config["fp16"], config["int8"]) == (weak, weak)
    assert config["precision_constraints"] == ("prefer" if weak else None)
    for flag in ("FP16", "INT8", "PREFER_PRECISION_CONSTRAINTS") if weak else ():
        assert flag in env.fake.enums["BuilderFlag"]
    layers = {layer._name: layer for layer in env.builds[0]["network"][1]._layers}
    assert {"/model/conv/q", "/model/conv/dq", "/model/conv/Conv"} <= set(layers)
    if weak:
        for name in ("norm", "norm_s", "add_noise", "x0", "z_next", "hist", "u_x"):   # the update: FP32
            assert layers[name]._precision == trt.float32, name
        for name in ("/model/conv/q", "/model/conv/dq", "/model/conv/dq_w", "/model/conv/Conv"):
            assert layers[name]._precision is None and not layers[name]._output_types, name
    else:
        assert not any(n.startswith(("ILayer.precision", "ILayer.set_output_type")) for n in env.fake.names("ILayer"))
        assert layers["/model/conv/q"].get_output(0).dtype == trt.int8      # typed by the graph
    assert side[fmt.K_PRECISION] == "int8" and side[fmt.K_CALIBRATION]["method"] == "max"
    want = _reference(graphs["int8"], 5, seed=2)
    with bdm_runtime.load(plan, backend="trt") as s:
        np.testing.assert_allclose(s.sample(5, seed=2), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", VERSIONS)
def test_int8_fp16_route_follows_the_version(key, graphs, tmp_path, monkeypatch, capsys):
    """INT8 in the FP16 graph (opset 19, float16 scales): 10.x/11.x strongly typed with no flag, the network's
    Q/DQ convolution INT8 between float16 tensors, the update FLOAT, and the engine samples as ONNX Runtime on
    the graph; 8.x (its parser reads up to opset 17) refuses it in one line naming bdm_int8.onnx."""
    env = Env(monkeypatch, key)
    trt, major = env.trt, MAJOR[key]
    path = graphs[fmt.INT8_FP16]
    if major < 10:
        with pytest.raises(BdmError) as e:
            _build(env, path, tmp_path)
        assert "\n" not in str(e.value) and str(e.value).startswith(path)
        assert "opset 19" in str(e.value) and "build bdm_int8.onnx here" in str(e.value)
        assert env.configs == [] and "OnnxParser.parse_from_file" not in env.fake.names("")  # refused up front
        with pytest.raises(BdmError, match="build bdm_int8.onnx here"):    # the runtime's engine cache too
            bdm_runtime.load(path, backend="trt", engine_cache=str(tmp_path / "cache"))
        assert os.listdir(tmp_path) == []
        return
    plan, side = _build(env, path, tmp_path)
    _only_this_version(env)
    assert capsys.readouterr().err == ""                                    # no FP32 note: it is FP16
    flags = env.fake.calls[env.fake.names("").index("Builder.create_network")][2]["flags"]
    assert flags == (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major == 10 else 0)
    (config,) = env.configs
    assert (config["fp16"], config["int8"], config["precision_constraints"]) == (False, False, None)
    assert not any(n.startswith(("ILayer.precision", "ILayer.set_output_type")) for n in env.fake.names("ILayer"))
    layers = {layer._name: layer for layer in env.builds[0]["network"][1]._layers}
    out = {name: layer.get_output(0).dtype for name, layer in layers.items()}
    assert out["/model/to_half"] == out["/model/conv/dq"] == out["/model/conv/dq_w"] == trt.float16
    assert out["/model/conv/q"] == trt.int8 and out["/model/conv/Conv"] == trt.float16
    update = [n for n, layer in layers.items() if not n.startswith("/model/") and layer._kind.name != "CONSTANT"]
    assert len(update) > 10 and all(out[n] == trt.float32 for n in update), {n: out[n] for n in update}
    assert side[fmt.K_PRECISION] == "int8-fp16" and side[fmt.K_CALIBRATION]["method"] == "max"
    want = _reference(path, 5, seed=2)
    with bdm_runtime.load(plan, backend="trt") as s:
        np.testing.assert_allclose(s.sample(5, seed=2), want, rtol=0, atol=1e-6)
    cache = tmp_path / "cache"                                 # the runtime's engine cache: named after the graph
    with bdm_runtime.load(path, backend="trt", engine_cache=str(cache), batch=5) as s:
        np.testing.assert_allclose(s.sample(5, seed=2), want, rtol=0, atol=1e-6)
    assert sorted(os.listdir(cache)) == [f"int8_fp16.trt{trt.__version__}.nvidia-orin-sm87.b5.plan" + ext
                                         for ext in ("", ".json")]


@pytest.mark.parametrize("key", ["8.6", "10.3"])
def test_export_builds_the_engines_this_tensorrt_can(key, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """``bdm-export --int8 --fp16`` with TensorRT: every graph gets its engine, but on 8.x bdm_int8_fp16.onnx,
    which is named with the reason (the export succeeds); on 10/11 no FP32 note, the FP16 twin is there."""
    from bdm_export.cli import main
    from helpers import in_process

    Env(monkeypatch, key)
    out = tmp_path / "out"
    code, stdout, err = in_process(main, ["--ckpt", tiny_checkpoint, "--out-dir", out, "--steps", 2, "--int8",
                                          "--fp16", "--calib-images", 1, "--batch", "1:2:4"], capsys)
    assert code == 0, err
    stems = ["bdm", "bdm_fp16", "bdm_int8"] + (["bdm_int8_fp16"] if MAJOR[key] >= 10 else [])
    assert sorted(os.listdir(out)) == sorted([n for n, _ in fmt.EXPORT_FILES.values()] + [
        s + ext for s in stems for ext in (".plan", ".plan.json")])
    if MAJOR[key] < 10:
        assert f"no TensorRT engine built from {out / 'bdm_int8_fp16.onnx'}: TensorRT 8.6 builds no int8-fp16" in stdout
    assert "note:" not in err


def test_build_failures_are_one_line(graphs, tmp_path, monkeypatch):
    import polygraphy
    import polygraphy.backend.trt as ptrt

    env = Env(monkeypatch, "11.x")

    def broken(*args, **kwargs):
        raise AttributeError("'tensorrt.INetworkDefinition' object has no attribute 'x'\nTraceback ...")

    monkeypatch.setattr(ptrt, "engine_bytes_from_network", broken)
    with pytest.raises(BdmError) as e:
        _build(env, graphs["fp32"], tmp_path)
    assert "\n" not in str(e.value) and "could not build an engine" in str(e.value)
    assert os.listdir(tmp_path) == []  # nothing half-written
    monkeypatch.setattr(polygraphy, "__version__", "0.49.26")  # sets EXPLICIT_BATCH on TensorRT 11
    with pytest.raises(BdmError, match=r"polygraphy>=0\.50"):
        _build(env, graphs["fp32"], tmp_path)


# -- loading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", VERSIONS)
def test_engine_loads_in_a_fresh_process(key, graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, key)
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    env.process()                       # the builder's process registered the plugins; this one has not
    with bdm_runtime.load(plan) as s:
        assert s.provider == f"TensorRT {env.trt.__version__}"
        names = env.fake.names("")
        assert names.index("init_libnvinfer_plugins") < names.index("Runtime.deserialize_cuda_engine")
        register = env.fake.calls[names.index("init_libnvinfer_plugins")]
        runtime_init = env.fake.calls[names.index("Runtime.__init__")]
        assert register[1][1] == "" and register[1][0] is runtime_init[1][0]  # Polygraphy's logger, default namespace
    _only_this_version(env)
    if key == "8.5":  # the fake bites: without registration the plugin engine does not deserialize
        trt = env.process()
        assert trt.Runtime(trt.Logger()).deserialize_cuda_engine(open(plan, "rb").read()) is None


# -- sampling --------------------------------------------------------------------------------------
def _captures(cudart):
    return [a for n, a in cudart.calls if n == "cudaStreamBeginCapture"]


@pytest.mark.parametrize("key", VERSIONS)
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_sampling_matches_onnx_runtime_with_alternating_chunks(key, cuda_graph, graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, key)
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    env.process()
    # Chunks 8, 3, 8, 3 (profile max 8): every step after a shape change must start plainly, then
    # graphs of both shapes are captured and replayed. One image (padded to the minimum 2) last.
    want = _reference(graphs["fp32"], 11, seed=5, steps=5, eta=1.0)
    with bdm_runtime.load(plan, cuda_graph=cuda_graph) as s:
        got = [s.sample(11, seed=5, steps=5, eta=1.0) for _ in range(2)]
        one = s.sample(1, seed=5, steps=5, eta=1.0, first_index=10)
        det = s.sample(3, seed=2, steps=4, eta=0.0)
    # Same graph, same inputs, same ONNX Runtime kernels: equal up to batch-size-dependent vectorisation.
    for g in got:
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one[0], want[10], rtol=0, atol=1e-6)
    np.testing.assert_allclose(det, _reference(graphs["fp32"], 3, seed=2, steps=4, eta=0.0), rtol=0, atol=1e-6)
    assert env.fake.violations == [] and env.cudart.violations == []
    _only_this_version(env)
    calls = env.cudart.calls
    ours = {a["stream"] for n, a in calls if n == "cudaStreamCreateWithFlags" and a["flags"] == 1}  # non-blocking
    assert len(ours) == 1
    assert {a["stream"] for n, a in calls if n in ("cudaMemcpyAsync", "cudaGraphLaunch")} == ours
    # Host -> device per chunk: z, eta, the time grid (once), then the noise per step (eta = 1) or
    # zeros once (eta = 0); each step copies its (t, s) rows from the grid on the device.
    copies = [a["kind"] for n, a in calls if n == "cudaMemcpyAsync"]
    assert copies.count(H2D) == 4 * (3 + 5) + (3 + 5) + 4
    assert copies.count(D2D) == 4 * 5 + 5 + 4
    if cuda_graph:
        assert _captures(env.cudart) and all(c["mode"] == 1 and c["stream"] in ours for c in _captures(env.cudart))
        for graph in env.cudart.graphs.values():  # only execute_async_v3, nothing else, in each graph
            assert [op.kind for op in graph["ops"]] == ["execute_async_v3"] and graph["flags"] == 1
        assert len(env.cudart.graphs) == 6  # batches 8, 3 and 2 (one image padded), latent parities 0 and 1
        assert len([1 for n, _ in calls if n == "cudaGraphLaunch"]) > len(env.cudart.graphs)  # replayed
    else:
        assert not _captures(env.cudart)


@pytest.mark.parametrize("key", ["8.5", "10.x-latest"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_multistep_state_stays_on_the_device(key, cuda_graph, graphs, tmp_path, monkeypatch):
    """Format 2 (B11's state): dpmpp2m and ddim equal the ONNX Runtime backend on the same graph, with
    chunks 8, 3 and CUDA graphs; the state swaps on the device, t_prev comes from the grid on the device."""
    env = Env(monkeypatch, key)
    plan, _ = _build(env, graphs["fmt2"], tmp_path)
    env.process()
    kw = dict(seed=5, steps=5, solver="dpmpp2m", grid="uniform")
    want = _reference(graphs["fmt2"], 11, **kw)
    # the history reaches the graph: the first-order run differs by far more than the tolerance below
    assert np.abs(want - _reference(graphs["fmt2"], 11, seed=5, steps=5, eta=0.0)).max() > 0.01 * np.abs(want).max()
    with bdm_runtime.load(plan, cuda_graph=cuda_graph) as s:
        got = [s.sample(11, **kw) for _ in range(2)]
        ddim = s.sample(3, seed=2, steps=4, eta=1.0)
    for g in got:
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ddim, _reference(graphs["fmt2"], 3, seed=2, steps=4, eta=1.0), rtol=0, atol=1e-6)
    assert env.fake.violations == [] and env.cudart.violations == []
    # Host -> device per chunk of dpmpp2m: z, eta, zero noise, zero state, the time grid and t_prev;
    # per step two copies on the device ((t, s) and t_prev), nothing from the host.
    copies = [a["kind"] for n, a in env.cudart.calls if n == "cudaMemcpyAsync"]
    assert copies.count(H2D) == 4 * 6 + (3 + 2 + 4)
    assert copies.count(D2D) == 4 * 5 * 2 + 4 * 2
    if cuda_graph:
        assert len(env.cudart.graphs) == 4  # batches 8 and 3, state parities 0 and 1



def test_the_shape_change_check_bites(graphs, tmp_path, monkeypatch):
    """The defect of issue 14 item 3 (replay an existing graph before the plain step after a shape change) is caught."""
    from bdm_runtime.backends.trt import TrtBackend

    env = Env(monkeypatch, "10.3")
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    fixed = TrtBackend._execute

    def replay_first(self, parity):
        graph = self._graphs.get((self._shape, parity))
        if graph is None:
            return fixed(self, parity)
        self._bind(fmt.Z, self._buf["z%d" % parity])
        self._bind(fmt.Z_NEXT, self._buf["z%d" % (1 - parity)])
        self._cuda.launch(graph[1], self.stream)

    monkeypatch.setattr(TrtBackend, "_execute", replay_first)
    with bdm_runtime.load(plan, cuda_graph=True) as s:
        s.sample(11, seed=5, steps=5)   # chunks 8, 3: graphs of (8, 1), (8, 0), (3, 1), (3, 0)
        s.sample(11, seed=5, steps=5)   # back to 8: step 0 replays (8, 0) right after set_input_shape
    # Every step of both chunks of the second call replays onto a context no plain enqueue has updated.
    assert env.fake.violations == ["CUDA graph replayed after set_input_shape without a plain enqueue"] * 10


@pytest.mark.parametrize("key", ["8.5", "10.0", "11.x"])
def test_labels_and_guidance_reach_the_engine(key, graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, key)
    plan, _ = _build(env, graphs["cond"], tmp_path)
    kw = dict(seed=3, steps=4, labels=[0, 1, 2, 1, 0], guidance=1.5)
    with bdm_runtime.load(plan) as s:
        got = s.sample(5, **kw)
    np.testing.assert_allclose(got, _reference(graphs["cond"], 5, **kw), rtol=0, atol=1e-6)
    label = "INT32" if MAJOR[key] == 8 else "INT64"   # TensorRT 8 turns int64 inputs into int32
    assert json.loads(open(plan, "rb").read())["inputs"][fmt.LABEL] == label
    _only_this_version(env)


# -- streams and device output ---------------------------------------------------------------------
class DeviceArray:
    """Device memory of the host program with ``__cuda_array_interface__`` (v3)."""

    def __init__(self, cudart, shape, stream=None, mask=None):
        self.cudart, self.shape, self.stream, self.mask = cudart, tuple(shape), stream, mask
        self.nbytes = 4 * int(np.prod(shape))
        self.ptr = cudart.device_malloc(self.nbytes)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (self.ptr, False), "strides": None, "version": 3,
                "stream": self.stream, "mask": self.mask}

    def numpy(self):
        return np.frombuffer(bytes(self.cudart.view(self.ptr, self.nbytes)), np.float32).reshape(self.shape)


def test_caller_streams_are_waited_for(graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, "10.x-latest")
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    caller, producer = env.cudart.user_stream(), env.cudart.user_stream()
    out = DeviceArray(env.cudart, (3, 1, 4, 4), stream=producer)
    with bdm_runtime.load(plan, cuda_stream=caller) as s:
        assert s.sample(3, seed=4, steps=4, out=out) is out
    np.testing.assert_allclose(out.numpy(), _reference(graphs["fp32"], 3, seed=4, steps=4), rtol=0, atol=1e-6)
    calls = env.cudart.calls
    ours = next(a["stream"] for n, a in calls if n == "cudaStreamCreateWithFlags")
    sequence = [(n, a.get("stream"), a.get("dst")) for n, a in calls
                if n in ("cudaEventRecord", "cudaStreamWaitEvent") or (n == "cudaMemcpyAsync" and a["kind"] != D2D)
                or (n == "cudaMemcpyAsync" and a["dst"] == out.ptr)]
    # Before anything of ours: wait for the caller's stream. Before writing into out: for its producer's.
    assert sequence[:2] == [("cudaEventRecord", caller, None), ("cudaStreamWaitEvent", ours, None)]
    assert sequence[-3:] == [("cudaEventRecord", producer, None), ("cudaStreamWaitEvent", ours, None),
                             ("cudaMemcpyAsync", ours, out.ptr)]
    assert env.cudart.violations == []


def test_cuda_array_interface_mask_and_stream_zero_are_refused(graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, "10.0")
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    with bdm_runtime.load(plan) as s:
        with pytest.raises(BdmError, match="mask"):
            s.sample(2, out=DeviceArray(env.cudart, (2, 1, 4, 4), mask=DeviceArray(env.cudart, (2, 1, 4, 4))))
        with pytest.raises(BdmError, match="stream 0"):
            s.sample(2, out=DeviceArray(env.cudart, (2, 1, 4, 4), stream=0))


# -- errors and release ----------------------------------------------------------------------------
def test_close_frees_every_buffer_even_if_one_free_fails(graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, "8.6")
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    s = bdm_runtime.load(plan, cuda_graph=True)
    s.sample(3, seed=1, steps=3)
    backend_memory = set(env.cudart.live)
    stuck = sorted(backend_memory)[1]
    env.cudart.fail_free.add(stuck)
    with pytest.raises(BdmError) as e:
        s.close()
    assert "\n" not in str(e.value) and "cudaFree" in str(e.value)
    assert "CUDA error 1 (cudaErrorInvalidValue) in cudaFree" in str(e.value)  # the number and its name
    assert set(env.cudart.live) == {stuck}                          # every other buffer was freed
    assert not env.cudart.streams and not env.cudart.events and not env.cudart.execs


def test_refused_tensor_address_is_an_error(graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, "11.x")
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    env.trt.IExecutionContext._fake_refuse = (fmt.Z,)
    with bdm_runtime.load(plan) as s, pytest.raises(BdmError, match="address of tensor 'z'"):
        s.sample(2)


@pytest.mark.parametrize("memory", [600, 3000])
def test_device_out_of_memory_is_one_line(memory, graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, "8.5")
    plan, _ = _build(env, graphs["fp32"], tmp_path)
    env.cudart.memory = memory  # 600 B: the first buffers fail; 3000 B: a later one (the time grid)
    with pytest.raises(BdmError) as e:
        with bdm_runtime.load(plan) as s:
            s.sample(8, steps=50)
    assert "\n" not in str(e.value) and str(e.value).startswith("out of GPU memory in cudaMalloc")
    assert env.cudart.live == {} and not env.cudart.streams and not env.cudart.events  # nothing left behind


def test_side_file_image_shape_must_match_the_engine(graphs, tmp_path, monkeypatch):
    """A side file whose image shape disagrees with the engine's z is refused in one line (issue 13)."""
    env = Env(monkeypatch, "10.3")
    plan, side = _build(env, graphs["fp32"], tmp_path)
    with open(plan + ".json", "w") as f:
        # a shape within the runtime's limits, and a process that agrees with it: only the engine disagrees
        json.dump(dict(side, **{fmt.K_IMAGE_SHAPE: [1, 8, 8], fmt.K_PROCESS: dict(side[fmt.K_PROCESS],
                                                                                  image_size=[8, 8])}), f)
    with pytest.raises(BdmError, match=r"1x8x8 \(C x H x W\), but the engine's z is 1x4x4"):
        bdm_runtime.load(plan)


# -- the engine cache ------------------------------------------------------------------------------
def test_engine_cache_follows_the_gpu(graphs, tmp_path, monkeypatch):
    env = Env(monkeypatch, "10.3")
    cache = tmp_path / "cache"
    with bdm_runtime.load(graphs["fp32"], backend="trt", engine_cache=str(cache), batch=4) as s:
        a = s.sample(2, seed=0, steps=3)
    (orin,) = [f for f in os.listdir(cache) if f.endswith(".plan")]
    assert orin == f"fp32.trt{env.trt.__version__}.nvidia-orin-sm87.b4.plan"
    side = json.loads((cache / (orin + ".json")).read_text())
    assert side[fmt.K_TRT_DEVICE] == {"name": "NVIDIA Orin", "compute_capability": [8, 7]}
    with bdm_runtime.load(graphs["fp32"], backend="trt", engine_cache=str(cache), batch=4) as s:
        assert np.array_equal(s.sample(2, seed=0, steps=3), a)
    assert len(env.builds) == 1                                     # reused
    env.cudart.name, env.cudart.cc = "NVIDIA H200", (9, 0)          # the same folder on another GPU
    with bdm_runtime.load(graphs["fp32"], backend="trt", engine_cache=str(cache), batch=4) as s:
        s.sample(2, seed=0, steps=3)
    assert len(env.builds) == 2
    assert sorted(f for f in os.listdir(cache) if f.endswith(".plan")) == [
        f"fp32.trt{env.trt.__version__}.nvidia-h200-sm90.b4.plan", orin]
    with pytest.raises(BdmError, match=r"compute capability 8\.7.*NVIDIA H200 \(9\.0\)"):
        bdm_runtime.load(str(cache / orin))                             # an engine of another GPU: refused
