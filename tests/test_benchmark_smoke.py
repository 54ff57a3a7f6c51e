"""The benchmark harness end to end on a tiny random model and tiny synthetic data: outputs are well-formed."""

import json
import math

import pytest

from benchmarks import run

from .conftest import VISION


@pytest.mark.parametrize("model", ["dinov2", "clip"])
def test_harness_writes_well_formed_outputs(tiny_assets, tmp_path, model):
    args = ["--model", str(tiny_assets[model]), "--dataset", str(tiny_assets["dataset"]), "--train-size", "64"]
    args += ["--test-size", "32", "--seeds", "0", "1", "--max-epochs", "2", "--out", str(tmp_path), "--name", "smoke"]
    args += ["--no-progress", "--full-finetune", "--templates", "cifar10"]
    outcome = run.main(args)
    payload = json.loads((tmp_path / "smoke.json").read_text())
    methods = {record["method"] for record in payload["records"]}
    assert methods == set(run.ALL_METHODS)
    assert sum(r["method"] == "residual" for r in payload["records"]) == 2  # cheap methods: every seed
    assert sum(r["method"] == "lora-qv" for r in payload["records"]) == 1
    for record in payload["records"]:
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert set(record["seconds"]) == {"pca", "cache", "train"}
        assert record["peak_rss_mib"] > 0 and record["latency_ms"] > 0
        assert (record["trainable_params"] > 0) == (record["method"] != "zero-shot")
    # the methods with a trained linear head: the same cache (residual), the same loop as lora-qv (lora)
    found = {record["method"]: record for record in payload["records"]}
    head_sizes = set()
    for method, plain in (("residual+head", "residual"), ("residual*+head", "residual*"), ("lora+head", "lora-qv")):
        record = found[method]
        assert math.isfinite(record["test_accuracy"]) and record["head_lr"] > 0
        head_sizes.add(record["trainable_params"] - found[plain]["trainable_params"])
        assert record["adapter_bytes"] > found[plain]["adapter_bytes"] and record["latency_ms"] > 0
    assert len(head_sizes) == 1 and min(head_sizes) > 0  # one linear head, the same size for all three
    assert sum(r["method"] == "residual+head" for r in payload["records"]) == 2  # cheap: every seed
    assert found["residual+head"]["cached"] and found["residual+head"]["seconds"]["pca"] > 0
    assert sum(r["method"] == "lora+head" for r in payload["records"]) == 1
    residual_star = next(r for r in payload["records"] if r["method"] == "residual*")
    lora = next(r for r in payload["records"] if r["method"] == "lora-qv")
    assert residual_star["trainable_params"] < lora["trainable_params"]
    assert residual_star["seconds"]["pca"] > 0 and residual_star["adapter_bytes"] > 0
    assert payload["command"].startswith("python -m benchmarks.run") and "packages" in payload["environment"]
    assert payload["frozen_forward_train_s"] > 0 and payload["encode_seconds"]["train"] > 0  # timed side by side
    # one accounting rule: each method pays for its own pass over train + val images, nobody for the test set
    assert set(payload["frozen_seconds"]) == {"train", "val"}
    probe = next(r for r in payload["records"] if r["method"] == "linear-probe")
    assert probe["seconds"]["cache"] == sum(payload["frozen_seconds"][split] for split in ("train", "val"))
    zero_shot = next(r for r in payload["records"] if r["method"] == "zero-shot")
    assert probe["latency_ms"] != zero_shot["latency_ms"]  # measured with its own head, not copied
    for record in payload["records"]:  # the lower bound: the encoding plus a little, under the total
        if record["method"] in run.RESIDUAL_PRESETS:
            encoding = sum(payload["encode_seconds"][split] for split in ("train", "val"))
            assert encoding < record["floor_seconds"] < sum(record["seconds"].values())
    table = (tmp_path / "smoke.md").read_text()
    assert table.count("\n|") == 2 + len(run.ALL_METHODS) and "A lower bound on total" in table
    for png in outcome["outputs"]["accuracy_png"], outcome["outputs"]["time_png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_runs_every_variant_on_one_encoding(tiny_assets, tmp_path):
    from benchmarks import fidelity

    args = ["--model", str(tiny_assets["dinov2"]), "--dataset", str(tiny_assets["dataset"]), "--train-size", "64"]
    args += ["--test-size", "32", "--seeds", "0", "--max-epochs", "2", "--out", str(tmp_path), "--no-progress"]
    payload = fidelity.main(args)
    variants = {row["variant"] for row in payload["rows"]}
    assert variants == set(fidelity.VARIANTS)  # a centroid head: the normalised-centroid variant runs too
    unit_mean = next(r for r in payload["records"] if r["variant"] == "ln_mean=unit" and r["method"] == "residual*")
    official = next(r for r in payload["records"] if r["variant"] == "official" and r["method"] == "residual*")
    assert unit_mean["adapter_bytes"] < official["adapter_bytes"]  # one head coordinate fewer per head
    auto = [r for r in payload["records"] if r["variant"] == 'lr="auto"']
    assert auto and all(r["lr"] != 0.8 for r in auto)
    table = next(tmp_path.glob("fidelity_*.md")).read_text()
    assert table.count("\n|") == 2 + len(payload["rows"])


def test_head_lr_sweep_trains_each_rate_on_one_setup(tiny_assets, tmp_path, monkeypatch):
    from benchmarks import head_lr, methods

    rates = []
    train = methods.train_residual
    monkeypatch.setattr(methods, "train_residual", lambda *a, **kw: rates.append(kw["head_lr"]) or train(*a, **kw))
    args = ["--model", str(tiny_assets["dinov2"]), "--dataset", str(tiny_assets["dataset"]), "--train-size", "64"]
    args += ["--test-size", "32", "--seeds", "0", "--max-epochs", "2", "--out", str(tmp_path), "--name", "tiny"]
    payload = head_lr.main([*args, "--rates", "0.001", "0.5"])
    assert rates == [0.001, 0.5, 0.001, 0.5]  # each rate reaches train_residual, for residual and residual*
    assert [(row["method"], row["head_lr"]) for row in payload["rows"]] == [
        ("residual+head", 0.001), ("residual+head", 0.5), ("residual*+head", 0.001), ("residual*+head", 0.5),
    ]  # fmt: skip
    assert all(0 <= row["test_accuracy"] <= 1 and len(row["test_accuracies"]) == 1 for row in payload["rows"])
    assert json.loads((tmp_path / "head_lr_tiny.json").read_text())["rows"] == payload["rows"]


def test_ablate_runs_every_factor(tiny_assets, tmp_path):
    from benchmarks import ablate

    args = ["--model", str(tiny_assets["dinov2"]), "--dataset", str(tiny_assets["dataset"]), "--train-size", "64"]
    args += ["--test-size", "32", "--seeds", "0", "--max-epochs", "1", "--out", str(tmp_path), "--no-progress"]
    payload = ablate.main([*args, "--other-dataset", str(tiny_assets["dataset"])])
    levels = {(row["factor"], row["level"]) for row in payload["rows"]}
    assert levels == {(factor, level) for factor, options in ablate.FACTORS.items() for level in options}
    scales = {row["level"]: row["scales"] for row in payload["rows"] if row["factor"] == "units"}
    assert scales["heads"] + scales["MLPs"] == scales["both"]
    assert (tmp_path / "ablate_images.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "ablate_images.md").read_text().count("\n|") == 2 + len(levels)


def test_multitask_benchmark_writes_its_record_and_finds_the_passes_equal(tiny_assets, tmp_path):
    from benchmarks import multitask

    output = tmp_path / "multitask.json"
    args = ["--model", str(tiny_assets["dinov2"]), "--image-size", "32", "--adapters", "3", "--batch", "4"]
    multitask.main([*args, "--repeats", "2", "--output", str(output)])
    record = json.loads(output.read_text())
    assert [row["run"] for row in record["rows"]] == ["one adapted forward", "embed_all_adapters", "separate forwards"]
    assert record["max_abs_difference"] == 0.0 and all(row["ms"] > 0 for row in record["rows"])


def test_paper_grid_runs_every_method_per_reference_and_skips_finished_cells(tiny_assets, tmp_path, capsys):
    from benchmarks import paper

    dataset = str(tiny_assets["dataset"])
    args = ["--models", f"tiny={tiny_assets['dinov2']}", "--datasets", f"a={dataset}", f"b={dataset}"]
    args += ["--references", "other", "target", "--train-size", "64", "--test-size", "32", "--seeds", "0"]
    args += ["--max-epochs", "2", "--no-progress", "--out", str(tmp_path)]
    payload = paper.main(args)
    assert [(cell["model"], cell["dataset"]) for cell in payload["cells"]] == [("tiny", "a"), ("tiny", "b")]
    for cell in payload["cells"]:
        runs = {(r["method"], r["reference"]) for r in cell["records"]}
        assert runs == {("zero-shot", None), ("linear-probe", None)} | {
            (method, reference) for method in paper.RESIDUALS for reference in ("other", "target")
        }
    assert payload["cells"][0]["references"] == {"other": dataset, "target": "its own training images"}
    table = (tmp_path / "paper_grid.md").read_text()
    assert "| tiny | a |" in table and "residual (other)" in table and (tmp_path / "paper_grid.png").stat().st_size
    capsys.readouterr()
    again = paper.main(args)  # resumable: both cells are read back, nothing runs
    assert capsys.readouterr().out.count("done earlier, skipped") == 2 and again["cells"] == payload["cells"]


def test_readout_profile_times_and_lists_the_ops_the_adapter_adds(tiny_assets, capsys):
    from benchmarks import readout_profile

    readout_profile.main(["--model", str(tiny_assets["dinov2"]), "--image-size", "32", "--merged", "--rows", "500"])
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("median ms, batch 1: bare ") for line in lines[:2])
    assert lines[2].startswith("ResiDual, merged: self time per forward added by the adapter")
    # every op is listed (fewer than 500), ranked by a time too noisy to test; the calls it adds are exact: the
    # merged fold copies each of its pieces (ResiDual: each layer's heads and MLP) beside the others, one product
    calls = {line.split()[0]: int(line.split()[-2]) for line in lines[3:]}
    assert calls["aten::addmm"] == 1 and calls["aten::copy_"] >= 2 * VISION["num_hidden_layers"], calls
