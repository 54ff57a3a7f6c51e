"""The CLI loads open_clip and timm models as those libraries spell them: a random-weight local checkpoint of each
goes through `train` and `eval`, the Hub spellings load for real from the tests' local Hub server, the spellings
that need the real Hub reach the right library call, and bad spellings exit 2 with the fix."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from peft_residual.models.loading import image_preprocessor, load_tokenizer, load_vision_model, model_source

from .conftest import VISION, save_image_dataset
from .hub_server import LocalHub, Repo
from .testing_utils import run_main

# open_clip's default tokenizer (SimpleTokenizer) has open_clip's vocabulary, so the tiny text tower keeps its size
OPEN_CLIP_CFG = {
    "embed_dim": VISION["projection_dim"],
    "vision_cfg": {
        "image_size": VISION["image_size"], "layers": VISION["num_hidden_layers"], "width": VISION["hidden_size"],
        "head_width": VISION["hidden_size"] // VISION["num_attention_heads"], "patch_size": VISION["patch_size"],
        "mlp_ratio": VISION["intermediate_size"] / VISION["hidden_size"], "ls_init_value": 0.7,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}  # fmt: skip
TIMM_ARGS = dict(
    img_size=VISION["image_size"], patch_size=VISION["patch_size"], embed_dim=VISION["hidden_size"],
    depth=VISION["num_hidden_layers"], num_heads=VISION["num_attention_heads"], num_classes=VISION["projection_dim"],
    mlp_ratio=VISION["intermediate_size"] / VISION["hidden_size"], init_values=0.7, global_pool="token",
)  # fmt: skip
PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random open_clip CLIP in its Hub layout (open_clip_config.json + open_clip_model.safetensors), a random timm
    ViT as timm.models.save_for_hf writes it (config.json + model.safetensors), and a tiny image data set."""
    import open_clip
    import timm

    root = tmp_path_factory.mktemp("libraries")
    torch.manual_seed(0)
    (root / "open_clip").mkdir()
    save_file(open_clip.CLIP(**OPEN_CLIP_CFG).state_dict(), root / "open_clip" / "open_clip_model.safetensors")
    config = {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": PREPROCESS}
    (root / "open_clip" / "open_clip_config.json").write_text(json.dumps(config))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_ARGS)
    timm.models.save_for_hf(vit, root / "timm", model_args=TIMM_ARGS, safe_serialization=True)
    save_image_dataset(root / "images")
    return {"open_clip": root / "open_clip", "timm": root / "timm", "dataset": root / "images"}


def public_api_accuracies(model_name: str, dataset, adapter, image_size=None) -> tuple[float, float]:
    """What `eval` prints, computed through the public API from the same spelling."""
    from peft import PeftModel
    from torch.utils.data import DataLoader

    from peft_residual import Classifier, accuracy, embed_batches
    from peft_residual.data import load_image_dataset, prepare

    model = PeftModel.from_pretrained(load_vision_model(model_name, image_size=image_size), adapter)
    classifier = Classifier.from_pretrained(Path(adapter) / "classifier")
    test = load_image_dataset(str(dataset), "test").shuffle(seed=0)
    batches = DataLoader(prepare(test, model_name, image_size), batch_size=32)
    base, labels = embed_batches(model, batches, base=True, progress=False)
    adapted, _ = embed_batches(model, batches, progress=False)
    return accuracy(classifier(base), labels), accuracy(classifier(adapted), labels)


@pytest.mark.parametrize(
    ("library", "spelling", "size", "head"),
    [("open_clip", "{dir}", None, "zero_shot"), ("timm", "local-dir:{dir}", 16, "centroid")],
)
def test_train_and_eval_a_local_checkpoint(assets, tmp_path, capfd, library, spelling, size, head):
    """open_clip: a directory in its Hub layout, with the zero-shot head from open_clip's own tokenizer. timm: the
    same through `local-dir:`, at another --image-size (timm interpolates its position embeddings)."""
    model, dataset = spelling.format(dir=assets[library]), assets["dataset"]
    sized = ["--image-size", size] if size else []
    source = ["--quiet", "--model", model, "--dataset", dataset, *sized]
    code, out, err = run_main(
        capfd, "train", *source, "--method", "residual*", "--templates", "cifar10", "--epochs", "2",
        "--output", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert "best validation accuracy" in out
    assert json.loads((tmp_path / "classifier" / "classifier.json").read_text())["kind"] == head
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_signature"]["image_size"] == [size or VISION["image_size"]] * 2
    assert any("residual_lambda" in key for key in load_file(tmp_path / "adapter_model.safetensors"))

    code, out, err = run_main(capfd, "eval", *source, "--adapter", tmp_path)
    assert code == 0, err
    base, adapted = public_api_accuracies(model, dataset, tmp_path, size)
    assert out.strip().endswith(f"{100 * base:.2f}%  ResiDual {100 * adapted:.2f}%")


def test_preprocessing_and_tokenizer_are_the_libraries_own(assets):
    """The transform read off the config equals the one each library builds with its model; the tokenizer is
    open_clip's; and `NAME:WEIGHTS_FILE` (a registered open_clip config) loads the same weights."""
    import open_clip
    import timm

    image = Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{assets['open_clip']}")
    assert torch.equal(image_preprocessor(str(assets["open_clip"]))(image), oc_preprocess(image))
    timm_model = timm.create_model(f"local-dir:{assets['timm']}", pretrained=True)
    timm_preprocess = timm.data.create_transform(**timm.data.resolve_data_config(model=timm_model))
    assert torch.equal(image_preprocessor(str(assets["timm"]))(image), timm_preprocess(image))
    assert image_preprocessor(str(assets["timm"]), 16)(image).shape == (3, 16, 16)  # squashed, not cropped
    with pytest.MonkeyPatch.context() as patch:  # a timm before resolve_model_input_args: the same transform
        patch.delattr(timm.models, "resolve_model_input_args")
        assert torch.equal(image_preprocessor(str(assets["timm"]))(image), timm_preprocess(image))
    assert isinstance(load_tokenizer(str(assets["open_clip"])), open_clip.SimpleTokenizer)

    (assets["open_clip"].parent / "configs").mkdir(exist_ok=True)
    (assets["open_clip"].parent / "configs" / "residual-tiny-vit.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(assets["open_clip"].parent / "configs")
    weights = assets["open_clip"] / "open_clip_model.safetensors"
    by_name = load_vision_model(f"residual-tiny-vit:{weights}")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(by_name.encode_image(x), oc_model.eval().encode_image(x))


def test_hub_spellings_load_from_a_hub(assets, tmp_path, capfd, monkeypatch):
    """`hf-hub:ORG/NAME` (an open_clip repo) and `timm/NAME` download through huggingface_hub from the tests' local
    Hub server and fit the same bases as the local checkpoints. In this process: huggingface_hub reads HF_ENDPOINT
    at import, so its constants point at the server instead (a subprocess would cost a second torch import)."""
    import huggingface_hub.constants as hub_constants

    fit = ["fit", "--quiet", "--dataset", assets["dataset"], "--k", "3", "--samples", "32"]
    with LocalHub() as hub:
        for repo, directory in (("user/tiny-open-clip", assets["open_clip"]), ("timm/tiny-vit", assets["timm"])):
            hub.state.repos[repo] = Repo(private=False, files={f.name: f.read_bytes() for f in directory.iterdir()})
        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        for name, model, sized in (
            ("oc", "hf-hub:user/tiny-open-clip", []),
            ("timm", "timm/tiny-vit", ["--image-size", "16"]),
        ):
            code, _, err = run_main(capfd, *fit, "--model", model, *sized, "--output", tmp_path / name)
            assert code == 0, err
    for name in (
        "user/tiny-open-clip/resolve/main/open_clip_model.safetensors",
        "timm/tiny-vit/resolve/main/model.safetensors",
    ):
        assert f"GET /{name}" in hub.state.requests
    for name, local, sized in (("oc", assets["open_clip"], []), ("timm", assets["timm"], ["--image-size", "16"])):
        code, _, err = run_main(capfd, *fit, "--model", local, *sized, "--output", tmp_path / f"local-{name}")
        assert code == 0, err
        from_hub, from_disk = (load_file(tmp_path / d / "adapter_model.safetensors") for d in (name, f"local-{name}"))
        assert from_hub.keys() == from_disk.keys()
        assert all(torch.allclose(from_hub[key], from_disk[key], atol=1e-5) for key in from_hub)


def test_spellings_that_need_the_real_hub_reach_the_library_call(monkeypatch, assets):
    import open_clip
    import timm

    calls = []

    def record(library, model):
        def create(*args, **kwargs):
            calls.append((library, args, kwargs))
            return model

        return create

    monkeypatch.setattr(open_clip, "create_model", record("open_clip", open_clip.CLIP(**OPEN_CLIP_CFG)))
    monkeypatch.setattr(timm, "create_model", record("timm", timm.create_model("vit_tiny_patch16_224", **TIMM_ARGS)))
    load_vision_model("ViT-B-32:openai")
    load_vision_model("ViT-B-16:laion2b_s34b_b88k", image_size=160)
    load_vision_model("timm/vit_small_patch14_dinov2.lvd142m")
    load_vision_model("vit_base_patch16_224.augreg_in21k", image_size=96)
    (open_clip_a, open_clip_b, timm_hub, timm_name) = calls
    assert open_clip_a[1] == ("ViT-B-32", "openai") and open_clip_a[2]["force_quick_gelu"]  # trained with QuickGELU
    assert open_clip_b[1] == ("ViT-B-16", "laion2b_s34b_b88k") and open_clip_b[2]["force_image_size"] == 160
    assert not open_clip_b[2]["force_quick_gelu"]
    assert timm_hub[1] == ("hf-hub:timm/vit_small_patch14_dinov2.lvd142m",) and timm_hub[2] == {"pretrained": True}
    assert timm_name[1] == ("vit_base_patch16_224.augreg_in21k",) and timm_name[2]["dynamic_img_size"]
    assert model_source("ViT-B/32:openai").name == "ViT-B-32"  # OpenAI's spelling, cleaned as open_clip does
    assert model_source("openai/clip-vit-base-patch32").library == "transformers"
    assert model_source("facebook/dinov2-small").library == "transformers"


@pytest.mark.parametrize(
    ("spelling", "message"),
    [
        ("ViT-X-32:openai", "open_clip has no model 'ViT-X-32' (did you mean"),
        ("ViT-B-32:nope", "open_clip has no pretrained tag 'nope' for ViT-B-32 and no file at that path; write "
         "ViT-B-32:TAG with one of its tags (openai, "),
        ("ViT-B-32", "ViT-B-32 is an open_clip model name without weights; write ViT-B-32:TAG"),
        ("vit_base_patch16_224.nope", "timm has no pretrained weights for 'vit_base_patch16_224.nope'; name one of"),
        ("local-dir:{dataset}", "holds neither an open_clip_config.json (open_clip) nor a timm config.json"),
    ],
)  # fmt: skip
def test_bad_spellings_exit_2_with_the_fix(assets, tmp_path, capfd, spelling, message):
    model = spelling.format(dataset=assets["dataset"])
    code, out, err = run_main(capfd, "fit", "--model", model, "--dataset", assets["dataset"], "--output", tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("peft-residual: error: ") and message in err, err


def test_a_library_that_is_not_installed_is_named_with_its_package(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("open_clip", "timm") else find_spec(n))
    expected = "ViT-B-32:openai names a model of open_clip, and open_clip is not installed: pip install open_clip_torch"
    with pytest.raises(ValueError, match=expected):
        model_source("ViT-B-32:openai")
    with pytest.raises(ValueError, match="pip install timm"):
        model_source("timm/vit_small_patch14_dinov2.lvd142m")
    assert model_source("bert-base-uncased").library == "transformers"  # bare names ask only installed libraries


def test_analyze_describes_an_open_clip_models_heads_with_textspan(assets, tmp_path, capfd):
    """open_clip's text tower (encode_text, its own tokenizer) serves TextSpan as transformers' CLIP does: the
    written bank embeddings are open_clip's own, normalised."""
    import torch.nn.functional as F

    from peft_residual.analysis import embed_texts

    model_dir = str(assets["open_clip"])
    code, out, err = run_main(
        capfd, "analyze", "--quiet", "--model", model_dir, "--dataset", assets["dataset"], "--samples", "24",
        "--text-steps", "2", "--output", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert "TextSpan descriptions of 8 heads" in out
    spans = json.loads((tmp_path / "textspan.json").read_text())
    assert len(spans) == 8 and all(len(picks) == 2 for picks in spans.values())
    model, tokenizer = load_vision_model(model_dir), load_tokenizer(model_dir)
    texts = ["a photo of a cat", "a drawing", "a red car"]
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
    torch.testing.assert_close(embed_texts(model, tokenizer, texts, batch_size=2), expected, rtol=1e-5, atol=1e-6)
