"""The third study's ship stage (issue 19, item 6): the shipping rule on rows, and a whole ship on a tiny model."""
import json
import os

import pytest


def _row(model, blur, ch, steps, seeds, fd20=None, fd50=None, fd100=None, best=20, param=None):
    """A ``scale.json`` row: seed-1 FDs at 20/50/100 evaluations (the study's settings), ``seeds`` at ``best``."""
    from benchmarks.study.common import point_name
    from benchmarks.study.scale import settings

    param = param or ("eps" if blur == 0 else "spectral")
    fds = {point_name(s): v for s, v in zip(settings(param), (fd20, fd50, fd100)) if v is not None}
    best_name = next(point_name(s) for s in settings(param) if s.steps == best)
    fds[best_name] = seeds[0]
    return dict(model=model, blur_sigma_max=float(blur), param=param, ch=ch, steps=steps, precision="fp32", fd=fds,
                best=best_name,
                best_fd=seeds[0], seeds=len(seeds), seed_fd=list(seeds), mean_fd=sum(seeds) / len(seeds),
                spread=max(seeds) - min(seeds) if len(seeds) > 1 else None)


DDPM6K = _row("ddpm", 0, 16, 6000, (5.8, 6.4, 6.8), fd50=6.5, fd100=6.6)          # mean 6.33, spread 1.0


def test_a_better_ddpm_ships_only_beyond_the_seed_spread():
    from benchmarks.study.scale_ship import decide

    clear = _row("ddpm", 0, 16, 12000, (4.7, 4.3, 5.3), fd50=4.8, fd100=5.3)       # 4.77: 1.57 better > 1.0
    d = decide([DDPM6K, clear], DDPM6K, 16)
    assert (d["verdict"], d["branch"], d["recommended"]["steps"]) == ("ship", "ddpm", 12000)
    assert d["margin"] == pytest.approx(6.0 + 1 / 3 - 4.766666, abs=1e-3) and d["spread"] == pytest.approx(1.0)
    close = _row("ddpm", 0, 16, 12000, (5.0, 5.6, 6.1))                           # 5.57: 0.77 better < 1.1
    d = decide([DDPM6K, close], DDPM6K, 16)
    assert d["verdict"] == "keep" and d["recommended"]["steps"] == 6000 and d["spread"] == pytest.approx(1.1)
    # Once shipped, the same row is kept: the stage can be rerun.
    assert decide([DDPM6K, clear], clear, 16)["verdict"] == "keep"


def test_candidates_are_the_shipped_network_size_and_three_seeds():
    from benchmarks.study.scale_ship import decide

    ch32 = _row("ddpm-ch32", 0, 32, 6000, (3.0, 3.1, 3.2))                         # far better, but ch 32
    one_seed = _row("ddpm", 0, 16, 24000, (3.0,))                                   # far better, one seed only
    d = decide([DDPM6K, ch32, one_seed], DDPM6K, 16)
    assert d["verdict"] == "keep" and d["candidate"]["model"] == "ddpm" and d["candidate"]["steps"] == 6000
    assert decide([DDPM6K, ch32], DDPM6K, 32)["candidate"]["model"] == "ddpm-ch32"


def test_a_blurring_model_within_ten_percent_at_its_cost_ships_over_a_better_ddpm():
    """Its best setting costs 50 evaluations: the DDPM's figure there is its seed-1 FD at 50 (its three-seed mean
    is at 20), and within 1.1x of the best such figure the blurring model ships."""
    from benchmarks.study.scale_ship import decide

    ddpm12k = _row("ddpm", 0, 16, 12000, (4.0, 4.2, 4.4), fd50=5.0, fd100=5.2)      # 4.2 at 20, 5.0 at 50
    near = _row("bdm3-spectral", 3, 16, 6000, (5.4, 5.5, 5.6), fd20=7.0, best=50)    # 5.5 <= 1.1 x 5.0
    d = decide([DDPM6K, ddpm12k, near], DDPM6K, 16)
    assert (d["verdict"], d["branch"], d["candidate"]["model"]) == ("ship", "blurring", "bdm3-spectral")
    assert d["reference_fd"] == 5.0 and d["ratio"] == pytest.approx(1.1)
    far = dict(near, mean_fd=5.6)                                                   # 1.12x: the DDPM branch
    d = decide([DDPM6K, ddpm12k, far], DDPM6K, 16)
    assert (d["branch"], d["recommended"]["steps"]) == ("ddpm", 12000)
    # Where the DDPM's own best setting costs the same, its three-seed mean is the reference.
    at20 = _row("bdm3-spectral", 3, 16, 6000, (4.5, 4.6, 4.7), fd50=6.0, best=20)    # 4.6 <= 1.1 x 4.2
    assert decide([ddpm12k, at20], ddpm12k, 16)["reference_fd"] == pytest.approx(4.2)


def test_an_unknown_shipped_model_is_not_replaced_by_a_ddpm():
    from benchmarks.study.scale_ship import decide

    d = decide([DDPM6K], None, 16)
    assert d["verdict"] == "keep" and "measure it" in d["reason"]
    assert decide([DDPM6K], None, 16, present=False)["verdict"] == "ship"   # nothing shipped yet


def _eval(fd, n=1000):
    return dict(n=n, fd=fd, kid=fd / 30, kid_std=0.01, hist=[100] * 10, hist_tv=0.01)


def _write_points(runs, name, step, points):
    from benchmarks.study.common import point_name, write_json
    from benchmarks.study.scale import point_dir

    for (seed, setting), fd in points.items():
        write_json(os.path.join(point_dir(name, step, seed, setting, str(runs)), "eval.json"), _eval(fd))
        assert point_name(setting) in point_dir(name, step, seed, setting, str(runs))


def test_ship_releases_the_rule_s_pick_with_its_card_and_record_then_keeps_it(tmp_path, tiny_checkpoint):
    """A blurring row (the tiny blur-3 model at 30 steps) within 10% of a DDPM replaces the shipped one (the
    same model perturbed, at 15 steps); the cheaper settings are the best of the second study's sweep."""
    import torch

    from bdm_train import checkpoint
    from benchmarks.study.common import sha256, sweep_settings, write_json
    from benchmarks.study.scale import settings
    from benchmarks.study.scale_ship import ship

    runs, results, shipped = tmp_path / "runs", tmp_path / "results", tmp_path / "fmnist32"
    name = "bdm3-spectral"   # a line name of the study; the rows say what the tiny model is (eps, blur 3)
    os.makedirs(runs / name)
    state = checkpoint.load_state(tiny_checkpoint)
    torch.save(state, runs / name / "model_step30.pt")
    old = dict(state, step=15, ema={k: v + 0.01 if v.is_floating_point() else v for k, v in state["ema"].items()})
    torch.save(old, runs / name / "model_step15.pt")
    write_json(str(runs / name / "budget.json"), dict(seconds=90.0, chunks=[
        dict(steps=[0, 15], seconds=40.0, device="cpu x1"), dict(steps=[15, 30], seconds=50.0, device="cpu x1")]))
    checkpoint.release(str(runs / name / "model_step15.pt"), str(shipped / "model.pt"))
    (shipped / "MODEL_CARD.md").write_text("- FD-FMNIST 9.10 at the default\n")
    old_sha = sha256(str(shipped / "model.pt"))

    eps20 = settings("eps")[0]
    rows = [_row("ddpm", 0, 16, 6000, (4.5, 4.7, 4.9), fd50=5.5),
            _row(name, 3, 16, 15, (9.0, 9.2, 9.4), param="eps"),
            _row(name, 3, 16, 30, (5.0, 4.9, 5.1), fd50=6.0, fd100=6.5, param="eps")]   # 5.0 <= 1.1 x 4.7
    write_json(str(results / "scale.json"), dict(rows=rows, gaps=[]))
    points, picked = {(1, eps20): 5.0, (2, eps20): 4.9, (3, eps20): 5.1}, {}
    for k, best in ((5, 14.0), (10, 8.0)):
        sweep = sweep_settings(True, nfes=(k,), ancestral_nfes=(), sde_nfes=(k,))
        assert len(sweep) == 15                                      # 2 solvers x 5 grids, and B16 x 5 grids
        points.update({(1, s): best + 1 + i for i, s in enumerate(sweep)})
        picked[k] = sweep[7]
        points[1, picked[k]] = best                                  # the best of the sweep at k evaluations
    _write_points(runs, name, 30, points)

    d = ship(runs=str(runs), results=str(results), shipped_folder=str(shipped), n=1000)
    assert (d["verdict"], d["branch"]) == ("ship", "blurring")
    new = checkpoint.load_state(str(shipped / "model.pt"))
    assert new["optimizer"] is None and new["step"] == 30
    assert all(torch.equal(new["ema"][k], state["ema"][k]) for k in state["ema"])
    want = dict(steps=20, eta=1.0, clip_denoised=True, solver="dpmpp2m", grid="edm")
    assert {k: new["config"]["sampler"][k] for k in want} == want
    with open(shipped / "config.json") as f:
        assert json.load(f)["sampler"] == new["config"]["sampler"]
    card = (shipped / "MODEL_CARD.md").read_text()
    sha = sha256(str(shipped / "model.pt"))
    assert sha in card and old_sha in card and "FD-FMNIST 9.10 at its default" in card
    assert "FD-FMNIST 5.00" in card and "mean **5.00**" in card and "ch 16" in card
    for k, best in ((5, 14.0), (10, 8.0)):
        assert f"{k} evaluations: FD {best:.2f} ({picked[k].solver}" in card
    with open(results / "scale.json") as f:
        res = json.load(f)
    assert res["shipped"]["sha256"] == sha and res["shipped"]["replaced"]["sha256"] == old_sha
    assert res["shipped"]["cheaper"]["10"]["fd"] == 8.0 and res["shipped"]["seed_fd"] == [5.0, 4.9, 5.1]
    assert (res["rule"]["verdict"], res["rule"]["recommended"]["steps"]) == ("keep", 30)
    assert "Shipped by this study" in (results / "scale.md").read_text()
    with open(results / "scale_ship.json") as f:
        assert json.load(f) == res["shipped"]          # its own file: a report rewriting scale.json keeps it

    before = {p: (shipped / p).read_bytes() for p in ("model.pt", "config.json", "MODEL_CARD.md")}
    again = {p: (results / p).read_bytes() for p in ("scale.json", "scale_ship.json")}
    assert ship(runs=str(runs), results=str(results), shipped_folder=str(shipped), n=1000)["verdict"] == "keep"
    assert {p: (shipped / p).read_bytes() for p in before} == before and {p: (results / p).read_bytes() for p in again} == again


def test_the_second_study_s_ship_refuses_once_the_third_has_shipped(tmp_path):
    """Its stage would put its own pick back over the third study's; it says which stage to run instead. (Its
    runs folder is empty here: were the guard missing, it would stop at "nothing evaluated", writing nothing.)"""
    from bdm_runtime.errors import BdmError
    from benchmarks.study import Study
    from benchmarks.study.common import write_json
    from benchmarks.study.report import ship

    write_json(str(tmp_path / "results" / "scale_ship.json"), dict(model="ddpm", steps=12000))
    study = Study(runs=str(tmp_path / "runs"), results=str(tmp_path / "results"))
    with pytest.raises(BdmError, match=r"third study's ddpm \(12000 steps.*scale --stages ship"):
        ship(study)
    os.remove(tmp_path / "results" / "scale_ship.json")
    with pytest.raises(BdmError, match="nothing evaluated yet"):
        ship(study)
