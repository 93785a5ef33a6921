"""Reliability (issue 13): absurd requests, interrupts, full disks and crafted files, against every command.

Each refusal is one ``Error:`` line with a non-zero exit and leaves every file as it was (checked by
content hash, hidden temporaries included); an interrupted or failed run leaves nothing of its own.
"""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bdm_runtime
from bdm_train import checkpoint
from bdm_train.sample_cli import main as sample_main
from bdm_train.train import main as train_main
from bdm_train.train import train
from conftest import ROOT
from bdm_export.cli import main as export_main
from helpers import export_mixture, in_process
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

HUGE_N = 10 ** 12  # images: 58 TiB as an 8x8 .npz, beyond any disk or memory this suite runs on


def snapshot(folder):
    """``{relative path: sha256 of the bytes, or "dir"}`` of everything under ``folder`` (hidden files too)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def one_line(code, err, *words):
    """Assert a refusal: non-zero exit, one ``Error:`` line holding ``words``, no traceback."""
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def command(module, *args, fsize=None, **kw):
    """A ``python -m module args`` subprocess (optionally with a file-size limit: a disk that fills up)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-m", module] + [str(a) for a in args], cwd=kw.pop("cwd", ROOT),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit if fsize else None, **kw)


def finished(proc, timeout=300):
    """``(exit code, stdout, stderr)`` of ``proc``; killed (and the test failed) past ``timeout`` seconds."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running after {timeout} s: {proc.args}")
    return proc.returncode, out, err


def wait_for(proc, ready, timeout=120):
    """Poll ``ready()`` while ``proc`` runs; kill it and fail if it exits first or ``timeout`` passes."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"exit {proc.poll()} before it was ready: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)


def dead_pid():
    """The id of a process that has exited (a run killed outright)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- graphs and checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_cond_checkpoint):
    """``{name: path}``: the mixture graph, a conditional guided graph, a NaN graph and crafted metadata."""
    from bdm_train.diffusion import BlurringDiffusion
    from bdm_export import export_onnx

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("graphs")
    paths = {"mix": export_mixture(folder, default_steps=4)[0]}

    class Nan(torch.nn.Module):
        in_channels, num_classes = 1, 0

        def forward(self, z, t, labels=None):
            return z * float("nan")

    paths["nan"] = str(folder / "nan.onnx")
    export_onnx(Nan(), BlurringDiffusion(8), paths["nan"], channels=1, default_steps=2)
    model, process, _ = checkpoint.load(tiny_cond_checkpoint)
    paths["cond"] = str(folder / "cond.onnx")
    export_onnx(model, process, paths["cond"], channels=1, num_classes=3, default_steps=2)
    crafted = {"default_steps_huge": {fmt.K_DEFAULT_STEPS: 10 ** 9},
               "shape_mismatch": {fmt.K_IMAGE_SHAPE: [1, 16, 16]},
               "shape_huge": {fmt.K_IMAGE_SHAPE: [1, 100000, 100000]},
               "version_true": {fmt.K_FORMAT_VERSION: True},
               "version_float": {fmt.K_FORMAT_VERSION: 1.0},
               "version_string": {fmt.K_FORMAT_VERSION: "1"}}
    for name, changes in crafted.items():
        m = onnx.load(paths["mix"])
        for p in m.metadata_props:
            if p.key in changes:
                p.value = json.dumps(changes[p.key])
        paths[name] = str(folder / f"{name}.onnx")
        onnx.save(m, paths[name])
    return paths


def crafted_checkpoint(src, dst, change):
    """A copy of checkpoint ``src`` at ``dst`` with ``change(state)`` applied."""
    state = checkpoint.load_state(src)
    change(state)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    torch.save(state, dst)
    return str(dst)


@pytest.fixture()
def run_dir(tiny_checkpoint, tmp_path):
    """A copy of the tiny run folder (model.pt at step 30, log.jsonl, a sample grid)."""
    folder = tmp_path / "run"
    shutil.copytree(os.path.dirname(tiny_checkpoint), folder)
    return folder


# -- bdm-run -----------------------------------------------------------------------------------------
RUN_CASES = {
    "n_huge_npz": (["--engine", "mix", "--n", HUGE_N, "--npz", "OUT/s.npz"], ["--npz", "TiB of disk"]),
    "n_huge_grid": (["--engine", "mix", "--n", HUGE_N, "--out", "OUT/g.png"], ["--out", "of memory"]),
    "steps_huge": (["--engine", "mix", "--steps", 10 ** 9, "--out", "OUT/g.png"], ["--steps", "1000000"]),
    "threads_huge": (["--engine", "mix", "--threads", 100000, "--out", "OUT/g.png"], ["threads", "per CPU core"]),
    "default_steps_huge": (["--engine", "default_steps_huge", "--out", "OUT/g.png"], ["bdm.default_steps"]),
    "shape_mismatch": (["--engine", "shape_mismatch", "--out", "OUT/g.png"], ["1x16x16", "z is ?x1x8x8"]),
    "shape_huge": (["--engine", "shape_huge", "--out", "OUT/g.png"], ["1x100000x100000", "z is ?x1x8x8"]),
    "version_true": (["--engine", "version_true", "--out", "OUT/g.png"], ["not an integer"]),
    "version_float": (["--engine", "version_float", "--out", "OUT/g.png"], ["not an integer"]),
    "version_string": (["--engine", "version_string", "--out", "OUT/g.png"], ["not an integer"]),
    "guidance_no_label": (["--engine", "cond", "--guidance", 2, "--out", "OUT/g.png"], ["--label"]),
    "label_huge": (["--engine", "cond", "--label", 10 ** 30, "--out", "OUT/g.png"], ["0..2", str(10 ** 30)]),
    "nan_graph": (["--engine", "nan", "--n", 3, "--out", "OUT/g.png", "--out-dir", "OUT/d", "--npz", "OUT/s.npz"],
                  ["nan.onnx", "non-finite", "image 0"]),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_bdm_run_refusals(case, graphs, tmp_path):
    args, words = RUN_CASES[case]
    (tmp_path / "keep.txt").write_text("the user's file")
    args = [graphs.get(a, a) if isinstance(a, str) else a for a in args]
    args = [a.replace("OUT", str(tmp_path)) if isinstance(a, str) else a for a in args]
    before = snapshot(tmp_path)
    code, _, err = finished(command("bdm_runtime.cli", *args, "--quiet"), timeout=60)
    one_line(code, err, *words)
    assert snapshot(tmp_path) == before


def test_sampler_api_refuses_absurd_requests(graphs):
    with pytest.raises(BdmError, match="at most .* per CPU core"):
        bdm_runtime.load(graphs["mix"], threads=100000)
    with bdm_runtime.load(graphs["mix"]) as s:
        with pytest.raises(BdmError, match="of memory"):
            s.sample(HUGE_N)
        with pytest.raises(BdmError, match=r"1\.\.1000000"):
            s.sample(1, steps=10 ** 9)
        out = np.empty((2, 1, 8, 8), np.float32)
        s.sample(2, out=out, steps=1)  # a caller's buffer: nothing more to allocate
    with bdm_runtime.load(graphs["cond"]) as s:
        with pytest.raises(BdmError, match="guidance needs labels"):
            s.sample(1, guidance=2.0)
        assert np.isfinite(s.sample(1, guidance=2.0, labels=[1])).all()
    for name in ("shape_mismatch", "version_float"):
        with pytest.raises(BdmError, match=name):
            bdm_runtime.load(graphs[name])


def test_bdm_run_streams_and_sigterm_leaves_nothing(graphs, tmp_path):
    """``--n 10^12 --out-dir`` starts at once (nothing the size of --n is allocated); SIGTERM removes its files.

    Staging folders of other runs (a killed one, a live one) and the user's files are left alone (issue 22).
    """
    out = tmp_path / "imgs"
    out.mkdir()
    (out / "keep.png").write_bytes(b"the user's image")
    stale = out / f".staged.{dead_pid()}.abcd1234.tmp"
    live = out / f".staged.{os.getpid()}.abcd1234.tmp"
    for d in (stale, live):
        d.mkdir()
        (d / "000000.png").write_bytes(b"x")
    before = snapshot(out)
    proc = command("bdm_runtime.cli", "--engine", graphs["mix"], "--n", HUGE_N, "--out-dir", out, "--quiet")
    wait_for(proc, lambda: any(len(os.listdir(out / d)) > 100 for d in os.listdir(out)
                               if d.startswith(".staged.") and d not in (stale.name, live.name)))
    proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc, timeout=60)
    assert code == 143
    one_line(code, err, "terminated")
    assert snapshot(out) == before  # the user's file and both other runs' folders kept, nothing of this run


def test_bdm_run_full_disk_leaves_nothing(graphs, tmp_path):
    """The .npz fills the 'disk' after the first chunk: one line naming it, no PNG or grid left behind."""
    (tmp_path / "keep.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    code, _, err = finished(command("bdm_runtime.cli", "--engine", graphs["mix"], "--n", 200, "--steps", 1, "--quiet",
                                    "--out-dir", tmp_path / "d", "--out", tmp_path / "g.png", "--npz",
                                    tmp_path / "s.npz", fsize=8192))
    one_line(code, err, f"cannot write {tmp_path / 's.npz'}", "File too large")
    assert snapshot(tmp_path) == before


def test_bdm_run_streamed_files_hold_the_library_images(graphs, tmp_path):
    """Streaming changes nothing in the files: chunked .npz, folder and grid hold the library's images."""
    code, out, err = finished(command("bdm_runtime.cli", "--engine", graphs["cond"], "--n", 5, "--batch", 2, "--quiet",
                                      "--label", "0,1,2,1,0", "--npz", tmp_path / "s.npz", "--out-dir", tmp_path / "d"))
    assert code == 0, err
    with bdm_runtime.load(graphs["cond"]) as s:
        ref = s.generate(5, labels=[0, 1, 2, 1, 0])
    with np.load(tmp_path / "s.npz") as z:
        assert np.array_equal(z["images"], ref) and z["labels"].tolist() == [0, 1, 2, 1, 0]
    assert sorted(os.listdir(tmp_path)) == ["d", "s.npz"]
    assert sorted(os.listdir(tmp_path / "d")) == [f"{i:06d}.png" for i in range(5)]


# -- bdm-train -----------------------------------------------------------------------------------------
def test_train_refuses_to_replace_a_model(run_dir, tiny_data, capsys):
    before = snapshot(run_dir)
    code, _, err = in_process(train_main, ["--data", tiny_data, "--out", run_dir, "--steps", 1, "--quiet"], capsys)
    one_line(code, err, str(run_dir / "model.pt"), "--resume", "--out")
    with pytest.raises(BdmError, match="already holds a model"):
        train(tiny_data, run_dir, progress=False, steps=1)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("seed", [-1, 2 ** 70])
def test_train_seed_range_names_seed(seed, tiny_data, tmp_path, capsys):
    code, _, err = in_process(train_main, ["--data", tiny_data, "--out", tmp_path / "o", "--seed", seed], capsys)
    one_line(code, err, "--seed", str(seed))
    assert os.listdir(tmp_path) == []


def test_train_threads_bounded(tiny_data, tmp_path, capsys):
    code, _, err = in_process(train_main, ["--data", tiny_data, "--out", tmp_path / "o", "--threads", 100000], capsys)
    one_line(code, err, "--threads", "per CPU core")
    assert os.listdir(tmp_path) == []


def test_resume_past_steps_says_so_and_changes_nothing(run_dir, capsys):
    before = snapshot(run_dir)
    code, out, err = in_process(train_main, ["--out", run_dir, "--resume", "--steps", 5, "--lr", 0.1, "--quiet"],
                                capsys)
    assert code == 0 and out.strip() == str(run_dir / "model.pt")
    assert "already at step 30, --steps is 5: nothing to train" in err
    assert snapshot(run_dir) == before
    assert checkpoint.load_state(run_dir / "model.pt")["config"]["train"]["lr"] != 0.1


def test_resume_without_checkpoint_says_why(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, _, err = in_process(train_main, ["--out", tmp_path / "run", "--resume", "--quiet"], capsys)
    one_line(code, err, "model.pt does not exist", "without --resume")


def test_train_full_disk_is_one_line_and_keeps_the_checkpoint(run_dir):
    """Checkpoint 30 is ~1 MB; a 64 KiB file limit makes the next save fail as a full disk would."""
    before = snapshot(run_dir)["model.pt"]
    code, _, err = finished(command("bdm_train.train", "--out", run_dir, "--resume", "--steps", 31, "--quiet",
                                    "--device", "cpu", fsize=65536))
    one_line(code, err, f"cannot write checkpoint {run_dir / 'model.pt'}", "the previous checkpoint is unchanged")
    assert snapshot(run_dir)["model.pt"] == before
    assert not [f for f in os.listdir(run_dir) if f.startswith(".")]


def test_train_sigterm_removes_temporaries_and_stale_ones(run_dir):
    """SIGTERM while checkpointing every step: exit 143, one line, no temporary file, a loadable model.pt.

    Other processes' temporary checkpoints (a killed run's, a live one's) are left alone (issue 22).
    """
    stale = run_dir / f".model.pt.{dead_pid()}.abcd1234.tmp.pt"
    live = run_dir / f".model.pt.{os.getpid()}.abcd1234.tmp.pt"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    proc = command("bdm_train.train", "--out", run_dir, "--resume", "--steps", 100000, "--ckpt-every", 1,
                   "--log-every", 1, "--quiet", "--device", "cpu")
    wait_for(proc, lambda: len((run_dir / "log.jsonl").read_text().splitlines()) >= 5)  # 3 lines, then 31, 32
    proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc, timeout=60)
    assert code == 143
    one_line(code, err, "terminated")
    assert sorted(f for f in os.listdir(run_dir) if f.startswith(".")) == sorted([live.name, stale.name])
    assert checkpoint.load_state(run_dir / "model.pt")["step"] >= 31


# -- bdm-sample and bdm-export ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_checkpoints(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_ckpts")

    def steps(state):
        state["config"]["sampler"]["steps"] = -3

    def config_string(state):
        state["config"] = "a string"

    def nan(state):
        state["ema"]["conv_out.bias"].fill_(float("nan"))

    return {name: crafted_checkpoint(tiny_checkpoint, folder / name / "model.pt", change)
            for name, change in (("steps", steps), ("config_string", config_string), ("nan", nan))}


def _sample_cases(tiny_checkpoint, bad):
    return {
        "n_huge": (["--ckpt", tiny_checkpoint, "--n", HUGE_N], ["of memory", "--n"]),
        "steps_huge": (["--ckpt", tiny_checkpoint, "--steps", 10 ** 9], ["--steps"]),
        "folder": (["--ckpt", os.path.dirname(tiny_checkpoint)], ["is a folder", "model.pt"]),
        "config_string": (["--ckpt", bad["config_string"]], ["config is a str"]),
        "stored_steps": (["--ckpt", bad["steps"]], ["stored sampler steps -3", "give --steps"]),
        "nan": (["--ckpt", bad["nan"], "--n", 2, "--steps", 2], ["non-finite", "image 0"]),
        "label_huge": (["--ckpt", tiny_checkpoint, "--label", 10 ** 30], ["unconditional"]),
    }


@pytest.mark.parametrize("case", ["n_huge", "steps_huge", "folder", "config_string", "stored_steps", "nan",
                                  "label_huge"])
def test_bdm_sample_refusals(case, tiny_checkpoint, bad_checkpoints, tmp_path, capsys):
    args, words = _sample_cases(tiny_checkpoint, bad_checkpoints)[case]
    (tmp_path / "keep.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    code, _, err = in_process(sample_main, args + ["--out", tmp_path / "g.png", "--npz", tmp_path / "s.npz",
                                                   "--quiet"], capsys)
    line = one_line(code, err, *words)
    assert "--steps must be" not in line
    assert snapshot(tmp_path) == before


def test_bdm_sample_label_huge_on_a_conditional_model(tiny_cond_checkpoint, tmp_path, capsys):
    code, _, err = in_process(sample_main, ["--ckpt", tiny_cond_checkpoint, "--label", 10 ** 30, "--out",
                                            tmp_path / "g.png"], capsys)
    one_line(code, err, "labels must be in 0..2", str(10 ** 30))
    assert os.listdir(tmp_path) == []


def test_bdm_sample_memory_does_not_grow_with_n(tiny_checkpoint, tmp_path):
    """The default batch is bounded: 1000 images peak within 100 MB of 64 images. Measured peaks (one
    thread): 273 MB at n = 64, 281 MB at n = 1000; one batch of 1000 (the old default) took 639 MB."""
    peaks = {}
    for n in (64, 1000):
        code = ("import resource; from bdm_train.sample_cli import main; "
                f"main(['--ckpt', {tiny_checkpoint!r}, '--n', '{n}', '--steps', '1', '--quiet', "
                f"'--device', 'cpu', '--out', {str(tmp_path / f'{n}.png')!r}]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
        assert r.returncode == 0, r.stderr
        peaks[n] = int(r.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    assert peaks[1000] - peaks[64] < 100 * 2 ** 20, peaks


def test_bdm_export_refusals_create_nothing(tiny_checkpoint, bad_checkpoints, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    cases = [
        (["--ckpt", tmp_path / "typo" / "model.pt"], ["does not exist"]),
        (["--ckpt", tiny_checkpoint, "--steps", 0, "--out-dir", tmp_path / "x1"], ["--steps"]),
        (["--ckpt", tiny_checkpoint, "--steps", 10 ** 9, "--out-dir", tmp_path / "x1"], ["--steps", "1000000"]),
        (["--ckpt", bad_checkpoints["steps"], "--out-dir", tmp_path / "x1"], ["stored sampler steps -3",
                                                                                "give --steps"]),
        (["--ckpt", bad_checkpoints["config_string"], "--out-dir", tmp_path / "x1"], ["config is a str"]),
        (["--ckpt", os.path.dirname(tiny_checkpoint), "--out-dir", tmp_path / "x1"], ["is a directory"]),
    ]
    for args, words in cases:
        code, _, err = in_process(export_main, args, capsys)
        one_line(code, err, *words)
        assert snapshot(tmp_path) == before, args


def test_bdm_export_files_appear_together(tiny_checkpoint, tmp_path, capsys):
    """A new nested --out-dir appears in one rename with its graph; no temporary is left."""
    code, out, err = in_process(export_main, ["--ckpt", tiny_checkpoint, "--out-dir", tmp_path / "a" / "b",
                                              "--no-engine"], capsys)
    assert code == 0, err
    assert snapshot(tmp_path).keys() == {"a", "a/b", "a/b/bdm.onnx"}
    assert f"wrote {tmp_path / 'a' / 'b' / 'bdm.onnx'} (fp32" in out
