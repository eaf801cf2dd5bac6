import pytest
import torch

from ssni.weights_io import load_state_dict, match_state_dict, save_weights
from ssni.checkpoints.registry import load_named, register
from ssni.classifiers import SmallCNN, SmallCNNConfig
from ssni.denoisers import UNet, UNetConfig
from ssni.errors import CheckpointError


def registered(tmp_path, model, arch):
    digest = save_weights(tmp_path / "m.safetensors", model)
    register(tmp_path, "m", {"arch": arch, "config": model.config.to_dict(), "file": "m.safetensors",
                             "sha256": digest})
    return tmp_path / "m.safetensors"


@pytest.mark.parametrize("arch,model", [("unet", UNet(UNetConfig(base_channels=8, channel_mults=(1, 2)))),
                                        ("small_cnn", SmallCNN(SmallCNNConfig(width=4)))])
def test_registry_round_trip_gives_identical_outputs(tmp_path, arch, model):
    registered(tmp_path, model.eval(), arch)
    loaded = load_named("m", tmp_path)
    x = torch.rand(2, 1, 28, 28)
    args = (x,) if arch == "small_cnn" else (2 * x - 1, torch.tensor([3, 500]))
    assert torch.equal(model(*args), loaded(*args))


def test_corrupted_weight_file_is_refused_with_a_clear_error(tmp_path):
    path = registered(tmp_path, SmallCNN(SmallCNNConfig(width=4)), "small_cnn")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_named("m", tmp_path)


def test_truncated_file_and_unknown_name(tmp_path):
    path = registered(tmp_path, SmallCNN(SmallCNNConfig(width=4)), "small_cnn")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="known: \\['m'\\]"):
        load_named("nope", tmp_path)


def test_mismatched_state_dict_lists_keys_and_shapes(tmp_path):
    small = SmallCNN(SmallCNNConfig(width=4))
    state = small.state_dict()
    state.pop("head.6.bias")
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        match_state_dict(SmallCNN(SmallCNNConfig(width=8)), state, "file.pt")
    message = str(info.value)
    assert "missing (1): head.6.bias" in message and "unexpected (1): extra" in message
    assert "shape mismatch" in message and "expected (8, 1, 3, 3), found (4, 1, 3, 3)" in message


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_needs_explicit_opt_in(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "obj": Payload()}, path)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_state_dict(path)
    assert "code ran" not in capsys.readouterr().out
    load_state_dict(path, allow_pickle=True)
    assert "code ran" in capsys.readouterr().out


def test_plain_torch_state_dict_loads_with_weights_only(tmp_path):
    model = SmallCNN(SmallCNNConfig(width=4))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    match_state_dict(SmallCNN(SmallCNNConfig(width=4)), load_state_dict(tmp_path / "w.pth"), "w.pth")


def test_shipped_manifest_entries_name_their_reproduction_command():
    from ssni.checkpoints.registry import default_weights_dir, load_manifest

    manifest = load_manifest(default_weights_dir())
    for entry in manifest.values():
        assert entry["command"].startswith("ssni train") and "seed" in entry and len(entry["sha256"]) == 64
        assert entry["metrics"] and all(isinstance(v, float) for v in entry["metrics"].values())


@pytest.mark.parametrize("first", ["ssni.weights_io", "ssni.denoisers.score_sde", "ssni.checkpoints.public",
                                   "ssni.checkpoints.edm_pickle", "ssni.evaluate.registries"])
def test_every_module_imports_first_in_a_fresh_interpreter(first):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import {first}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1500:]
