"""Tiny random models of every supported architecture, and reference data for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipVisionConfig,
    BlipVisionModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)

import peft_residual  # noqa: F401  (registers the method)

IMAGE_SIZE = 32
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=8,
    projection_dim=24,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=99,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def make_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = {**VISION, **overrides}
    if kind == "clip_vision":
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    elif kind == "clip_vision_projection":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    elif kind == "clip":
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT, projection_dim=vision["projection_dim"]))
    elif kind == "dinov2":
        vision.pop("projection_dim")
        model = Dinov2Model(Dinov2Config(**vision, layerscale_value=0.7))
    elif kind == "vit":
        vision.pop("projection_dim")
        model = ViTModel(ViTConfig(**vision))
    elif kind == "blip_vision":  # BLIP initialises its vision weights at 1e-10 unless told otherwise
        model = BlipVisionModel(BlipVisionConfig(**vision, initializer_range=0.02))
    elif kind == "blip":
        vision["initializer_range"] = 0.02
        text = {**TEXT, "encoder_hidden_size": vision["hidden_size"], "sep_token_id": 3}
        model = BlipForImageTextRetrieval(
            BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=vision["projection_dim"])
        )
    elif kind == "open_clip":  # with a layer scale, as the LAION ViTs have none but other open_clip ViTs do
        model = make_open_clip(vision, ls_init_value=0.7)
    elif kind == "timm":  # a linear head (as timm's CLIP towers keep their projection) and a layer scale
        model = make_timm(vision, num_classes=vision["projection_dim"], init_values=0.7)
    else:
        raise ValueError(kind)
    return model.eval()


def make_open_clip(vision: dict, **vision_options) -> torch.nn.Module:
    """An ``open_clip.CLIP`` with VISION's vision sizes and TEXT's text sizes (GELU, as its default)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    heads = vision["num_attention_heads"]
    vision_cfg = CLIPVisionCfg(
        layers=vision["num_hidden_layers"], width=vision["hidden_size"], head_width=vision["hidden_size"] // heads,
        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"], patch_size=vision["patch_size"],
        image_size=vision["image_size"], **vision_options,
    )  # fmt: skip
    text_cfg = CLIPTextCfg(
        context_length=16, vocab_size=TEXT["vocab_size"], width=TEXT["hidden_size"],
        heads=TEXT["num_attention_heads"], layers=TEXT["num_hidden_layers"],
    )  # fmt: skip
    return open_clip.CLIP(embed_dim=vision["projection_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg)


def make_timm(vision: dict, **options) -> torch.nn.Module:
    """A ``timm`` VisionTransformer with VISION's sizes and class-token pooling."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=vision["image_size"], patch_size=vision["patch_size"], embed_dim=vision["hidden_size"],
        depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"], **{"global_pool": "token", **options},
    )  # fmt: skip


KINDS = ["clip_vision", "clip_vision_projection", "clip", "dinov2", "vit", "blip_vision", "blip", "open_clip", "timm"]


def run_model(model: torch.nn.Module, pixel_values: torch.Tensor):
    """Call ``model`` (or a PeftModel around it) on images, as its library does."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    library = type(base).__module__.split(".")[0]
    return model(pixel_values) if library in ("open_clip", "timm") else model(pixel_values=pixel_values)


def model_output(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pooled output, or the projected image embedding where the model has a projection."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "encode_image"):  # open_clip
        return model.encode_image(pixel_values)
    if type(base).__module__.startswith("timm."):
        return model(pixel_values)
    if isinstance(base, CLIPModel):
        return model.get_image_features(pixel_values=pixel_values).pooler_output
    if isinstance(base, BlipForImageTextRetrieval):  # its contrastive head, as BLIP's own forward computes it
        return base.vision_proj(base.vision_model(pixel_values=pixel_values).last_hidden_state[:, 0])
    out = model(pixel_values=pixel_values)
    # ViT's pooler is a tanh layer on top, BLIP's normalises twice: the embedding is the once-normed CLS token
    if isinstance(base, (ViTModel, BlipVisionModel)):
        return out.last_hidden_state[:, 0]
    return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def learnable_images(n: int, seed: int, signal: float = 0.3, nuisance: float = 3.0):
    """A 4-class task a tiny random ViT can see: each class brightens every 4th pixel column from its own offset (a
    position inside every patch, so it survives the CLS token's averaging), under a class-independent brightness of
    one channel that dominates the features. The base model's centroids score near chance; rescaling the units
    that carry the nuisance is enough to learn it."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    for i, label in enumerate(labels.tolist()):
        x[i, :, :, label::4] += signal
    x[:, 0] += nuisance * torch.randn(n, 1, 1, generator=generator)
    return x, labels


def loader(n: int = 96, batch: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    x = images(n, seed)
    return [{"pixel_values": x[i : i + batch]} for i in range(0, n, batch)]


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def image_dataset(n: int, num_classes: int = 4, seed: int = 3, learnable: bool = False):
    """A ``datasets.Dataset`` of random images with balanced labels (or of :func:`learnable_images`, 4 classes),
    formatted as torch tensors."""
    import datasets

    x, y = learnable_images(n, seed) if learnable else (images(n, seed), torch.arange(n) % num_classes)
    pixels = datasets.Array3D((3, IMAGE_SIZE, IMAGE_SIZE), "float32")
    features = datasets.Features({"pixel_values": pixels, "label": datasets.ClassLabel(num_classes)})
    data = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "label": y.tolist()}, features=features)
    return data.with_format("torch")


def adapter_accuracies(model_path, dataset_path, adapter, samples: int | None = None) -> tuple[float, float]:
    """Test accuracy of a saved adapter's classifier on the base and on the adapted embeddings, through the public
    API: the yardstick for what the CLI and the examples print."""
    from peft import PeftModel
    from torch.utils.data import DataLoader

    from peft_residual import Classifier, accuracy, embed_batches, load_vision_model
    from peft_residual.data import load_image_dataset, prepare, sample

    model = PeftModel.from_pretrained(load_vision_model(str(model_path)), adapter)
    classifier = Classifier.from_pretrained(Path(adapter) / "classifier")
    test = sample(load_image_dataset(str(dataset_path), "test"), samples, seed=0)
    batches = DataLoader(prepare(test, str(model_path)), batch_size=32)
    base, labels = embed_batches(model, batches, base=True, progress=False)
    adapted, _ = embed_batches(model, batches, progress=False)
    return accuracy(classifier(base), labels), accuracy(classifier(adapted), labels)


def word_tokenizer():
    """A tiny whitespace tokenizer for the tiny CLIP text tower (its ids stay below TEXT['vocab_size'])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "a", "photo", "of", "the", "cat", "dog", "bird", "fish", ".", "big"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")


CLASS_NAMES = ["cat", "dog", "bird", "fish"]


def save_image_dataset(directory, n_train: int = 96, n_test: int = 48, seed: int = 0, image_column: str = "image"):
    """A DatasetDict of PIL images whose brightness pattern depends on the label, saved with save_to_disk."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def split(n: int) -> datasets.Dataset:
        labels = [i % len(CLASS_NAMES) for i in range(n)]
        pictures = []
        for label in labels:
            pixels = rng.integers(0, 60, (IMAGE_SIZE, IMAGE_SIZE, 3))
            pixels[:, label * 8 : (label + 1) * 8] += 180
            pictures.append(Image.fromarray(pixels.astype(np.uint8)))
        features = datasets.Features({image_column: datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
        return datasets.Dataset.from_dict({image_column: pictures, "label": labels}, features=features)

    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(directory))


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """The Hub-compatible server of ``hub_server.py``, with ``huggingface_hub`` in this process pointed at it
    (uploads, downloads, a cache under ``tmp_path``) and logged in, whatever ``HF_HUB_OFFLINE`` said at import."""
    from huggingface_hub import constants, hf_api

    from .hub_server import LocalHub

    with LocalHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)  # behind the module-level functions
        template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        monkeypatch.setenv("HF_TOKEN", hub.state.token)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield hub


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Local model and data set directories like the real assets: a DINOv2 and a CLIP (with tokenizer)."""
    from transformers import BitImageProcessor, CLIPImageProcessor

    root = tmp_path_factory.mktemp("assets")
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    make_model("dinov2").save_pretrained(root / "dinov2")
    BitImageProcessor(size=size, crop_size=crop).save_pretrained(root / "dinov2")
    make_model("clip").save_pretrained(root / "clip")
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(root / "clip")
    word_tokenizer().save_pretrained(root / "clip")
    save_image_dataset(root / "images")
    return {"dinov2": root / "dinov2", "clip": root / "clip", "dataset": root / "images"}


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine it waits for a core (the fits
    in test_fake_cuda and test_opcount took 5x as long with 2 threads on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
