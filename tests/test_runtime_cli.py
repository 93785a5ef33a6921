"""``bdm-run`` end to end in a subprocess (ONNX Runtime on the CPU): outputs, summary, refusals."""
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import export_mixture
import torch

import bdm_runtime

pytest.importorskip("onnxruntime")
pytest.importorskip("PIL")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bdm_run(*args):
    """Run ``bdm-run`` (as ``python -m bdm_runtime.cli``) from the repository root."""
    return subprocess.run([sys.executable, "-m", "bdm_runtime.cli"] + [str(a) for a in args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def mixture_onnx(tmp_path_factory):
    """The exact mixture denoiser as a step graph (its path)."""
    torch.set_num_threads(1)
    return export_mixture(tmp_path_factory.mktemp("mix"), default_steps=8)[0]


@pytest.fixture(scope="module")
def cond_onnx(tiny_cond_checkpoint, tmp_path_factory):
    from bdm_train.checkpoint import load
    from bdm_export import export_onnx

    model, process, config = load(tiny_cond_checkpoint)
    path = str(tmp_path_factory.mktemp("cond") / "cond.onnx")
    export_onnx(model, process, path, channels=model.in_channels, num_classes=model.num_classes, default_steps=4)
    return path, model.num_classes


def test_full_run_writes_grid_pngs_and_npz(mixture_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = bdm_run("--engine", mixture_onnx, "--n", 5, "--seed", 3, "--first-index", 2, "--steps", 6,
                   "--batch", 2, "--out", out / "grid.png", "--out-dir", out / "imgs", "--npz", out / "s.npz")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()
    assert len(summary) == 1
    assert "5 images" in summary[0] and "images/s" in summary[0] and "backend ort (CPUExecutionProvider)" in summary[0]
    assert "sampling" in proc.stderr  # the progress bar goes to stderr
    # The files hold exactly what the library produces for the same seed, index and steps.
    with bdm_runtime.load(mixture_onnx) as s:
        ref = s.generate(5, seed=3, first_index=2, steps=6)
    with np.load(out / "s.npz") as z:
        assert np.array_equal(z["images"], ref) and "labels" not in z
    from PIL import Image

    names = sorted(os.listdir(out / "imgs"))
    assert names == [f"{i:06d}.png" for i in range(2, 7)]  # named by index in the seed's sequence
    assert np.array_equal(np.asarray(Image.open(out / "imgs" / "000004.png")), ref[2, ..., 0])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10)        # 3 columns x 2 rows of 8x8 with 2-pixel padding
    assert np.array_equal(grid[2:10, 2:10], ref[0, ..., 0])
    assert sorted(os.listdir(out)) == ["grid.png", "imgs", "s.npz"]  # no temporary files left


def test_conditional_run_with_labels_and_guidance(cond_onnx, tmp_path):
    path, k = cond_onnx
    proc = bdm_run("--engine", path, "--n", 3, "--label", "0,1,0", "--guidance", 1.5, "--quiet",
                   "--npz", tmp_path / "c.npz")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no bar
    with np.load(tmp_path / "c.npz") as z:
        images, labels = z["images"], z["labels"]
    assert labels.tolist() == [0, 1, 0] and images.shape[0] == 3
    with bdm_runtime.load(path) as s:
        assert np.array_equal(images, s.generate(3, labels=[0, 1, 0], guidance=1.5))


def _plan_files(folder):
    plan = folder / "random.plan"
    plan.write_bytes(np.random.default_rng(0).bytes(4096))
    return plan


def _plain_onnx(folder):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["z"], ["y"])], "g",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = folder / "plain.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def _file_in(folder):
    """A plain file in ``folder`` (to name a folder below it)."""
    path = folder / "file.txt"
    path.write_text("")
    return path


@pytest.mark.parametrize("case", ["random_plan", "plain_onnx", "missing", "n0", "eta2", "label_range",
                                  "label_float", "label_uncond", "no_output", "bad_folder", "out_dir_under_file",
                                  "unknown_option", "guidance_uncond", "threads0"])
def test_mistakes_are_one_line_and_leave_nothing(case, mixture_onnx, request, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    outputs = ["--out", out / "grid.png", "--out-dir", out / "imgs", "--npz", out / "s.npz"]
    args = {
        "random_plan": lambda: ["--engine", _plan_files(models)] + outputs,
        "plain_onnx": lambda: ["--engine", _plain_onnx(models)] + outputs,
        "missing": lambda: ["--engine", models / "nope.onnx"] + outputs,
        "n0": lambda: ["--engine", mixture_onnx, "--n", 0] + outputs,
        "eta2": lambda: ["--engine", mixture_onnx, "--eta", 2] + outputs,
        "label_range": lambda: ["--engine", cond[0], "--label", cond[1] + 1] + outputs,
        "label_float": lambda: ["--engine", mixture_onnx, "--label", "0,1.5"] + outputs,
        "label_uncond": lambda: ["--engine", mixture_onnx, "--label", 1] + outputs,
        "no_output": lambda: ["--engine", mixture_onnx],
        "bad_folder": lambda: ["--engine", mixture_onnx, "--out", out / "no" / "such" / "grid.png"],
        "out_dir_under_file": lambda: ["--engine", mixture_onnx, "--out-dir", _file_in(models) / "imgs"],
        "unknown_option": lambda: ["--engine", mixture_onnx, "--colour", "red"] + outputs,
        "guidance_uncond": lambda: ["--engine", mixture_onnx, "--guidance", 2] + outputs,
        "threads0": lambda: ["--engine", mixture_onnx, "--threads", 0] + outputs,
    }[case]
    cond = request.getfixturevalue("cond_onnx") if case == "label_range" else None
    args = args()
    models_before = sorted(os.listdir(models))
    proc = bdm_run(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert os.listdir(out) == []
    assert sorted(os.listdir(models)) == models_before
    if case in ("random_plan", "plain_onnx", "missing"):
        assert os.path.basename(str(args[1])) in lines[0]  # the message names the file


def test_help():
    proc = bdm_run("--help")
    assert proc.returncode == 0
    for flag in ("--engine", "--n", "--seed", "--first-index", "--steps", "--eta", "--label", "--guidance",
                 "--batch", "--backend", "--cuda-graph", "--out", "--out-dir", "--npz"):
        assert flag in proc.stdout
    # Numeric options say their range and default (click's IntRange/FloatRange, show_default).
    text = " ".join(proc.stdout.split())
    for shown in ("[default: 16; x>=1]", "[default: 0; x>=0]", "[0<=x<=1]"):
        assert shown in text, shown


def test_embedding_example(mixture_onnx, tmp_path):
    out = tmp_path / "embed.png"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "embed.py"), mixture_onnx, str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ort (CPUExecutionProvider)" in proc.stdout
    from PIL import Image

    with bdm_runtime.load(mixture_onnx) as s:
        ref = s.generate(16, seed=0)
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid[2:10, 2:10], ref[0, ..., 0])  # the example's seed-0 images, first tile
