"""Issue 22, runtime side: other processes' files, output names, crafted metadata, failures inside a step,
stdout. Each case: one ``Error:`` line and a non-zero exit (or a correct success), nothing of the user's
touched, no hang (every subprocess has a timeout)."""
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest

import bdm_runtime
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from bdm_runtime.io import ImageNames, Staging, name_max
from bdm_runtime.limits import memory_bytes
from conftest import ROOT
from helpers import export_mixture

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from test_reliability import finished, snapshot  # noqa: E402


def run(*args, module="bdm_runtime.cli", address_space=None, timeout=60, **kw):
    """``(exit code, stdout, stderr)`` of ``python -m module args`` (optionally under ``ulimit -v``)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    kw.setdefault("stdout", subprocess.PIPE)
    proc = subprocess.Popen([sys.executable, "-m", module] + [str(a) for a in args], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, preexec_fn=limit if address_space else None, **kw)
    code, out, err = finished(proc, timeout)
    decode = (lambda b: None if b is None else b.decode("utf-8", "replace"))  # bytes: keep every \r
    return code, decode(out), decode(err)


def one_line(code, err, *words):
    """Assert a refusal: non-zero exit, one ``Error:`` line holding ``words``, no traceback."""
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


def edited(src, dst, meta=None, symbolic=False):
    """A copy of graph ``src`` with metadata values ``meta`` (JSON) and, with ``symbolic``, its image
    dimensions C, H, W made symbolic."""
    m = onnx.load(src)
    for p in m.metadata_props:
        if meta and p.key in meta:
            p.value = json.dumps(meta[p.key])
    if symbolic:
        for vi in list(m.graph.input) + list(m.graph.output):
            dims = vi.type.tensor_type.shape.dim
            for i, name in zip(range(1, len(dims)), "chw"):
                dims[i].ClearField("dim_value")
                dims[i].dim_param = name
    onnx.save(m, dst)
    return str(dst)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """The mixture step graph (8x8x1, format 2, no convolutions) and its folder."""
    folder = tmp_path_factory.mktemp("audit_graphs")
    return export_mixture(folder, default_steps=2)[0]


@pytest.fixture(scope="module")
def unet(tiny_checkpoint, tmp_path_factory):
    """The tiny UNet checkpoint (16x16x1) exported as a step graph."""
    from bdm_export import export_onnx
    from bdm_train import checkpoint

    model, process, _ = checkpoint.load(tiny_checkpoint)
    path = str(tmp_path_factory.mktemp("audit_unet") / "unet.onnx")
    export_onnx(model, process, path, channels=1, default_steps=2)
    return path


# -- item 1: other processes' temporaries ------------------------------------------------------------------
def test_other_runs_and_users_hidden_files_survive(mix, tmp_path):
    """A user's ``.notes.4000002.12345678.tmp`` and another run's staging folder (a PID not alive here: another
    container or host) are left alone by a run into the same folder."""
    out = tmp_path / "od"
    out.mkdir()
    (out / ".notes.4000002.12345678.tmp").write_text("the user's notes")
    other = out / ".staged.4000003.abcd1234.tmp"
    other.mkdir()
    (other / "000000.png").write_bytes(b"another run's image")
    before = snapshot(out)
    code, _, err = run("--engine", mix, "--n", 2, "--out-dir", out, "--quiet")
    assert code == 0, err
    after = snapshot(out)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["000000.png", "000001.png"]


def test_vanished_staged_files_publish_nothing(tmp_path):
    """A staged file removed by another process before the commit: ``BdmError``, nothing published, no leftovers."""
    (tmp_path / "keep.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    with pytest.raises(BdmError, match="vanished"):
        with Staging() as stage:
            with open(stage.file(tmp_path / "g.png"), "wb") as f:
                f.write(b"grid")
            folder = stage.folder(tmp_path / "od", ImageNames(range(3, 5)))
            for name in ("000003.png", "000004.png"):
                (tmp_path / folder / name).write_bytes(b"image")
            os.remove(os.path.join(folder, "000004.png"))  # another process's clean-up
    assert snapshot(tmp_path) == before
    with pytest.raises(BdmError, match="vanished"):
        with Staging() as stage:
            os.remove(stage.file(tmp_path / "g.png"))
    assert snapshot(tmp_path) == before


# -- items 7 and 8: names checked up front -----------------------------------------------------------------
def test_longest_legal_names_work_and_longer_are_refused_up_front(mix, tmp_path):
    limit = name_max(str(tmp_path))
    for size in (limit - 24, limit):  # 231 and 255 bytes on most file systems
        grid, npz, folder = ("g" * (size - 4) + ".png", "n" * (size - 4) + ".npz", "d" * size)
        code, _, err = run("--engine", mix, "--n", 2, "--out", tmp_path / grid, "--npz", tmp_path / npz,
                           "--out-dir", tmp_path / folder, "--quiet")
        assert code == 0, err
        assert sorted(os.listdir(tmp_path / folder)) == ["000000.png", "000001.png"]
        for name in (grid, npz, folder):
            assert os.path.exists(tmp_path / name)
    before = snapshot(tmp_path)
    for flag, name in (("--out", "g" * (limit - 3) + ".png"), ("--npz", "n" * (limit - 3) + ".npz"),
                       ("--out-dir", "d" * (limit + 1))):
        code, _, err = run("--engine", mix, "--n", 2, flag, tmp_path / name, "--quiet")
        one_line(code, err, flag, f"at most {limit}", "shorter")
        assert snapshot(tmp_path) == before


def test_temporary_names_fit_for_multibyte_names_at_the_limit(tmp_path):
    from bdm_runtime.io import atomic_path

    limit = name_max(str(tmp_path))
    for name in ("\u00e9" * ((limit - 4) // 2) + ".png", "\u00e9" * ((limit - 5) // 2) + "x.npz"):
        with atomic_path(tmp_path / name) as tmp:
            assert len(os.path.basename(tmp).encode("utf-8")) <= limit  # whole characters: valid UTF-8
            with open(tmp, "wb") as f:
                f.write(b"data")
        assert (tmp_path / name).read_bytes() == b"data"
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("args,words", [
    (["--out-dir", "OUT/od", "--out", "OUT/od/000001.png", "--n", 3], ["--out", "image 1", "--out-dir"]),
    (["--out-dir", "OUT/od", "--out", "OUT/od/../od/000002.png", "--first-index", 2, "--n", 1], ["image 2"]),
    (["--out-dir", "OUT/x.png", "--out", "OUT/x.png"], ["is the --out-dir folder"]),
])
def test_colliding_outputs_refused(mix, tmp_path, args, words):
    (tmp_path / "od").mkdir()
    (tmp_path / "od" / "000001.png").write_bytes(b"the user's image")
    before = snapshot(tmp_path)
    args = [a.replace("OUT", str(tmp_path)) if isinstance(a, str) else a for a in args]
    code, _, err = run("--engine", mix, *args, "--quiet")
    one_line(code, err, *words)
    assert snapshot(tmp_path) == before


def test_grid_beside_its_images_is_no_collision(mix, tmp_path):
    code, _, err = run("--engine", mix, "--n", 2, "--out-dir", tmp_path, "--out", tmp_path / "000002.png", "--quiet")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["000000.png", "000001.png", "000002.png"]


# -- item 4: crafted metadata ------------------------------------------------------------------------------
def _process(**change):
    return dict(dict(image_size=[8, 8], blur_sigma_max=20.0, min_scale=0.001, logsnr_min=-10.0, logsnr_max=10.0),
                **change)


CRAFTED = {
    "size_huge": ({fmt.K_PROCESS: _process(image_size=[100000, 100000])}, ["image_size", "1..4096"]),
    "size_other": ({fmt.K_PROCESS: _process(image_size=[16, 16])}, ["image_size [16, 16]", "8x8"]),
    "value_huge": ({fmt.K_PROCESS: _process(logsnr_max=1e308)}, ["logsnr_max", "1e+308"]),
    "value_nan": ({fmt.K_PROCESS: _process(blur_sigma_max=float("nan"))}, ["blur_sigma_max", "nan"]),
    "min_scale_zero": ({fmt.K_PROCESS: _process(min_scale=0.0)}, ["min_scale"]),
    "logsnr_swapped": ({fmt.K_PROCESS: _process(logsnr_min=10.0, logsnr_max=-10.0)}, ["not below"]),
    "key_missing": ({fmt.K_PROCESS: {"image_size": [8, 8]}}, ["missing"]),
    "not_object": ({fmt.K_PROCESS: [1, 2]}, ["not an object"]),
    "channels_huge": ({fmt.K_IMAGE_SHAPE: [100000, 8, 8]}, ["bdm.image_shape", "1..64"]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_process_metadata_is_one_line(case, mix, tmp_path):
    meta, words = CRAFTED[case]
    symbolic = case == "channels_huge"  # fixed dims would refuse it earlier, as not the graph's shape
    graph = edited(mix, tmp_path / f"{case}.onnx", meta, symbolic=symbolic)
    before = snapshot(tmp_path)
    code, _, err = run("--engine", graph, "--grid", "spectral", "--out", tmp_path / "g.png", "--quiet")
    one_line(code, err, f"{case}.onnx", fmt.K_PROCESS if fmt.K_PROCESS in meta else fmt.K_IMAGE_SHAPE, *words)
    assert snapshot(tmp_path) == before


def test_spectral_grid_of_a_crafted_process_ends():
    """``time_grid`` with ``logsnr_min > logsnr_max`` hung in the bracket-widening loop: now a BdmError (in a
    subprocess, so that a hang is a failure after 60 s, not a stuck suite)."""
    script = ("from bdm_runtime.grids import time_grid\n"
              "from bdm_runtime.errors import BdmError\n"
              "p = dict(image_size=[8, 8], blur_sigma_max=20.0, min_scale=0.001, logsnr_min=10.0, logsnr_max=-10.0)\n"
              "try:\n"
              "    time_grid(10, 'spectral', p)\n"
              "except BdmError as e:\n"
              "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "not below" in proc.stdout, proc.stdout + proc.stderr


# -- item 11: explicit grids are bounded too ----------------------------------------------------------------
def test_explicit_grid_past_the_step_bound_is_refused(mix):
    times = np.linspace(1.0, 0.0, 5000002)  # 5,000,001 steps
    with bdm_runtime.load(mix) as s:
        with pytest.raises(BdmError, match="5000001 steps, at most 1000000"):
            s.plan(grid=times)
        assert s.plan(grid=np.linspace(1.0, 0.0, 11)).steps == 10


# -- item 5: memory and failures inside a step --------------------------------------------------------------
def test_batch_whose_activations_do_not_fit_is_refused_up_front(unet, tmp_path):
    """At 4 GiB of address space, 8,000 16x16 images need 48 MB as images but ~4 GB of activations
    (0.49 MB per image measured): refused naming --batch, before anything is created."""
    before = snapshot(tmp_path)
    code, _, err = run("--engine", unet, "--n", 8000, "--batch", 8000, "--npz", tmp_path / "s.npz", "--quiet",
                       "--threads", 1, address_space=4 << 30)
    line = one_line(code, err, "network activations", "lower --batch")
    assert "out=" not in line
    assert snapshot(tmp_path) == before


# Leaves ~300 MB of a 3 GiB address space free, after the imports: the up-front estimate (which sees 3 GiB)
# passes, the allocation inside the step fails. Address space held by np.empty is never touched (no RSS).
HOLD = ("def hold():\n"
        "    import resource, numpy as np\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "    size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        "    return np.empty((3 << 30) - size - (300 << 20), np.uint8)\n")


def _held(script, timeout=120):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux) to size the held address space")
    proc = subprocess.run([sys.executable, "-c", HOLD + script], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout, proc.stderr


def test_out_of_memory_inside_a_step_is_one_error(mix):
    """Memory taken after the up-front check (here: address space held by the caller) makes ONNX Runtime fail
    inside a step: a BdmError naming the file and the batch, not ORT's exception."""
    code, out, err = _held(
        "import numpy as np, bdm_runtime\n"
        "from bdm_runtime.errors import BdmError\n"
        f"s = bdm_runtime.load({mix!r}, threads=1, batch=150000)\n"
        "dest = np.empty((150000, 1, 8, 8), np.float32)\n"
        "held = hold()\n"
        "try:\n"
        "    s.sample(150000, steps=1, out=dest)\n"
        "except BdmError as e:\n"
        "    print(e)\n")
    assert code == 0, err
    assert "mix.onnx" in out and "out of memory" in out and "--batch" in out, out


def test_bdm_sample_out_of_memory_inside_a_step_is_one_line(tiny_checkpoint, tmp_path):
    """The same for the PyTorch sampler of bdm-sample: 3,000 16x16 images pass the estimate at 3 GiB and need
    ~1.7 GB (measured 0.58 MB per image) where 300 MB are left."""
    code, _, err = _held(
        "import torch\n"
        "from bdm_train.sample_cli import main\n"
        "held = hold()\n"
        f"main(['--ckpt', {tiny_checkpoint!r}, '--n', '3000', '--batch', '3000', '--out', {str(tmp_path / 'g.png')!r},"
        " '--device', 'cpu', '--quiet', '--steps', '1'])\n")
    one_line(code, err, "model.pt", "out of memory", "lower --batch")
    assert os.listdir(tmp_path) == []


def test_symbolic_graph_with_edited_shape_fails_in_one_line(mix, tmp_path):
    graph = edited(mix, tmp_path / "sym.onnx", {fmt.K_IMAGE_SHAPE: [1, 4, 4],
                                                fmt.K_PROCESS: _process(image_size=[4, 4])}, symbolic=True)
    before = snapshot(tmp_path)
    code, _, err = run("--engine", graph, "--n", 2, "--out", tmp_path / "g.png", "--quiet")
    one_line(code, err, "sym.onnx", "1x4x4", "export it again")
    assert snapshot(tmp_path) == before


def test_bdm_sample_huge_batch_is_one_line(tiny_checkpoint, tmp_path):
    """20,000 16x16 images: a 80 MB grid, ~12 GB of activations (0.58 MB per image measured) at 8 GiB."""
    code, _, err = run("--ckpt", tiny_checkpoint, "--n", 20000, "--batch", 20000, "--out", tmp_path / "g.png",
                       "--device", "cpu", "--quiet", module="bdm_train.sample_cli", address_space=8 << 30)
    one_line(code, err, "network activations", "lower --batch")
    assert os.listdir(tmp_path) == []


# -- item 12: messages, stdout, FIFOs ----------------------------------------------------------------------
def test_empty_model_names_its_path_once(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    code, _, err = run("--engine", tmp_path / "empty.onnx", "--out", tmp_path / "g.png")
    line = one_line(code, err, "empty file")
    assert line.count("empty.onnx") == 1, line


def test_fifo_engine_or_side_file_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.onnx")
    (tmp_path / "e.plan").write_bytes(b"engine")
    os.mkfifo(tmp_path / "e.plan.json")
    for engine, name in (("pipe.onnx", "pipe.onnx"), ("e.plan", "e.plan.json")):
        code, _, err = run("--engine", tmp_path / engine, "--out", tmp_path / "g.png", timeout=30)
        one_line(code, err, name, "FIFO")
    assert sorted(os.listdir(tmp_path)) == ["e.plan", "e.plan.json", "pipe.onnx"]


def test_error_line_is_not_on_the_progress_bar(tmp_path):
    """A failure after the bar appeared (a graph giving NaN): the bar is cleared before the Error line."""
    import torch

    from bdm_export import export_onnx
    from bdm_train.diffusion import BlurringDiffusion

    class Nan(torch.nn.Module):
        in_channels, num_classes = 1, 0

        def forward(self, z, t, labels=None):
            return z * float("nan")

    export_onnx(Nan(), BlurringDiffusion(8), str(tmp_path / "nan.onnx"), channels=1, default_steps=2)
    code, _, err = run("--engine", tmp_path / "nan.onnx", "--n", 2, "--out", tmp_path / "g.png")
    assert code == 1, err
    assert "sampling" in err  # the bar was shown (the test would prove nothing otherwise)
    assert "\r" in err  # the bar's carriage returns (raw bytes, not universal newlines)
    shown = [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]
    assert len(shown) == 1 and shown[0].startswith("Error: ") and "non-finite" in shown[0], repr(err)


def test_ort_fallback_banner_is_not_on_stdout(mix, capsys):
    """ORT prints an 'EP Error ... Falling back' banner when a provider list fails; stdout is the caller's."""
    providers = [("CPUExecutionProvider", 5)]  # not (name, options): ORT falls back to its CPU provider
    with bdm_runtime.load(mix, providers=providers) as s:
        assert s.provider == "CPUExecutionProvider"
    out, err = capsys.readouterr()
    assert out == ""
    assert "Falling back" in err


@pytest.mark.parametrize("stdout", ["full", "closed_pipe"])
def test_summary_stdout_that_fails_is_still_success(mix, tmp_path, stdout):
    if stdout == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    if stdout == "full":
        sink = open("/dev/full", "w")
    else:
        read, write = os.pipe()
        os.close(read)  # the reader has gone: any write is EPIPE
        sink = os.fdopen(write, "w")
    with sink:  # the summary is the only thing written to stdout
        code, _, err = run("--engine", mix, "--n", 2, "--out", tmp_path / "g.png", "--quiet", stdout=sink)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "outputs written" in lines[0] and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["g.png"]


def test_memory_limit_reads_the_address_space_limit():
    """``ulimit -v`` below the machine's memory is what a process can allocate: the estimate's ceiling."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("a hard address-space limit below half the memory is set already")
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        assert memory_bytes() <= limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
