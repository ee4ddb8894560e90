"""Inference on a finished run (``jei.predict``, ``jei-predict``): the preprocessing a run saves,
image decoding and its errors, and, on one tiny trained digits run, predictions from another
directory that equal the run's own test evaluation (labels, exits, conformal sets)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jei.conformal import MondrianConformal
from PIL import Image
from safetensors.torch import load_file

from jei.data.base import (
    GraphPreprocessing,
    ImagePreprocessing,
    preprocessing_from_dict,
)
from jei.data.cifar import image_preprocessing
from jei.data.digits import load_digits, raw_digits
from jei.predict import InputError, check_raw_images, decode_image, read_image

QUICK = [
    "data.max_per_split=80",
    "trainer.backbone.epochs=2",
    "trainer.exits.warmup_epochs=2",
    "trainer.exits.epochs=2",
    "trainer.feature_cache=false",
    "policy=budgeted",  # thresholds set on validation for equal exit fractions: every exit is used
]
DIGITS = ImagePreprocessing(channels=1, height=8, width=8, mean=(0.3,), std=(0.4,), max_value=16.0, name="digits")


def script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=600,
        env={"HYDRA_FULL_ERROR": "0", "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


def save_png(pixels: np.ndarray, path: Path, mode: str | None = None) -> Path:
    Image.fromarray(pixels, mode=mode).save(path)
    return path


# --- preprocessing, without a run ------------------------------------------------------------


def test_digits_png_round_trip_is_exact_and_other_grey_levels_snap_to_the_nearest_level():
    levels = torch.arange(17, dtype=torch.float32)
    pixels = DIGITS.to_8bit(levels)
    assert pixels.dtype == torch.uint8 and pixels[0] == 0 and pixels[-1] == 255
    assert torch.equal(DIGITS.from_8bit(pixels), levels)  # every data value survives PNG
    every = DIGITS.from_8bit(torch.arange(256, dtype=torch.uint8))
    assert torch.equal(every, (torch.arange(256, dtype=torch.float64) * 16 / 255).round().float())


def test_digits_preprocessing_gives_the_loaders_tensors_bit_for_bit():
    data = load_digits(max_per_split=60, seed=3)
    pre = data.preprocessing
    assert (pre.channels, pre.height, pre.width, pre.max_value, pre.class_names[3]) == (1, 8, 8, 16.0, "3")
    raw = raw_digits(seed=3, max_per_split=60)
    for split, (images, labels) in raw.items():
        assert torch.equal(pre.normalize(images), data.splits[split].inputs)
        assert torch.equal(labels, data.splits[split].labels)
        # through 8-bit PNG pixels and back
        assert torch.equal(pre.normalize(pre.from_8bit(pre.to_8bit(images))), data.splits[split].inputs)
    assert preprocessing_from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


def test_cifar_preprocessing_matches_the_old_formula():
    pre = image_preprocessing("imagenet", 32, 32, ("a",) * 10, "cifar10")
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(-1, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(-1, 1, 1)
    assert torch.equal(pre.normalize(pixels), pixels.float().div_(255).sub_(mean).div_(std))
    assert torch.equal(pre.from_8bit(pixels), pixels.float())


def test_image_decoding_per_channels(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    raw = read_image(save_png(grey, tmp_path / "grey.png"), DIGITS)
    assert raw.shape == (1, 8, 8) and torch.equal(raw[0], DIGITS.from_8bit(torch.from_numpy(grey)))
    # A grey image saved as RGB is read as grey; a grey image for an RGB run is replicated.
    as_rgb = save_png(np.stack([grey] * 3, -1), tmp_path / "grey_rgb.png")
    assert torch.equal(read_image(as_rgb, DIGITS), raw)
    rgb_run = ImagePreprocessing(channels=3, height=8, width=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(read_image(tmp_path / "grey.png", rgb_run), torch.from_numpy(grey).float().expand(3, 8, 8))


@pytest.mark.parametrize(("make", "problem"), [
    (lambda d: save_png(np.zeros((16, 16), np.uint8), d / "big.png"), "is 16x16 pixels"),
    (lambda d: save_png(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8), d / "colour.png"),
     "is a colour image"),
    (lambda d: save_png(np.zeros((8, 8), np.uint16) + 300, d / "deep.png"), "16-bit, 32-bit or float"),
    (lambda d: save_png(np.zeros((8, 8, 4), np.uint8), d / "clear.png"), "has transparent pixels"),
    (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png", "not a readable image"),
])
def test_mismatching_images_name_the_file_and_the_expected_format(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        read_image(path, DIGITS)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert "8-bit grayscale (1-channel) PNG/JPEG images of 8x8 pixels" in message
    assert "round(p * 16 / 255)" in message
    assert info.value.path == path


def test_a_sweep_folder_or_a_folder_of_other_files_is_refused_with_what_to_pass(tmp_path):
    from jei.predict import expand_inputs, read_record

    for run in ("0", "1"):
        (tmp_path / "sweep" / run).mkdir(parents=True)
        (tmp_path / "sweep" / run / "run.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"run.json is missing; it holds runs in its subfolders \(0, 1\): pass one"):
        read_record(tmp_path / "sweep")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"no json files in this folder; this run takes graphs"):
        expand_inputs([tmp_path / "pngs"], (".json",), "this run takes graphs")


def test_raw_arrays_are_checked_for_shape_and_value_range():
    assert check_raw_images(np.full((2, 8, 8), 16), DIGITS).shape == (2, 1, 8, 8)
    with pytest.raises(InputError, match=r"values in \[-0.5, 1\]: the run expects raw digits values in 0..16"):
        check_raw_images(torch.tensor([-0.5, 1.0]).repeat(32).view(1, 1, 8, 8), DIGITS)
    with pytest.raises(InputError, match=r"shape \[2, 3, 8, 8\]: the run expects raw images \[N, 1, 8, 8\]"):
        check_raw_images(torch.zeros(2, 3, 8, 8), DIGITS)
    with pytest.raises(InputError, match="is a ndarray, not an image"):
        decode_image(np.zeros((8, 8)), DIGITS, "input 0")


def test_graph_json_files_get_the_datasets_transforms(tmp_path):
    pytest.importorskip("torch_geometric")
    from jei.predict import read_graph

    path = tmp_path / "g.json"
    path.write_text(json.dumps({"edge_index": [[0, 1, 1, 2], [1, 0, 2, 1]], "x": [[1, 0], [0, 1], [1, 0]]}))
    pre = GraphPreprocessing(num_node_features=2, edge_dim=None, pe_dim=4)
    graph = pre.apply(read_graph(path))
    assert graph.x.shape == (3, 2) and graph.random_walk_pe.shape == (3, 4)
    with pytest.raises(ValueError, match=r"expected x of shape \[num_nodes, 3\]"):
        GraphPreprocessing(num_node_features=3, edge_dim=None, pe_dim=4).apply(read_graph(path))
    degrees = GraphPreprocessing(num_node_features=3, edge_dim=None, pe_dim=4, degree_features=2)
    path.write_text(json.dumps({"edge_index": [[0, 1, 1, 2], [1, 0, 2, 1]]}))
    assert degrees.apply(read_graph(path)).x.tolist() == [[0, 1, 0], [0, 0, 1], [0, 1, 0]]
    path.write_text("{}")
    with pytest.raises(InputError, match="not a graph file"):
        read_graph(path)


# --- one trained run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits run, launched from its own folder; tests use it from elsewhere."""
    launch = tmp_path_factory.mktemp("launch")
    run_dir = launch / "outputs" / "run"
    result = run_command(script("jei-train"), *QUICK, "hydra.run.dir=outputs/run", cwd=launch)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def test_pngs(trained, tmp_path_factory):
    """The run's test images as lossless 8-bit PNGs (``to_8bit``), named in test-split order."""
    config = json.loads((trained / "run.json").read_text())["config"]["data"]
    images, labels = raw_digits(config["fractions"], config["seed"], config["max_per_split"])["test"]
    folder = tmp_path_factory.mktemp("pngs")
    pre = load_digits(config["fractions"], config["seed"], config["max_per_split"]).preprocessing
    for i, image in enumerate(images):
        save_png(pre.to_8bit(image[0]).numpy(), folder / f"{i:03d}.png")
    return folder, images, labels


def evaluation(run_dir: Path):
    """The run's own test predictions: its saved exit logits under its loaded policy (what
    ``metrics.json`` was computed from; ``early_exit_agreement`` ties them to real early exit)."""
    from jei.model import predict_from_outputs
    from jei.predict import load
    from jei.types import ExitOutputs

    tensors = load_file(str(run_dir / "exit_logits.safetensors"))
    outputs = ExitOutputs(logits=tensors["test.logits"], gate_logits=tensors["test.gate_logits"])
    prediction = predict_from_outputs(outputs, load(run_dir).network.policy)
    return prediction.logits.argmax(-1), prediction.exit_index, tensors["test.labels"]


@pytest.mark.slow
def test_a_run_with_a_closed_exit_writes_strict_json_and_loads_its_policy(tmp_path):
    """``policy.threshold=[0.5,inf,0.5]`` closes exit 1: the run's JSON files stay strict JSON
    (inf as the string "inf"), and the loaded run has the same thresholds and exits."""
    from jei.predict import load

    quick = [o for o in QUICK if not o.startswith("policy=")]
    result = run_command(script("jei-train"), *quick, "policy=max_prob", "policy.threshold=[0.5,inf,0.5]",
                         "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")

    run_dir = tmp_path / "run"
    for name in ("metrics.json", "run.json"):
        document = json.loads((run_dir / name).read_text(), parse_constant=strict)
        assert document["config"]["policy"]["threshold"] == [0.5, "inf", 0.5]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["exit_fractions"][1] == 0.0
    policy = load(run_dir).network.policy
    assert policy.thresholds.tolist() == [0.5, float("inf"), 0.5]
    _, exits, _ = evaluation(run_dir)
    fractions = torch.bincount(exits, minlength=len(metrics["exit_fractions"])).double() / len(exits)
    assert fractions.tolist() == metrics["exit_fractions"]


@pytest.mark.slow
def test_jei_predict_from_another_directory_equals_the_runs_test_evaluation(trained, test_pngs, tmp_path):
    folder, _, labels = test_pngs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_command(script("jei-predict"), str(trained), str(folder), "--alpha", "0.1", "--json", "out.json",
                         cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["input", "label", "p(label)", "exit", "cost"]
    payload = json.loads((elsewhere / "out.json").read_text())
    rows = payload["predictions"]
    assert [Path(r["source"]).name for r in rows] == [f"{i:03d}.png" for i in range(len(labels))]
    for line, row in zip(lines[1:], rows):  # one printed row per file: label, exit, set
        cells = line.split()
        assert cells[0].endswith(Path(row["source"]).name)
        assert (cells[1], cells[3]) == (row["class"], str(row["exit"]))
        assert line.endswith("{" + ", ".join(row["set_names"]) + "}")

    predicted = torch.tensor([r["label"] for r in rows])
    exits = torch.tensor([r["exit"] for r in rows])
    expected_labels, expected_exits, saved_labels = evaluation(trained)
    assert torch.equal(saved_labels, labels)
    assert torch.equal(predicted, expected_labels) and torch.equal(exits, expected_exits)
    assert len(set(exits.tolist())) > 1  # the test is about real early exit: several exits are taken

    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["early_exit_agreement"] == 1.0
    assert (predicted == labels).double().mean().item() == metrics["accuracy"]
    fractions = torch.bincount(exits, minlength=len(metrics["exit_fractions"])).double() / len(exits)
    assert fractions.tolist() == metrics["exit_fractions"]
    costs = torch.tensor(metrics["exit_costs"])[exits]
    assert torch.tensor([r["cost"] for r in rows]).double().tolist() == costs.double().tolist()
    # The conformal sets are the evaluation's: same coverage and mean size at alpha = 0.1.
    sets = torch.zeros(len(rows), 10, dtype=torch.bool)
    for i, row in enumerate(rows):
        sets[i, row["set"]] = True
    evaluated = next(r for r in metrics["conformal"]["results"] if r["alpha"] == 0.1)["per_exit"]
    assert sets[torch.arange(len(labels)), labels].double().mean().item() == evaluated["coverage"]
    assert sets.sum(1).double().mean().item() == pytest.approx(evaluated["mean_set_size"], abs=1e-12)
    for exit_, size in enumerate(evaluated["per_exit_set_size"]):
        if size is not None:
            assert sets[exits == exit_].sum(1).double().mean().item() == pytest.approx(size, abs=1e-12)


@pytest.mark.slow
def test_the_run_record_has_absolute_paths_and_the_evaluations_thresholds(trained):
    record = json.loads((trained / "run.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    config = record["config"]
    assert Path(config["paths"]["shared_data"]).is_absolute() and Path(config["paths"]["data_dir"]).is_absolute()
    assert Path(config["paths"]["cache_dir"]).is_absolute()
    assert record["files"]["backbone"] == "backbone.safetensors"  # trained here: the run's own weights
    assert record["preprocessing"]["max_value"] == 16.0 and record["data"]["class_names"][0] == "0"
    for stored, evaluated in zip(record["conformal"]["alphas"], metrics["conformal"]["results"]):
        assert stored["alpha"] == evaluated["alpha"]
        (summary,) = evaluated["per_exit"]["calibration"]  # calibrate_on=cal: one fold
        assert stored["per_exit"]["thresholds"] == [group["threshold"] for group in summary["groups"]]
        assert stored["per_exit"]["fallback_exits"] == [g["group"] for g in summary["groups"] if g["fell_back"]]
        (overall,) = evaluated["global"]["calibration"]
        assert stored["global"]["threshold"] == overall["threshold"]
    assert record["conformal"]["n_calibration_per_exit"] == metrics["conformal"]["n_calibration_per_exit"]


@pytest.mark.slow
def test_python_api_on_raw_arrays_files_and_prepared_inputs(trained, test_pngs, tmp_path, monkeypatch):
    from jei.predict import load

    folder, images, _ = test_pngs
    monkeypatch.chdir(tmp_path)
    copy = shutil.copytree(trained, tmp_path / "moved run")  # a moved run folder still loads
    predictor = load(copy)
    from_files = predictor.predict(folder)
    from_arrays = predictor.predict(images.numpy())
    config = predictor.record["config"]["data"]
    prepared = load_digits(config["fractions"], config["seed"], config["max_per_split"]).splits["test"].inputs
    from_prepared = predictor.predict_prepared(prepared, batch_size=7)  # batching changes nothing
    for other in (from_arrays, from_prepared):
        assert torch.equal(other.exits, from_files.exits) and torch.equal(other.labels, from_files.labels)
        assert torch.equal(other.sets, from_files.sets)
        assert torch.allclose(other.probs, from_files.probs, rtol=0, atol=1e-6)
    assert torch.equal(from_arrays.probs, from_files.probs)
    row = from_files.rows()[0]
    assert set(row) >= {"label", "class", "probabilities", "exit", "cost", "set"} and len(row["probabilities"]) == 10
    # Stored thresholds equal a fresh calibration on the saved calibration samples; other alphas calibrate.
    settings = predictor.record["conformal"]
    cal = load_file(str(copy / "calibration.safetensors"))
    for alpha in (0.1, 0.2):
        fresh = MondrianConformal(settings["score"], alpha=alpha, min_group_size=settings["min_group_size"],
                                  small_group_policy=settings["small_group_policy"], allow_empty=settings["allow_empty"])
        fresh.calibrate(cal["probs"], cal["labels"], cal["exits"], num_groups=predictor.num_exits)
        assert torch.equal(predictor.conformal(alpha).thresholds, fresh.thresholds)
    assert from_files.sets.sum() <= predictor.predict(folder, alpha=0.05).sets.sum()  # smaller alpha, larger sets
    with pytest.raises(InputError, match="values in"):
        predictor.predict(images.numpy() * 16)  # 0..256: not raw digits values


@pytest.mark.slow
def test_jei_predict_with_native_exits_predicts_as_without(trained, test_pngs, tmp_path):
    folder, _, _ = test_pngs
    outputs = {}
    for name, flags in (("python", ()), ("native", ("--native-exits",))):
        result = run_command(script("jei-predict"), str(trained), str(folder), "--json", f"{name}.json", *flags,
                             cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = json.loads((tmp_path / f"{name}.json").read_text())["predictions"]
    for python, native in zip(outputs["python"], outputs["native"], strict=True):
        assert (native["label"], native["exit"], native["set"]) == (python["label"], python["exit"], python["set"])
        assert native["probabilities"] == pytest.approx(python["probabilities"], abs=1e-5)


@pytest.mark.slow
def test_jei_predict_rejects_an_image_of_another_format_in_one_line(trained, tmp_path):
    bad = save_png(np.zeros((28, 28), np.uint8), tmp_path / "mnist_sized.png")
    result = run_command(script("jei-predict"), str(trained), str(bad), cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"jei-predict: error: {bad}: is 28x28 pixels; the run expects 8-bit grayscale")
    missing = run_command(script("jei-predict"), str(tmp_path / "no-run"), str(bad), cwd=tmp_path)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


@pytest.mark.slow
def test_load_run_rebuilds_the_data_from_any_directory(trained, tmp_path, monkeypatch):
    from jei.build import load_run

    monkeypatch.chdir(tmp_path)
    cfg, data, network = load_run(trained)
    assert data.size("test") == 80 and cfg.data.max_per_split == 80
    inputs = data.splits["test"].inputs
    expected_labels, expected_exits, _ = evaluation(trained)
    result = network.early_exit(inputs)
    assert torch.equal(result.exit_index, expected_exits) and torch.equal(result.logits.argmax(-1), expected_labels)


@pytest.mark.slow
def test_a_run_is_rebuilt_in_its_memory_format_and_with_its_folded_batchnorm(trained):
    """A run trained with trainer.channels_last / fold_batchnorm predicts with its backbone as it
    computed its features (here the record of a plain run, edited: the same weights give the same
    predictions up to rounding)."""
    from jei.memory_format import uses_channels_last
    from jei.predict import build_network, read_record

    record = read_record(trained)
    plain = build_network(record, trained)
    record["config"]["trainer"].update(channels_last=True, fold_batchnorm=True)
    network = build_network(record, trained)
    assert uses_channels_last(network.backbone) and not uses_channels_last(plain.backbone)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    inputs = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(network(inputs).logits, plain(inputs).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_trained_run_compiles_to_a_batch1_program_with_its_exits(trained, tmp_path):
    """From a finished run to one compiled program (``jei.batch1_program``): on the run's own
    (normalised) test inputs it gives the exits and logits of the loaded network's early exit."""
    from jei.batch1_program import compile_batch1
    from jei.predict import load

    network = load(trained).network
    config = json.loads((trained / "run.json").read_text())["config"]["data"]
    inputs = load_digits(config["fractions"], config["seed"], config["max_per_split"]).splits["test"].inputs
    program = compile_batch1(network, inputs[:8], tmp_path / "early_exit.pt2")
    expected, result = network.early_exit(inputs), program.early_exit(inputs)
    assert torch.equal(result.exit_index, expected.exit_index)
    torch.testing.assert_close(result.logits, expected.logits, rtol=1e-5, atol=1e-5)
