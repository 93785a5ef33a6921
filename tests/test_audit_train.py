"""Issue 22, the training and export side: one run per folder, a log that resumes exactly, sizes and
options refused up front, SIGTERM during an export, stale graphs, and the examples' arguments.

Every refusal is one ``Error:`` line with a non-zero exit that leaves every file as it was (by
content hash, hidden files included); every interrupted run leaves nothing of its own.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bdm_export.cli import main as export_main
from bdm_train import checkpoint
from bdm_train.runfolder import LOCK_NAME
from bdm_train.sample_cli import main as sample_main
from bdm_train.train import main as train_main
from bdm_train.train import train
from conftest import ROOT, TINY_MODEL, TINY_TRAIN
from helpers import in_process
from test_reliability import crafted_checkpoint, finished, one_line, run_dir, snapshot, wait_for  # noqa: F401

pytest.importorskip("onnxruntime")
TINY_ARGS = ["--ch", 16, "--ch-mult", "1,2", "--num-res-blocks", 1, "--attn", 8, "--dropout", 0, "--param", "eps",
             "--blur-sigma-max", 3, "--batch-size", 16, "--lr", 2e-3, "--warmup", 5, "--threads", 1, "--quiet",
             "--device", "cpu"]


def python(*args, **kw):
    """A ``python args`` subprocess in the repository root, unbuffered (its output is read while it runs)."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=ROOT, env=env, text=True,
                            stdout=kw.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE, **kw)


def log_steps(folder):
    path = folder / "log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


# -- item 2: one run per folder -----------------------------------------------------------------------
def test_second_run_and_resume_of_a_locked_folder_are_refused(tiny_data, tmp_path, capsys):
    """While a run trains into OUT, a new run and a --resume into OUT are refused, naming the holder; SIGTERM
    releases the lock; the lock file a run killed outright leaves is taken over by the next run."""
    out = tmp_path / "run"
    proc = python("-m", "bdm_train.train", "--data", tiny_data, "--out", out, "--steps", 100000, "--ckpt-every", 2,
                  *TINY_ARGS)
    wait_for(proc, lambda: (out / "model.pt").exists())
    for extra in ([], ["--resume"]):
        code, _, err = in_process(train_main, ["--data", tiny_data, "--out", out, "--steps", 3] + TINY_ARGS + extra,
                                  capsys)
        one_line(code, err, f"run folder {out} is in use by another bdm-train (pid {proc.pid} on host",
                 "another --out")
    proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc, timeout=60)
    one_line(code, err, "terminated")
    assert not [f for f in os.listdir(out) if f.startswith(".")]   # the lock file went with the run
    (out / LOCK_NAME).write_text("pid 4000000 on host gone\n")     # as a run killed outright leaves it
    step = checkpoint.load_state(out / "model.pt")["step"]
    code, _, err = in_process(train_main, ["--out", out, "--resume", "--steps", step + 1, "--quiet"], capsys)
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()


# -- item 10: the log of a resumed run ------------------------------------------------------------------
def test_resumed_log_equals_uninterrupted_log(tiny_data, tmp_path):
    """SIGTERM between a log line and the next checkpoint, then --resume: the log equals an uninterrupted
    run's (timings aside), including the line whose losses straddle the checkpoint (log every 3, checkpoint
    every 10: the checkpoint at 10 carries the losses of step 10)."""
    opts = dict(TINY_TRAIN, steps=15, log_every=3, ckpt_every=10, threads=1)
    train(tiny_data, tmp_path / "ref", progress=False, **TINY_MODEL, **opts)
    out = tmp_path / "run"
    args = ["--data", tiny_data, "--out", out, "--log-every", 3, "--ckpt-every", 10, "--seed", 0] + TINY_ARGS
    proc = python("-m", "bdm_train.train", *args, "--steps", 100000)
    wait_for(proc, lambda: any(s > 10 for s in log_steps(out)))
    proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc, timeout=60)
    assert code == 143, err
    assert max(log_steps(out)) > checkpoint.load_state(out / "model.pt")["step"] == 10   # logged past it
    train(None, out, resume=True, progress=False, steps=15)

    def lines(folder):
        return [{k: v for k, v in json.loads(x).items() if k != "img_per_s"}
                for x in (folder / "log.jsonl").read_text().splitlines()]

    assert lines(out) == lines(tmp_path / "ref")


# -- items 3 and 6, and the ignored options of item 12 --------------------------------------------------
@pytest.fixture()
def rgb_data(tmp_path):
    path = tmp_path / "data" / "rgb.npz"
    path.parent.mkdir()
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8))
    return path


def _cases(tiny_data):
    return {
        "batch_huge": (["--data", tiny_data] + TINY_ARGS + ["--batch-size", 10 ** 7],
                       ["--batch-size 10000000", "of memory", "lower --batch-size"]),
        "image_size_huge": (["--data", tiny_data, "--image-size", 100000, "--fit", "resize"],
                            ["--image-size 100000", "of memory", "96 images of 1x100000x100000"]),
        "attn_missing_level": (["--data", tiny_data, "--attn", 3, "--ch-mult", "1,2"],
                               ["--attn 3", "no 3x3 level", "levels are 16, 8"]),
        "fit_without_size": (["--data", tiny_data, "--fit", "pad"], ["--fit pad needs --image-size"]),
        "size_not_divisible": (["--data", tiny_data, "--ch-mult", "1,2,2,2,2,2"], ["not divisible by 32"]),
    }


@pytest.mark.parametrize("case", ["batch_huge", "image_size_huge", "attn_missing_level", "fit_without_size",
                                  "size_not_divisible"])
def test_train_refusals_create_nothing(case, tiny_data, tmp_path, capsys):
    args, words = _cases(tiny_data)[case]
    before = snapshot(tmp_path)
    code, _, err = in_process(train_main, args + ["--out", tmp_path / "new" / "run", "--steps", 2, "--quiet"], capsys)
    one_line(code, err, *words)
    assert snapshot(tmp_path) == before


def test_resume_with_other_channels_is_one_line(run_dir, rgb_data, capsys):
    before = snapshot(run_dir)
    code, _, err = in_process(train_main, ["--out", run_dir, "--resume", "--data", rgb_data, "--steps", 40,
                                           "--quiet"], capsys)
    one_line(code, err, "has 3 channel(s)", "trained on 1", "model.pt")
    assert snapshot(run_dir) == before


def test_wrong_shape_weight_is_named(tiny_checkpoint, run_dir, tmp_path, capsys):
    import torch

    def widen(state):
        for key in ("model", "ema"):
            state[key]["conv_out.bias"] = torch.zeros(5)

    bad = crafted_checkpoint(tiny_checkpoint, tmp_path / "bad" / "model.pt", widen)
    code, _, err = in_process(sample_main, ["--ckpt", bad, "--out", tmp_path / "g.png", "--quiet"], capsys)
    one_line(code, err, bad, "conv_out.bias", "[5]", "[1]")
    crafted_checkpoint(run_dir / "model.pt", run_dir / "model.pt", widen)
    before = snapshot(run_dir)
    code, _, err = in_process(train_main, ["--out", run_dir, "--resume", "--steps", 40, "--quiet"], capsys)
    one_line(code, err, "conv_out.bias", "[5]", "[1]")
    assert snapshot(run_dir) == before


# -- item 12: the default thread count is stored with the run ------------------------------------------
def test_default_threads_are_stored_and_bounded(tiny_data, tmp_path, monkeypatch):
    from bdm_runtime.limits import cpu_count
    from bdm_train.resources import default_threads

    path = train(tiny_data, tmp_path / "run", progress=False, **TINY_MODEL, **dict(TINY_TRAIN, steps=1))
    assert checkpoint.load_state(path)["config"]["train"]["threads"] == default_threads() >= 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= default_threads() <= cpu_count()


# -- item 9: SIGTERM during bdm-export ----------------------------------------------------------------
# A real SIGTERM, sent by the exporting process to itself at a chosen point (a profile hook): as ONNX
# Runtime's extension module loads, or as Polygraphy's lazy importer imports inside ``is_importable``, whose
# bare ``except:`` swallows the interrupt (the export then went on and published its files, exit 0).
SIGTERM_AT = """
import _imp, os, signal, sys
def hook(frame, event, arg):
    if (POINT == "ort_extension" and event == "c_call" and arg is _imp.create_dynamic
            and "onnxruntime_pybind11_state" in repr(frame.f_locals.get("args"))) \\
            or (POINT == "bare_except" and event == "call" and frame.f_code.co_name == "import_module"
                and frame.f_back.f_code.co_name == "is_importable"):
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGTERM)
POINT = sys.argv[1]
sys.setprofile(hook)
from bdm_export.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("point", ["staged", "ort_extension", "bare_except"])
def test_export_sigterm_leaves_nothing(point, tiny_checkpoint, tmp_path):
    """SIGTERM once the staging folder exists, as ONNX Runtime loads, inside a library's bare ``except:``:
    exit 143 with one line, the user's folder as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file")
    before = snapshot(out)
    proc = python("-c", SIGTERM_AT, point, "--ckpt", tiny_checkpoint, "--out-dir", out, "--check", "--no-engine")
    if point == "staged":
        wait_for(proc, lambda: any(n.startswith(".") for n in os.listdir(out)))
        proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc, timeout=120)
    assert code == 143, err
    one_line(code, err, "terminated (SIGTERM)")
    assert snapshot(out) == before


# -- item 12: stale graphs of an earlier export ---------------------------------------------------------
def test_export_refuses_to_leave_a_stale_fp16_graph(tiny_checkpoint, tmp_path, capsys):
    """Files of an earlier export that this one would not replace are refused by name, and kept."""
    (tmp_path / "bdm_fp16.onnx").write_bytes(b"the FP16 graph of an earlier export")
    (tmp_path / "bdm.plan").write_bytes(b"an engine of an earlier export")
    before = snapshot(tmp_path)
    for args, words in ((["--fp16"], ["bdm.plan is left from an earlier export", "build engines"]),
                        ([], [f"{tmp_path / 'bdm_fp16.onnx'} is left from an earlier export", "add --fp16"])):
        code, _, err = in_process(export_main, ["--ckpt", tiny_checkpoint, "--out-dir", tmp_path, "--no-engine"]
                                  + args, capsys)
        one_line(code, err, *words)
        assert snapshot(tmp_path) == before


def test_makefile_never_picks_an_engine_older_than_its_graph(tmp_path):
    def engine():
        r = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "pe: ; @echo $(call ENGINE,$(D))", "pe",
                            f"D={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    (tmp_path / "bdm.onnx").write_bytes(b"graph")
    (tmp_path / "bdm_fp16.plan").write_bytes(b"engine")
    old = time.time() - 100
    os.utime(tmp_path / "bdm_fp16.plan", (old, old))
    assert engine() == f"{tmp_path}/bdm.onnx"
    os.utime(tmp_path / "bdm.onnx", (old - 100, old - 100))
    assert engine() == f"{tmp_path}/bdm_fp16.plan"


# -- item 12: the examples' arguments -----------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (["examples/embed.py"], ["Missing argument"]),
    (["examples/embed.py", "missing.onnx"], ["missing.onnx"]),
    (["examples/digits_npz.py", "no/such/folder/d.npz"], ["no/such/folder"]),
])
def test_examples_refuse_bad_arguments_in_one_line(args, words, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable] + [os.path.join(ROOT, args[0])] + args[1:], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    one_line(r.returncode, r.stderr, *words)
    assert os.listdir(tmp_path) == []
