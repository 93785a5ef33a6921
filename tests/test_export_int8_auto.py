"""``--calib-method auto`` (bdm_export.int8_auto): the candidate whose final images on held-out seeds are
closest to FP32's, with every candidate's error recorded; checked against errors computed here independently."""
import numpy as np
import onnx
import pytest

import bdm_runtime
from bdm_export import read_metadata
from bdm_export.cli import main
from bdm_export.int8 import export_int8
from bdm_export.int8_auto import CANDIDATES, HELD_OUT_IMAGES, HELD_OUT_SEED_OFFSET
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from helpers import in_process

STEPS, IMAGES = 4, 3


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, tmp_path_factory):
    """The unconditional tiny model's FP32 step graph, ddim eta 0 by default (deterministic)."""
    from bdm_export.onnx_export import export_onnx
    from bdm_train import checkpoint

    model, process, _ = checkpoint.load(tiny_checkpoint)
    path = str(tmp_path_factory.mktemp("int8_auto") / "bdm.onnx")
    export_onnx(model, process, path, channels=1, default_steps=STEPS, default_eta=0.0)
    return path


def _images(path, seed):
    with bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"], threads=1) as s:
        return s.sample(HELD_OUT_IMAGES, seed=seed).astype(np.float64)


def test_auto_keeps_the_candidate_closest_to_fp32_on_held_out_seeds(fp32, tmp_path):
    auto = str(tmp_path / "auto.onnx")
    meta = export_int8(fp32, auto, images=IMAGES, method="auto")
    calib = meta[fmt.K_CALIBRATION]
    held_out = calib["seed"] + HELD_OUT_SEED_OFFSET
    assert held_out != calib["seed"]                       # not calibration's trajectories
    ref = _images(fp32, held_out)
    errors = {}
    for method in CANDIDATES:                              # each calibration on its own, as bdm-export writes it
        path = str(tmp_path / f"{method}.onnx")
        export_int8(fp32, path, images=IMAGES, method=method)
        errors[method] = float(np.sqrt(np.mean((_images(path, held_out) - ref) ** 2)))
    assert len(set(errors.values())) == len(CANDIDATES)    # the choice is not a tie here
    best = min(errors, key=errors.get)
    assert calib["method"] == best
    assert set(calib["auto"]["errors"]) == set(CANDIDATES)
    for method, e in errors.items():
        assert calib["auto"]["errors"][method] == pytest.approx(e, abs=1e-6)   # rounded to 6 decimals
    assert (calib["auto"]["images"], calib["auto"]["seed"]) == (HELD_OUT_IMAGES, held_out)
    # The graph is exactly the chosen calibration's; only the metadata adds the record of the choice.
    assert onnx.load(auto).graph == onnx.load(str(tmp_path / f"{best}.onnx")).graph
    assert read_metadata(auto) == meta
    with bdm_runtime.load(auto) as s:                      # an ordinary int8 graph to the runtime
        assert s.info.precision == "int8"
        np.testing.assert_array_equal(s.sample(4, seed=5), bdm_runtime.load(
            str(tmp_path / f"{best}.onnx")).sample(4, seed=5))


def test_cli_default_is_auto_on_a_conditional_model(tiny_cond_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = in_process(main, ["--ckpt", tiny_cond_checkpoint, "--out-dir", out, "--no-engine", "--steps",
                                     STEPS, "--int8", "--calib-images", IMAGES], capsys)     # no --calib-method
    assert code == 0, err
    calib = read_metadata(out / "bdm_int8.onnx")[fmt.K_CALIBRATION]
    assert calib["method"] in CANDIDATES and set(calib["auto"]["errors"]) == set(CANDIDATES)
    assert calib["method"] == min(CANDIDATES, key=lambda m: calib["auto"]["errors"][m])
    assert bdm_runtime.load(str(out / "bdm_int8.onnx")).info.precision == "int8"


def test_unknown_method_is_one_error(fp32, tmp_path):
    with pytest.raises(BdmError, match="auto"):
        export_int8(fp32, str(tmp_path / "x.onnx"), images=IMAGES, method="best")
    assert not list(tmp_path.iterdir())


def test_entropy_writes_max_graph_so_auto_skips_it(fp32, tmp_path):
    """Why ``CANDIDATES`` has no "entropy": under bdm's options it is max's graph. If this fails, add it back."""
    for method in ("max", "entropy"):
        export_int8(fp32, str(tmp_path / f"{method}.onnx"), images=IMAGES, method=method)
    assert onnx.load(str(tmp_path / "entropy.onnx")).graph == onnx.load(str(tmp_path / "max.onnx")).graph
    assert "entropy" not in CANDIDATES
