"""The study's bookkeeping: which point is recommended, the table, CLI refusals (no data or training needed)."""
import numpy as np
import pytest

from benchmarks import study


BLUR = {"bdm": 20.0, "ddpm": 0.0}


def _point(model, eta, steps, fd, clip=True, solver="ddim", grid="uniform"):
    return dict(model=model, blur_sigma_max=BLUR[model], param="eps", solver=solver, grid=grid, eta=eta, steps=steps,
                nfe=steps, fd=fd, kid=fd / 100, kid_std=0.001, n=1000, clip=clip, noisy=0.01)


POINTS = [_point("bdm", 0.0, 10, 30.0), _point("bdm", 0.0, 20, 20.5), _point("bdm", 0.0, 50, 19.0),
          _point("bdm", 1.0, 50, 25.0), _point("bdm", 1.0, 100, 18.8),
          _point("ddpm", 0.0, 10, 28.0), _point("ddpm", 0.0, 20, 21.0), _point("ddpm", 0.0, 50, 20.0),
          _point("ddpm", 1.0, 50, 22.0), _point("ddpm", 1.0, 100, 19.5)]


def test_recommend_takes_the_better_model_and_its_cheapest_point_within_tolerance():
    rec = study.recommend(POINTS)
    # bdm's best is 18.8; 1.1 x 18.8 = 20.68 admits bdm 20 steps (20.5) but not 10 steps (30.0).
    assert (rec["model"], rec["eta"], rec["steps"], rec["fd"]) == ("bdm", 0.0, 20, 20.5)
    tight = study.recommend(POINTS, tolerance=1.0)
    assert (tight["model"], tight["eta"], tight["steps"]) == ("bdm", 1.0, 100)
    assert study.recommend([]) is None
    unclipped = POINTS + [_point("bdm", 0.0, 50, 12.0, clip=False), _point("bdm", 1.0, 100, 13.0, clip=False)]
    rec = study.recommend(unclipped)  # 1.1 x 12 = 13.2 admits only those two; 50 steps is cheaper
    assert (rec["model"], rec["eta"], rec["steps"], rec["clip"]) == ("bdm", 0.0, 50, False)
    swept = POINTS + [_point("bdm", 0.0, 10, 19.9, solver="dpmpp2m", grid="spectral")]
    rec = study.recommend(swept)
    assert (rec["solver"], rec["grid"], rec["steps"]) == ("dpmpp2m", "spectral", 10)


def test_recommend_ships_a_blurring_model_within_ten_percent_of_the_best():
    """Issue 12's rule: DDPM best at 17.5; bdm's 18.8 is within 1.1 x 17.5 = 19.25, so bdm ships."""
    close = [dict(p, fd=p["fd"] - 2) if p["model"] == "ddpm" else p for p in POINTS]
    rec = study.recommend(close)
    assert rec["model"] == "bdm" and "blurring" in rec["rule"]
    far = [dict(p, fd=p["fd"] - 5) if p["model"] == "ddpm" else p for p in POINTS]   # best 14.5: 18.8 is 30% off
    rec = study.recommend(far)
    assert rec["model"] == "ddpm" and (rec["eta"], rec["steps"]) == (0.0, 50)   # 1.1 x 14.5 = 15.95 admits 15.0


def test_markdown_has_one_row_per_model_and_marks_missing_points():
    models = {m: dict(blur_sigma_max=b, param="eps", trained_steps=6000, train_seconds=3600.0, devices=["cpu"])
              for m, b in BLUR.items()}
    points = POINTS[:-1] + [_point("bdm", 0.0, 10, 40.0, clip=False)]
    points += [_point("bdm", 0.0, k, 30.0 - k / 10, solver="dpmpp2m", grid="spectral", clip=False) for k in (5, 10)]
    res = dict(n_samples=1000, models=models, points=points, reference={"fd_train_1000": 1.2},
               legacy_points=[[0.0, 10], [0.0, 20], [0.0, 50], [1.0, 50], [1.0, 100]],
               recommended=study.recommend(points), cheapest=study.report.cheapest_per_model(points), parity=None)
    text = study.markdown(res)
    legacy = [line for line in text.splitlines() if line.startswith(("| bdm | 20", "| ddpm | 0"))]
    assert len(legacy) == 4 and all(r.count("|") == 6 + 5 for r in legacy)  # model x clip, 5 sampler columns
    assert "| yes | 30.00 / 0.300" in legacy[0] and "| no | 40.00 / 0.400 | - |" in legacy[1]
    assert legacy[2].rstrip(" |").endswith("-")  # ddpm eta=1/100 is missing
    sweep = [line for line in text.splitlines() if line.startswith("| bdm | dpmpp2m | spectral")]
    assert sweep == ["| bdm | dpmpp2m | spectral | no | 29.50 (1.0%) | 29.00 (1.0%) | - | - | - |"]  # 5..100 evals
    ancestral = [line for line in text.splitlines() if line.startswith("| bdm | ancestral | uniform")]
    assert ancestral == ["| bdm | ancestral | uniform | yes | - | - | - | 25.00 (1.0%) | 18.80 (1.0%) |"]
    assert "FD 1.20" in text and "Recommended (shipped): bdm" in text and "cheapest within 10%" in text
    best = [line for line in text.splitlines() if line.startswith("| bdm | 29.50")]   # per-cost table: 5 evals
    assert best == ["| bdm | 29.50 (dpmpp2m, spectral, no clip) | 29.00 (dpmpp2m, spectral, no clip) | "
                    "20.50 (ddim eta 0, uniform) | 19.00 (ddim eta 0, uniform) | 18.80 (ancestral, uniform) |"]


def test_settings_sweep_waits_for_the_measured_clip(tmp_path):
    """The solver x grid sweep runs at the clip that gave the better best FD on the legacy points."""
    import json
    import os

    import torch

    s = study.Study(runs=str(tmp_path), models={"bdm": study.MODELS["bdm"]}, n=4, grids=("uniform", "spectral"),
                    nfes=(5,), sde_nfes=(10,))
    assert all((x.solver, x.grid) == ("ddim", "uniform") for x in s.settings("bdm"))   # nothing measured yet
    ck = s.ckpt("bdm")
    os.makedirs(os.path.dirname(ck))
    torch.save({"format": "bdm.checkpoint", "version": 1, "step": 7, "config": {"model": {}, "process": {},
                "sampler": {}}, "model": {}, "ema": {}}, ck)
    for setting in study.common.legacy_settings():
        folder = s.point_dir("bdm", 7, setting)
        os.makedirs(folder)
        with open(os.path.join(folder, "eval.json"), "w") as f:
            json.dump(dict(n=4, fd=10.0 if setting.clip else 9.0), f)
    assert s.sweep_clip("bdm") is False
    # Evaluated points are not sampled again (a fresh machine has the committed eval.json, not the images).
    s.trained = lambda model, allow_partial: 7
    s._sampler = lambda model, clip: pytest.fail("an evaluated point was sampled again")
    s.sample(settings=study.common.legacy_settings())
    sweep = [x for x in s.settings("bdm") if x.grid == "spectral" or x.steps == 5]
    assert {(x.solver, x.grid, x.steps, x.clip) for x in sweep} == {
        (sv, g, 5, False) for sv in ("ddim", "dpmpp2m") for g in ("uniform", "spectral")}
    assert all(x.eta == 0 for x in sweep)   # stochastic points only at ancestral_nfes / sde_nfes, not at 5
    s.ancestral_nfes, s.sde_nfes = (5,), (5,)
    extra = [x for x in s.settings("bdm") if x.eta == 1 and x.steps == 5]
    assert [(x.solver, x.grid, x.clip) for x in extra] == [(sv, g, False) for sv in ("ddim", "dpmpp2m")
                                                           for g in ("uniform", "spectral")]


def test_noisy_fraction_flags_noise_not_smooth_images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    smooth = np.stack([np.uint8(255 * ((xx - 16) ** 2 + (yy - 16) ** 2 < r * r)) for r in range(4, 14)])[:, None]
    noise = rng.integers(0, 256, (10, 32, 32, 1), dtype=np.uint8)
    mixed = np.concatenate([smooth.transpose(0, 2, 3, 1)[:7], noise[:3]])   # NHWC, like the runtime's output
    assert study.noisy_fraction(mixed, smooth, quantile=1.0) == 0.3
    assert study.noisy_fraction(smooth, smooth, quantile=1.0) == 0.0


def test_cli_refuses_unknown_models_and_stages(capsys):
    for args in (["run", "--models", "bdm,gan", "--stages", "report"], ["run", "--stages", "train,deploy"]):
        with pytest.raises(SystemExit) as e:
            study.main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code not in (0, None) and err.startswith("Error: ") and "\n" not in err, err


def test_error_gain_without_blur_is_the_closed_form():
    """DDPM (d = 1): the deterministic step's gain on eps error is |sigma_s - a_s sigma_t / a_t| (B3, B10)."""
    c0 = np.arctan(np.exp(-5.0))
    c1 = np.arctan(np.exp(5.0)) - c0
    a = lambda t: np.sqrt(1 / (1 + np.tan(c1 * t + c0) ** 2))   # noqa: E731  sigmoid(logsnr) = cos^2
    sig = lambda t: np.sqrt(1 - a(t) ** 2)                      # noqa: E731
    grid = np.linspace(1, 0, 21)
    t, s = grid[:-2], grid[1:-1]
    want = np.abs(sig(s) - a(s) * sig(t) / a(t))[t <= 0.5].max()
    got = study.error_gain(blur_values=(0.0, 20.0), step_counts=(20,), eta=0.0)["gain"]
    assert abs(got[0.0][0] - want) < 1e-9
    assert got[20.0][0] > 100 * got[0.0][0]  # blur: frequencies un-blurred within one step amplify the error


def test_plot_shows_each_models_best_per_cost(tmp_path):
    """The envelope keeps the lowest FD per evaluation count; the figure is written (a PNG)."""
    from benchmarks import figures

    points = POINTS + [_point("bdm", 0.0, 50, 12.0, solver="dpmpp2m", grid="edm", clip=False)]
    env = figures.envelope([p for p in points if p["model"] == "bdm"])
    assert {k: p["fd"] for k, p in env.items()} == {10: 30.0, 20: 20.5, 50: 12.0, 100: 18.8}
    assert list(env) == [10, 20, 50, 100] and env[50]["grid"] == "edm"
    models = {m: dict(blur_sigma_max=b, param="eps") for m, b in BLUR.items()}
    out = figures.plot_study(dict(n_samples=1000, models=models, points=points,
                                  reference={"fd_train_1000": 1.2}), str(tmp_path / "q.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _row(model, blur, ch, steps, mean_fd):
    return dict(model=model, blur_sigma_max=blur, ch=ch, steps=steps, mean_fd=mean_fd)


def test_scale_gaps_compare_equal_capacity_and_budget():
    """Issue 19's question: the best blurring model over the best DDPM at the same (ch, steps), and 1.5x."""
    from benchmarks.study.scale_report import gaps

    rows = [_row("ddpm", 0, 16, 6000, 6.0), _row("bdm10-spectral", 10, 16, 6000, 13.5),
            _row("bdm3-spectral", 3, 16, 6000, 8.5), _row("ddpm", 0, 16, 12000, 5.0),
            _row("bdm10-spectral", 10, 16, 12000, 10.0), _row("ddpm-ch32", 0, 32, 6000, 4.0)]
    out = {(g["ch"], g["steps"]): g for g in gaps(rows)}
    assert set(out) == {(16, 6000), (16, 12000)}            # ch 32 has no blurring row yet: no comparison
    assert out[16, 6000]["blur"] == "bdm3-spectral" and out[16, 6000]["ratio"] == round(8.5 / 6.0, 2)
    assert out[16, 6000]["within"] and not out[16, 12000]["within"]     # 1.42 <= 1.5 < 2.0
    assert "ratio_above_floor" not in out[16, 6000]                     # no floor given: none computed
    fixed = {(g["ch"], g["steps"]): g for g in gaps(rows, floor=1.0, blur=10)}
    assert fixed[16, 6000]["blur"] == "bdm10-spectral"                  # blur 3 is better, but not blur 10
    assert fixed[16, 6000]["ratio"] == round(13.5 / 6.0, 2)
    assert fixed[16, 6000]["ratio_above_floor"] == round((13.5 - 1.0) / (6.0 - 1.0), 2)   # 2.5, against 2.25 raw
    assert fixed[16, 12000]["ratio_above_floor"] == round(9.0 / 4.0, 2)
    assert gaps([_row("ddpm", 0, 16, 6000, 6.0), _row("bdm3-spectral", 3, 16, 6000, 8.5)], blur=10) == []
    # with seeds: the ratio's standard error by error propagation, checked against a float64 Monte Carlo
    rng = np.random.default_rng(0)
    a, b = [9.0, 10.0, 11.0], [4.5, 5.0, 5.5]
    seeded = [dict(_row("ddpm", 0, 16, 6000, 5.0), seed_fd=b), dict(_row("bdm10-spectral", 10, 16, 6000, 10.0), seed_fd=a)]
    g = gaps(seeded, floor=1.0)[0]
    draws = (rng.normal(10.0, 1 / np.sqrt(3), 200_000)) / rng.normal(5.0, 0.5 / np.sqrt(3), 200_000)
    assert g["ratio_se"] == pytest.approx(draws.std(), abs=0.01)           # 2.0 +- 0.16
    assert g["ratio_above_floor_se"] > g["ratio_se"]                         # the floor removed: a larger relative spread


def test_scale_settings_follow_the_second_study():
    """Each parameterisation is measured at its best settings per cost, with the clip that suits it."""
    from benchmarks.study.scale import LINES, settings

    for param, clip in (("eps", True), ("spectral", False)):
        ss = settings(param)
        assert [(s.solver, s.eta, s.steps) for s in ss] == [("dpmpp2m", 1.0, 20), ("dpmpp2m", 1.0, 50),
                                                            ("ddim", 1.0, 100)]
        assert all(s.clip is clip for s in ss)
    assert {LINES[m]["ch"] for m in LINES} == {16, 32}
    assert sorted({LINES[m]["blur_sigma_max"] for m in LINES}) == [0.0, 3.0, 5.0, 10.0, 20.0]
