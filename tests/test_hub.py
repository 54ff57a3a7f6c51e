"""push_to_hub and reloading over real HTTP, against the local Hub-compatible server in hub_server.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import make_model
from .hub_server import LocalHub

CLIENT = Path(__file__).resolve().parent / "scripts" / "hub_client.py"
REPO = "user/tiny-residual"


@pytest.fixture
def hub():
    with LocalHub() as server:
        yield server


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    make_model("clip_vision_projection").save_pretrained(directory)
    return directory


def client(hub, *args, token=True, tmp=None, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = hub.state.token
    env["HF_HOME"] = str(tmp / "hf_home") if tmp else env.get("HF_HOME", "")
    if tmp:
        env["TMPDIR"] = str(tmp / "tmp")
        (tmp / "tmp").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(CLIENT), *map(str, args)], capture_output=True, text=True, env=env, check=check
    )


def embeds(directory: Path) -> torch.Tensor:
    return load_file(directory / "embeds.safetensors")["embeds"]


def test_push_uploads_adapter_and_our_card_then_reloads(hub, base_dir, tmp_path):
    client(hub, "push", base_dir, REPO, tmp_path / "pushed", tmp=tmp_path)
    repo = hub.state.repos[REPO]
    assert set(repo.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = repo.files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card
    for tag in ("- residual", "- peft_residual"):
        assert tag in card
    # a base loaded from a local directory: its path is in the text, not in the metadata (no Hub model id)
    assert "base_model:" not in card and f"- {base_dir}" not in card and f"Base model: `{base_dir}`" in card
    assert "Trainable scales: **24**" in card and '"k": 3' in card and "random test images" in card
    assert "import peft_residual" in card and f'PeftModel.from_pretrained(base, "{REPO}")' in card
    assert "transformers model that has been pushed" not in card  # not the generic transformers card

    client(hub, "pull", base_dir, REPO, tmp_path / "pulled", tmp=tmp_path)
    assert torch.equal(embeds(tmp_path / "pulled"), embeds(tmp_path / "pushed"))


@pytest.mark.slow
def test_second_push_updates_the_scales(hub, base_dir, tmp_path):
    client(hub, "push", base_dir, REPO, tmp_path / "first", tmp=tmp_path)
    first = dict(hub.state.repos[REPO].files)
    client(hub, "push", base_dir, REPO, tmp_path / "second", "--scale", "2", tmp=tmp_path)
    repo = hub.state.repos[REPO]
    assert len(repo.commits) == 2
    assert repo.files["adapter_model.safetensors"] != first["adapter_model.safetensors"]
    client(hub, "pull", base_dir, REPO, tmp_path / "pulled", tmp=tmp_path)
    assert torch.equal(embeds(tmp_path / "pulled"), embeds(tmp_path / "second"))
    assert not torch.equal(embeds(tmp_path / "pulled"), embeds(tmp_path / "first"))


@pytest.mark.slow
def test_private_repo_needs_the_token(hub, base_dir, tmp_path):
    client(hub, "push", base_dir, REPO, tmp_path / "pushed", "--private", tmp=tmp_path)
    assert hub.state.repos[REPO].private
    client(hub, "pull", base_dir, REPO, tmp_path / "pulled", tmp=tmp_path)
    assert torch.equal(embeds(tmp_path / "pulled"), embeds(tmp_path / "pushed"))
    anonymous = client(hub, "pull", base_dir, REPO, tmp_path / "anonymous", token=False, tmp=tmp_path, check=False)
    assert anonymous.returncode != 0 and "401" in anonymous.stderr
    assert not (tmp_path / "anonymous").exists()


@pytest.mark.parametrize("failure", ["401", "500", pytest.param("interrupted", marks=pytest.mark.slow)])
def test_failed_push_is_clear_and_leaves_local_files_alone(hub, base_dir, tmp_path, failure):
    if failure == "interrupted":
        hub.state.drop_commits = True
    else:
        hub.state.fail_status = int(failure)
    local = tmp_path / "local_adapter"
    result = client(hub, "push", base_dir, REPO, tmp_path / "out", "--save-local", local, tmp=tmp_path, check=False)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    expected = {"401": "401", "500": "500", "interrupted": "disconnected"}[failure]
    assert expected in last_line.lower() or expected in last_line
    assert sorted(p.name for p in local.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging directory is gone
    repo = hub.state.repos.get(REPO)
    assert repo is None or repo.files == {}


@pytest.mark.slow
def test_importing_the_package_leaves_lora_save_and_push_byte_identical(hub, tmp_path):
    script = CLIENT.parent / "lora_save_push.py"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.state.token, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["HF_HUB_OFFLINE"] = "0"
    env["PYTHONHASHSEED"] = "0"  # PEFT writes target_modules from a set: its order follows string hashing
    outputs = {}
    for flag in ("", "--import-residual"):
        repo = f"user/lora{flag.replace('-', '_')}"
        command = [sys.executable, str(script), str(tmp_path / (flag or "plain")), repo, *([flag] if flag else [])]
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        assert result.stdout.strip().endswith(str(bool(flag)))
        local = {p.name: p.read_bytes() for p in (tmp_path / (flag or "plain")).iterdir()}
        outputs[flag] = (local, dict(hub.state.repos[repo].files))
    plain, imported = outputs[""], outputs["--import-residual"]
    assert sorted(plain[0]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert plain[0] == imported[0]  # save_pretrained: the same bytes
    assert plain[1] == imported[1] and "README.md" in plain[1]  # push_to_hub: the same uploaded files
