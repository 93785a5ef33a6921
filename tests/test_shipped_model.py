"""The shipped model (models/fmnist32): what `make demo` uses is what the latest study measured and recommends."""
import hashlib
import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT

FOLDER = os.path.join(ROOT, "models", "fmnist32")
STUDY = os.path.join(ROOT, "benchmarks", "results", "study.json")
SCALE = os.path.join(ROOT, "benchmarks", "results", "scale.json")
SHIP = os.path.join(ROOT, "benchmarks", "results", "scale_ship.json")   # the third study's ship stage's record
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(FOLDER, "model.pt")), reason="no shipped model")


def _read(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def latest():
    """What the latest study that shipped ``models/fmnist32`` recorded: the third study's ship stage (issue 19,
    ``scale_ship.json``) once it replaced the model, else the second study's recommendation."""
    rec, scale = _read(SHIP), _read(SCALE)
    if rec:
        s = rec["sampler"]
        return dict(study="scale", scale=scale, rec=rec, steps=rec["steps"], blur=rec["blur_sigma_max"], fd=rec["fd"],
                    sampler=dict(clip_denoised=s["clip"], steps=s["steps"], eta=s["eta"], solver=s["solver"],
                                 grid=s["grid"]))
    study = _read(STUDY)
    rec = study["recommended"]
    want = dict(clip_denoised=rec["clip"], steps=rec["steps"], eta=rec["eta"])
    if "solver" in rec:   # studies since issue 11 also choose the solver and the time grid
        want.update(solver=rec["solver"], grid=rec["grid"])
    info = study["models"][rec["model"]]
    return dict(study="study", rec=rec, steps=info["trained_steps"], blur=info["blur_sigma_max"], fd=rec["fd"],
                sampler=want)


def test_shipped_model_is_the_recommended_one_with_its_sampler_defaults(latest):
    from bdm_train import checkpoint

    state = checkpoint.load_state(os.path.join(FOLDER, "model.pt"))
    assert state["config"]["sampler"] == latest["sampler"]
    assert state["config"]["process"]["blur_sigma_max"] == latest["blur"]
    assert state["step"] == latest["steps"]
    assert state["optimizer"] is None  # a release: EMA weights only
    assert os.path.getsize(os.path.join(FOLDER, "model.pt")) < 20 * 2 ** 20
    with open(os.path.join(FOLDER, "config.json")) as f:
        assert json.load(f)["sampler"] == state["config"]["sampler"]


def test_the_third_study_s_rule_recommends_what_it_shipped(latest):
    """The rule's latest verdict (``scale.json``, rewritten by every report) keeps the shipped model: a newer,
    better row that it would ship instead means the ship stage is due."""
    from benchmarks.study.common import sha256

    if latest["study"] != "scale":
        pytest.skip("models/fmnist32 is the second study's pick; the third study has not shipped")
    rec, scale = latest["rec"], latest["scale"]
    assert scale.get("shipped") == rec, "scale.json is older than the last ship: run the scale study's report stage"
    verdict = scale["rule"]
    assert rec["sha256"] == sha256(os.path.join(FOLDER, "model.pt"))
    assert verdict["verdict"] == "keep", verdict["reason"]
    assert (verdict["recommended"]["model"], verdict["recommended"]["steps"]) == (rec["model"], rec["steps"])
    assert verdict["recommended"]["mean_fd"] == rec["mean_fd"]


def test_model_card_names_the_file_and_the_measured_quality(latest):
    with open(os.path.join(FOLDER, "MODEL_CARD.md")) as f:
        card = f.read()
    with open(os.path.join(FOLDER, "model.pt"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() in card
    assert re.search(rf"FD-FMNIST {latest['fd']:.2f}\b", card)
    if latest["study"] == "scale":   # the three-seed mean, and the cheaper settings it measured
        assert f"mean **{latest['rec']['mean_fd']:.2f}**" in card
        for k, p in latest["rec"]["cheaper"].items():
            assert f"{k} evaluations: FD {p['fd']:.2f}" in card


def test_shipped_model_samples_garments_not_noise(tmp_path):
    """Through the deployment path (ONNX step graph + runtime) at its default settings, on 8 images."""
    import bdm_runtime
    from bdm_train import checkpoint
    from benchmarks.study import roughness
    from bdm_export import export_onnx

    model, process, config = checkpoint.load(os.path.join(FOLDER, "model.pt"))
    path = str(tmp_path / "bdm.onnx")
    from bdm_runtime.grids import settings

    solver, grid, steps, eta = settings(config["sampler"])   # what bdm-export stores from the checkpoint
    export_onnx(model, process, path, channels=1, num_classes=0, clip_denoised=config["sampler"]["clip_denoised"],
                default_steps=steps, default_eta=eta, default_solver=solver, default_grid=grid)
    with bdm_runtime.load(path) as sampler:
        x = sampler.sample(8, seed=0)
    images = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
    # Real Fashion-MNIST images: median roughness 0.06, 99.9% below 0.16; uniform noise is ~0.33.
    assert np.median(roughness(images)) < 0.16
    assert (images < 32).mean() > 0.2  # a black background, as in the data (a collapsed model gives grey)
