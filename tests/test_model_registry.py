"""One model registry over the weights manifest ("shipped") and the public checkpoints ("public")."""

from dataclasses import replace

import pytest

from ssni.checkpoints import models, public
from ssni.errors import CheckpointError


def test_every_name_has_one_source_and_the_manifest_shadows_a_public_name(tiny_weights):
    from ssni.checkpoints.registry import load_manifest, register

    names = [e.name for e in models.all_models(tiny_weights)]
    assert len(names) == len(set(names))
    assert {e.name: e.source for e in models.all_models(tiny_weights)}["mnist-unet"] == "shipped"
    assert models.find_model("cifar10-ddpmpp-deep-vp", tiny_weights).source == "public"
    assert models.find_model("mnist-unet", tiny_weights).kind == "diffusion"
    assert models.find_model("mnist-cnn", tiny_weights).kind == "classifier"
    assert models.find_model("no-such-model", tiny_weights) is None

    entry = load_manifest(tiny_weights)["mnist-cnn"]
    register(tiny_weights, "imagenet-resnet50", entry)  # a folder's own model wins over the public name
    found = models.find_model("imagenet-resnet50", tiny_weights)
    assert found.source == "shipped" and found.kind == "classifier"
    assert type(models.load_model("imagenet-resnet50", tiny_weights)).__name__ == "SmallCNN"


def test_load_model_reads_each_source_and_names_unknown_models(tiny_weights, monkeypatch):
    assert not models.load_model("mnist-cnn", tiny_weights).training
    built = []
    fake = replace(public.PUBLIC["cifar10-ddpmpp-deep-vp"], build=lambda: built.append(1) or models.load_model(
        "mnist-cnn", tiny_weights).train())
    monkeypatch.setitem(public.PUBLIC, "cifar10-ddpmpp-deep-vp", fake)
    model = models.load_model("cifar10-ddpmpp-deep-vp", tiny_weights, random_init=True)
    assert built == [1] and not model.training  # random-init public architecture, in eval mode
    with pytest.raises(CheckpointError, match="not found in"):  # public, no file: says how to get it
        models.load_model("cifar10-ddpmpp-deep-vp", tiny_weights)
    with pytest.raises(CheckpointError, match="no model named 'nope'.*ssni models"):
        models.load_model("nope", tiny_weights)


def test_an_entry_can_say_where_else_its_file_lies(tmp_path, monkeypatch):
    elsewhere = tmp_path / "package" / "model_test.pt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    entry = public.PUBLIC["cifar10-resnet18-autoattack"]
    monkeypatch.setitem(public.PUBLIC, "cifar10-resnet18-autoattack", replace(entry, locate=lambda: elsewhere))
    assert public.public_path("cifar10-resnet18-autoattack", tmp_path / "empty") == elsewhere
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / entry.file).write_bytes(b"y")  # a file in the weights folder comes first
    assert public.public_path("cifar10-resnet18-autoattack", tmp_path / "w") == tmp_path / "w" / entry.file
    monkeypatch.setitem(public.PUBLIC, "cifar10-resnet18-autoattack", replace(entry, locate=lambda: None))
    with pytest.raises(CheckpointError, match="not found"):
        public.public_path("cifar10-resnet18-autoattack", tmp_path / "empty")
