"""The exported step graph (FP32): equal to the torch step (first- and second-order), interface and
metadata per bdm_runtime.format (formats 2 and 1), an op set TensorRT 8.5 parses, the DCTs as MatMul with
constant initializers."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.fft
import torch
from helpers import graph_step, ort_sample, run_step

import bdm_train
from bdm_train import checkpoint
from bdm_train.analytic import MixtureDenoiser
from bdm_train.diffusion import BlurringDiffusion
from bdm_train.sampling import sample
from bdm_export import export_onnx, read_metadata
from bdm_export.fp16 import relative_error
from bdm_export.step import StepGraph
from bdm_runtime import format as fmt
from bdm_runtime import onnx_meta

# Rows marked "Y" in onnx-tensorrt docs/operators.md for TensorRT 8.5 (release/8.5, commit 6d0ab7b),
# the parser of JetPack 5. ConstantOfShape is listed for FP32, but its 8.5 importer converts any
# value but UINT8 (our int64 null label becomes INT32 like every INT64).
TRT85_OPS = set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Parseable, but not in a step graph: FFTs (not parseable at all), Einsum, control flow.
FORBIDDEN = {"DFT", "STFT", "Einsum", "Loop", "If", "Scan"}
ALLOWED = TRT85_OPS - FORBIDDEN
# Inputs the 8.5 parser requires to be initializers: (op, input index).
MUST_BE_INITIALIZER = {("Conv", 1), ("InstanceNormalization", 1), ("InstanceNormalization", 2), ("Slice", 3),
                       ("Squeeze", 1), ("Unsqueeze", 1)}

N = 20                          # the time grid of the step tests: t = i / N, s = t - 1/N
GRID = (20, 15, 10, 5, 2, 1)    # i
TOL = 1e-4                      # relative error max|a-b| / max|b| of the ONNX step vs torch


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def images(tiny_data):
    """The tiny training images in [-1, 1], float32 [96, 1, 16, 16], and their labels."""
    d = np.load(tiny_data)
    return torch.from_numpy(d["images"].astype(np.float32) / 127.5 - 1), torch.from_numpy(d["labels"])


@pytest.fixture(scope="module", params=["eps", "spectral"])
def uncond(request, tmp_path_factory):
    """An unconditional trained model per parameterisation (B8, B14), exported: the same tolerances hold."""
    ckpt = request.getfixturevalue("tiny_checkpoint" if request.param == "eps" else "tiny_spectral_checkpoint")
    model, process, config = checkpoint.load(ckpt)
    path = tmp_path_factory.mktemp("export") / "bdm.onnx"
    meta = export_onnx(model, process, path, channels=1, default_steps=17, default_eta=0.25)
    return model, process, config, path, meta


@pytest.fixture(scope="module")
def cond(tiny_cond_checkpoint, tmp_path_factory):
    model, process, config = checkpoint.load(tiny_cond_checkpoint)
    folder = tmp_path_factory.mktemp("export_cond")
    guided = folder / "guided.onnx"
    plain = folder / "plain.onnx"
    export_onnx(model, process, guided, channels=1, num_classes=3)
    export_onnx(model, process, plain, channels=1, num_classes=3, guidance=False)
    return model, process, guided, plain


@pytest.fixture(scope="module")
def mixture(images, tmp_path_factory):
    """The closed-form denoiser of 4 training images, exported."""
    model = MixtureDenoiser(images[0][[0, 1, 2, 5]], BlurringDiffusion(16))  # default blur: sigma_B_max = 20
    path = tmp_path_factory.mktemp("export_mix") / "mix.onnx"
    export_onnx(model, model.process, path, channels=1)
    return model, path


def _latents(process, x, i, gen):
    """Realistic ``z_t = q_sample(x, t)`` at ``t = i/N`` with the adjacent ``s``."""
    b = x.shape[0]
    t = torch.full((b,), i / N)
    s = torch.full((b,), (i - 1) / N)
    return process.q_sample(x, t, torch.randn(x.shape, generator=gen)), t, s


# -- numerical equality with the torch step -------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 5])
def test_step_matches_torch(uncond, images, batch):
    """z_next within 1e-4 (relative) at every grid time and eta; x0 where it is the image (last steps).

    Relative error is max|a-b| / max|b|: both outputs are O(1) everywhere, while a per-element
    ratio blows up where z_next crosses zero. x0 at early steps is V (u_t - sigma_t u_eps) / alpha_t,
    whose float32 rounding is amplified by sigma_t / alpha_t (blur takes alpha_t to ~1e-3 a_t at high
    frequencies; up to 1e5 at t = 1): torch itself is that far from float64 there, see
    test_x0_as_accurate_as_torch. x0 is the returned image only at the last step, checked for i <= 2.
    Second-order steps (B11: eta 0, t_prev = t + 1/N, u_x_prev a guess of the same image) are checked
    the same way; the state output u_x is x0's frequency-space twin, so it is checked where x0 is.
    """
    model, process, _, path, _ = uncond
    sess = session(path)
    gen = torch.Generator().manual_seed(batch)
    graph = StepGraph(model, process).eval()
    worst = {}
    for i in GRID:
        for eta, history in ((0.0, False), (0.5, False), (1.0, False), (0.0, i < N)):  # t = 1 has no history
            x = images[0][torch.randint(0, 96, (batch,), generator=gen)]
            z, t, s = _latents(process, x, i, gen)
            noise = torch.randn(x.shape, generator=gen)
            named = {fmt.Z: z, fmt.T: t, fmt.S: s, fmt.ETA: torch.tensor([eta]), fmt.NOISE: noise}
            if history:
                named[fmt.T_PREV] = torch.full_like(t, (i + 1) / N)
                named[fmt.U_X_PREV] = process.dct(x + 0.1 * torch.randn(x.shape, generator=gen))
            zn, x0, u_x = graph_step(graph, **named)
            o_zn, o_x0, o_ux = run_step(sess, *(named[k].numpy() for k in (fmt.Z, fmt.T, fmt.S)), eta, noise.numpy(),
                                        t_prev=named.get(fmt.T_PREV, t).numpy(),
                                        u_x_prev=named.get(fmt.U_X_PREV, torch.zeros_like(z)).numpy())
            assert o_zn.shape == o_x0.shape == o_ux.shape == tuple(z.shape)
            err = relative_error(o_zn, zn)
            key = "z_next" + (" (second order)" if history else "")
            worst[key] = max(worst.get(key, 0), err)
            assert err < TOL, (i, eta, history, err)
            if i <= 2:
                for name, a, b in (("x0", o_x0, x0), ("u_x", o_ux, u_x)):
                    err = relative_error(a, b)
                    worst[f"{name} (last steps)"] = max(worst.get(f"{name} (last steps)", 0), err)
                    assert err < TOL, (name, i, eta, err)
    print(f"\nONNX vs torch FP32 step, batch {batch}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def test_x0_as_accurate_as_torch(mixture, images):
    """At every t the graph's x0 is as close to float64 torch as float32 torch is (closed-form denoiser)."""
    model, path = mixture
    sess = session(path)
    m64 = copy.deepcopy(model).double()   # BlurringDiffusion rebuilds its constants in float64
    g32 = StepGraph(model, model.process).eval()
    g64 = StepGraph(m64, m64.process).eval()
    gen = torch.Generator().manual_seed(3)
    rows = []
    for i in GRID:
        x = images[0][torch.randint(0, 96, (5,), generator=gen)]
        z, t, s = _latents(model.process, x, i, gen)
        noise = torch.randn(x.shape, generator=gen)
        eta = torch.tensor([1.0])
        zn32, x032, _ = graph_step(g32, z=z, t=t, s=s, eta=eta, noise=noise)
        zn64, x064, _ = graph_step(g64, z=z.double(), t=t.double(), s=s.double(), eta=eta.double(),
                                   noise=noise.double())
        o_zn, o_x0, _ = run_step(sess, z.numpy(), t.numpy(), s.numpy(), 1.0, noise.numpy())
        e_onnx, e_torch = relative_error(o_x0, x064), relative_error(x032, x064)
        z_onnx, z_torch = relative_error(o_zn, zn64), relative_error(zn32, zn64)
        rows.append(f"t={i / N:.2f}: x0 onnx {e_onnx:.1e} torch32 {e_torch:.1e}, "
                    f"z_next onnx {z_onnx:.1e} torch32 {z_torch:.1e}")
        # Both are float32 evaluations of one formula, ill-conditioned for x0 (and for z_next at t = 1,
        # where torch32 is 1.4e-4 from float64): the same size of error up to summation order
        # (factor 3), plus a floor of 1e-5 (float32 rounding through ~10 ops on O(1) values).
        assert z_onnx <= 3 * z_torch + 1e-5, rows[-1]
        assert e_onnx <= 3 * e_torch + 1e-5, rows[-1]
    print("\nx0 error vs float64: " + "; ".join(rows))


def test_guided_step_matches_torch(cond, images):
    """Conditional graphs: the guided branch (w = 0 and 2.5, null labels included) and the plain one."""
    model, process, guided_path, plain_path = cond
    gen = torch.Generator().manual_seed(11)
    x = images[0][:5]
    labels = torch.tensor([0, 1, 2, 3, 1])            # 3 is the null label
    z, t, s = _latents(process, x, 10, gen)
    noise = torch.randn(x.shape, generator=gen)
    eta = torch.tensor([0.5])
    sess = session(guided_path)
    for w in (0.0, 2.5):
        zn = graph_step(StepGraph(model, process, num_classes=3, guided=True), z=z, t=t, s=s, eta=eta, noise=noise,
                        label=labels, guidance=torch.tensor([w]))[0]
        o = run_step(sess, z.numpy(), t.numpy(), s.numpy(), 0.5, noise.numpy(), labels.numpy(), w)
        assert relative_error(o[0], zn) < TOL
    zn = graph_step(StepGraph(model, process, num_classes=3), z=z, t=t, s=s, eta=eta, noise=noise, label=labels)[0]
    o = run_step(session(plain_path), z.numpy(), t.numpy(), s.numpy(), 0.5, noise.numpy(), labels.numpy())
    assert relative_error(o[0], zn) < TOL
    # Guidance must change the result (else the branch is not wired): w = 2.5 vs w = 0.
    o0 = run_step(sess, z.numpy(), t.numpy(), s.numpy(), 0.5, noise.numpy(), labels.numpy(), 0.0)
    o1 = run_step(sess, z.numpy(), t.numpy(), s.numpy(), 0.5, noise.numpy(), labels.numpy(), 2.5)
    assert np.abs(o0[0] - o1[0]).max() > 1e-4


def test_sampling_loop_matches_sample(mixture):
    """A deterministic 20-step run through the ONNX step equals bdm_train.sampling.sample (same seed)."""
    model, path = mixture
    kw = dict(n=3, seed=7, steps=20, eta=0.0, first_index=2)
    want = sample(model, model.process, channels=1, **kw).numpy()
    got = ort_sample(session(path), (1, 16, 16), **kw)
    err = np.abs(got - want).max()
    print(f"\ndeterministic 20-step run, ONNX loop vs sample(): max abs error {err:.2e}")
    assert err < 1e-3
    assert np.abs(want).max() > 0.5  # a real image, not a collapsed zero


def test_guided_ancestral_loop_matches_sample(cond):
    """Ancestral (eta = 1) guided run of the conditional UNet: labels, guidance and per-step noise."""
    model, process, guided_path, _ = cond
    kw = dict(n=4, seed=3, steps=8, eta=1.0)
    labels = np.array([0, 1, 2, 3])
    want = sample(model, process, labels=labels, guidance=1.5, **kw).numpy()
    got = ort_sample(session(guided_path), (1, 16, 16), labels=labels, guidance=1.5, **kw)
    err = np.abs(got - want).max()
    print(f"\nguided ancestral 8-step run, ONNX loop vs sample(): max abs error {err:.2e}")
    assert err < 1e-3


# -- interface and metadata -----------------------------------------------------------------------
def _io(path):
    m = onnx.load(str(path))
    def desc(v):
        tt = v.type.tensor_type
        return v.name, tt.elem_type, [d.dim_param or d.dim_value for d in tt.shape.dim]
    return [desc(v) for v in m.graph.input], [desc(v) for v in m.graph.output]


def test_interface(uncond, cond, tmp_path):
    """Names, dtypes and shapes of docs/export.md's table: format 2 (written now) and format 1 (on request)."""
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    img = ["batch", 1, 16, 16]
    base = [(fmt.Z, f32, img), (fmt.T, f32, ["batch"]), (fmt.S, f32, ["batch"]), (fmt.ETA, f32, [1]),
            (fmt.NOISE, f32, img)]
    state = [(fmt.T_PREV, f32, ["batch"]), (fmt.U_X_PREV, f32, img)]
    outs = [(fmt.Z_NEXT, f32, img), (fmt.X0, f32, img)]
    assert fmt.FORMAT_VERSION == 2
    assert [n for n, _, _ in base + state] == fmt.inputs(2) and [n for n, _, _ in base] == fmt.inputs(1)
    assert _io(uncond[3]) == (base + state, outs + [(fmt.U_X, f32, img)])
    assert _io(cond[3]) == (base + state + [(fmt.LABEL, i64, ["batch"])], outs + [(fmt.U_X, f32, img)])
    assert _io(cond[2]) == (base + state + [(fmt.LABEL, i64, ["batch"]), (fmt.GUIDANCE, f32, [1])],
                            outs + [(fmt.U_X, f32, img)])
    model, process = uncond[0], uncond[1]
    v1 = tmp_path / "v1.onnx"
    meta = export_onnx(model, process, v1, channels=1, format_version=1)
    assert _io(v1) == (base, outs)
    assert meta[fmt.K_FORMAT_VERSION] == 1 and fmt.K_DEFAULT_SOLVER not in meta and fmt.missing_keys(meta) == []


def test_metadata_round_trip(uncond, cond):
    model, process, config, path, meta = uncond
    want = {
        fmt.K_FORMAT_VERSION: fmt.FORMAT_VERSION,
        fmt.K_IMAGE_SHAPE: [1, 16, 16],
        fmt.K_PROCESS: process.config(),
        fmt.K_NUM_CLASSES: 0,
        fmt.K_GUIDANCE: False,
        fmt.K_CLIP_DENOISED: True,
        fmt.K_DEFAULT_STEPS: 17,
        fmt.K_DEFAULT_ETA: 0.25,
        fmt.K_DEFAULT_SOLVER: "ddim",
        fmt.K_DEFAULT_GRID: "uniform",
        fmt.K_PRECISION: "fp32",
        fmt.K_VERSION: bdm_train.__version__,
        fmt.K_PARAM: model.param,
    }
    assert model.param in fmt.PARAMS
    assert meta == want
    assert read_metadata(path) == want
    assert fmt.missing_keys(read_metadata(path)) == []
    # Two independent readers: ONNX Runtime's and the runtime's protobuf walker (no onnx package).
    assert fmt.decode(session(path).get_modelmeta().custom_metadata_map) == want
    assert fmt.decode(onnx_meta.read(path).metadata) == want
    assert BlurringDiffusion.from_config(want[fmt.K_PROCESS]).config() == process.config()
    g = read_metadata(cond[2])
    assert (g[fmt.K_NUM_CLASSES], g[fmt.K_GUIDANCE]) == (3, True)
    assert read_metadata(cond[3])[fmt.K_GUIDANCE] is False


# -- what TensorRT can parse ------------------------------------------------------------------------
def test_opset_and_op_allow_list(uncond, cond, mixture):
    for path in (uncond[3], cond[2], cond[3], mixture[1]):
        m = onnx.load(str(path))
        assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)], path
        ops = {n.op_type for n in m.graph.node}
        assert all(n.domain == "" for n in m.graph.node)
        assert ops <= ALLOWED, sorted(ops - ALLOWED)
        assert not ops & FORBIDDEN
        assert "GroupNormalization" not in ops and "Constant" not in ops  # opset 17; constants folded
        inits = {i.name for i in m.graph.initializer}
        for n in m.graph.node:
            for k, name in enumerate(n.input):
                if (n.op_type, k) in MUST_BE_INITIALIZER:
                    assert name in inits, (n.op_type, n.name, k)
        onnx.checker.check_model(m, full_check=True)


def dct_initializers(model, n):
    """Names of initializers equal to the orthonormal DCT-II matrix of size n (scipy) or its transpose."""
    c = scipy.fft.dct(np.eye(n), norm="ortho", axis=0)      # C[k, m], independent of bdm_train.dct
    out = set()
    for init in model.graph.initializer:
        a = onnx.numpy_helper.to_array(init)
        if a.shape == (n, n) and (np.allclose(a, c, atol=1e-6) or np.allclose(a, c.T, atol=1e-6)):
            out.add(init.name)
    return out


def test_dcts_are_matmul_with_constant_initializers(uncond):
    m = onnx.load(str(uncond[3]))
    names = dct_initializers(m, 16)
    assert names
    users = [n for n in m.graph.node if set(n.input) & names]
    assert {n.op_type for n in users} == {"MatMul"}
    # Five transforms per step (dct z, dct eps, idct x0, dct clipped x0, idct u_s), two MatMuls each.
    assert len(users) == 10
    # The frequency map lambda (B2) is an initializer too (as -lambda, folded with the Neg).
    k = np.arange(16)
    lam = (np.pi * k / 16)[:, None] ** 2 + (np.pi * k / 16)[None, :] ** 2
    assert any(onnx.numpy_helper.to_array(i).shape == (16, 16)
               and np.allclose(np.abs(onnx.numpy_helper.to_array(i)), lam, rtol=1e-6)
               for i in m.graph.initializer)


# -- mistakes ---------------------------------------------------------------------------------------
def test_export_errors(mixture, tmp_path):
    model, _ = mixture
    p = model.process
    with pytest.raises(TypeError, match="convert_to_fp16"):
        export_onnx(model, p, tmp_path / "a.onnx", channels=1, fp16=True)
    with pytest.raises(ValueError, match="conditional"):
        export_onnx(model, p, tmp_path / "a.onnx", channels=1, guidance=True)
    with pytest.raises(ValueError, match="in_channels"):
        export_onnx(model, p, tmp_path / "a.onnx", channels=3)
    with pytest.raises(ValueError, match="default_eta"):
        export_onnx(model, p, tmp_path / "a.onnx", channels=1, default_eta=2.0)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        export_onnx(model, p, blocker / "a.onnx", channels=1)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["file"]  # nothing half-written anywhere
