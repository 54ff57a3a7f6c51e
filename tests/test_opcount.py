"""Aten ops per forward (issue 28): the counter of ``benchmarks/opcount.py``, and the goals of an adapted forward.

At batch 1 a GPU forward is bound by kernel launches, about one per aten op. The goals, on DINOv2-S at 98 px for
k=64 heads and for ResiDual: merged ≤ 1.20× the bare model's ops, live ≤ 1.30×. A tiny model with DINOv2-S's 12
layers has the same ops per layer as the real one (the real one runs 2 more, interpolating its position
embeddings), so the goals are checked on a tiny 12-layer DINOv2. Every architecture is held to the structure that
meets them: a merged forward adds one op per piece it folds and a fixed handful, a live one at most one more per
piece and a few more.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import get_peft_model

from benchmarks.opcount import METADATA_ONLY, OpCounter, count_ops
from peft_residual import ResiDualConfig, embed_images, fit_residual_bases

from .conftest import KINDS, images, loader, make_model

GOALS = {"live": 1.30, "merged": 1.20}  # adapted ÷ bare ops per batch-1 forward, issue 28
CONFIGS = {"k=64 heads": ResiDualConfig(k=64), "ResiDual": ResiDualConfig.preset("residual")}
LAYERS = 12  # DINOv2-S's depth: the readout's fixed ops weigh as they do there


pytestmark = pytest.mark.usefixtures("one_thread")


def test_counter_counts_kernels_not_views():
    x = torch.ones(3, 3)
    assert count_ops(lambda t: (t.t() @ t).relu().view(-1) + 1, x) == {"mm": 1, "relu": 1, "add": 1}
    assert count_ops(lambda t: t.new_zeros(3).copy_(t[0]).unsqueeze(0).expand(2, 3).sum(), x) == {
        "new_zeros": 1, "copy_": 1, "sum": 1,
    }  # fmt: skip
    assert count_ops(lambda t: t.detach().reshape(9).narrow(0, 1, 4), x) == {}  # views of one storage only
    assert count_ops(lambda t: t.t().reshape(9), x) == {"clone": 1}  # a reshape that must copy is a kernel


def test_an_inference_forward_counts_the_same_in_inference_mode():
    """Under ``inference_mode`` composite ops (linear, reshape) would reach a dispatch mode whole: count_ops counts
    the kernels they run, as under ``no_grad``."""
    linear = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        plain = count_ops(linear, x)
    with torch.inference_mode():
        inside = count_ops(linear, x)
    assert plain == inside == {"addmm": 1}


def test_every_view_of_an_adapted_forward_is_left_out():
    """``METADATA_ONLY`` covers every op that the schema calls a view, in the forwards the goals are measured on."""
    model = get_peft_model(make_model("dinov2"), ResiDualConfig.preset("residual"))
    fit_residual_bases(model, loader(n=64), progress=False)
    x = images(1)
    for merge in (False, True):
        if merge:
            model.merge_adapter()
        with torch.no_grad(), OpCounter() as counter:
            embed_images(model, x)
        assert counter.views and counter.views <= METADATA_ONLY, counter.views - METADATA_ONLY
        assert 0 < sum(counter.kernels().values()) < sum(counter.counts.values())


@pytest.mark.filterwarnings("ignore:k=64 exceeds the rank")
def test_overhead_ops_only_writes_the_counts_beside_the_timings(tiny_assets, tmp_path):
    from benchmarks import overhead

    output, model = tmp_path / "overhead.json", str(tiny_assets["dinov2"])
    output.write_text(json.dumps({"model": model, "image_size": 32, "rows": ["timings"]}))
    overhead.main(["--model", model, "--image-size", "32", "--ops-only", "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["rows"] == ["timings"]  # kept
    ops = record["ops"]
    assert ops["command"].endswith(f"--model {model} --image-size 32 --ops-only --output {output}")
    assert [(row["config"], row["form"]) for row in ops["rows"]] == [
        ("bare", ""), *((name, form) for name in overhead.OP_CONFIGS for form in ("live", "merged")),
    ]  # fmt: skip
    bare, *adapted = (row["ops"] for row in ops["rows"])
    assert 0 < bare < min(adapted) and all(row["ops"] == sum(row["by_op"].values()) for row in ops["rows"])
    assert not set(ops["rows"][1]["by_op"]) & METADATA_ONLY


def adapted_ops(kind: str, config: ResiDualConfig) -> dict[str, int]:
    """Ops of one batch-1 forward of a tiny ``LAYERS``-layer ``kind``: bare, and adapted with ``config`` live and
    merged; and the pieces the adapter folds."""
    x = images(1)
    counts = {"bare": sum(count_ops(embed_images, make_model(kind, num_hidden_layers=LAYERS), x).values())}
    model = get_peft_model(make_model(kind, num_hidden_layers=LAYERS), config)
    with warnings.catch_warnings():  # too few images for all components: the ops do not depend on the data
        warnings.simplefilter("ignore", UserWarning)
        fit_residual_bases(model, loader(n=32), progress=False)
    counts["live"] = sum(count_ops(embed_images, model, x).values())
    counts["live pieces"] = len(model.base_model.readout.residual_fold["default"].maps)
    model.merge_adapter()
    counts["merged"] = sum(count_ops(embed_images, model, x).values())
    counts["merged pieces"] = len(model.base_model.readout.residual_fold["default"].maps)
    return counts


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ops_per_forward_meet_the_goals(config):
    counts = adapted_ops("dinov2", CONFIGS[config])
    ratios = {form: counts[form] / counts["bare"] for form in GOALS}
    assert all(ratios[form] <= goal for form, goal in GOALS.items()), f"{config}: {counts}, {ratios}"


FIXED = 10
"""Ops a merged forward adds beyond one per folded piece (its copy into the staged pieces): the pixel check (3), the
staged pieces' allocation and their one product with the maps (2), the norm statistics and the final scaling (3),
the model's own output added (1), the CLS token put back into a sequence (1)."""
LIVE = 8
"""Ops a live forward adds to a merged one beyond one per folded piece (a piece's direct part, which the merged map
holds, is summed on its own): the scales per column (2), the columns gathered and read out (4), the scales'
constant terms (2)."""
EXPOSED_HEADS = {"open_clip": 20}
"""``nn.MultiheadAttention`` runs fused in the bare model; reading its heads runs it in steps."""


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_forward_adds_one_op_per_folded_piece_and_a_fixed_few(kind, config):
    counts = adapted_ops(kind, CONFIGS[config])
    # each layer's heads (and MLP; live, also the embedding: merged, ResiDual starts from the model's own output
    # and leaves it there, one map fewer to stream)
    assert counts["live pieces"] == (12 if config == "k=64 heads" else 25), counts
    assert counts["merged pieces"] == (12 if config == "k=64 heads" else 24), counts
    merged_bound = counts["merged pieces"] + FIXED + EXPOSED_HEADS.get(kind, 0)
    assert counts["merged"] - counts["bare"] <= merged_bound, counts
    assert counts["live"] - counts["merged"] <= counts["live pieces"] + LIVE, counts
