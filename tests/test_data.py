import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ssni.data import (ImageSet, load_cifar10_batch, load_idx_pair, load_image_folder, load_mnist5k, load_split,
                       order_subset, paper_order, split_indices)
from ssni.errors import InputError


def test_mnist5k_is_the_real_embedded_sample():
    data = load_mnist5k()
    assert data.images.shape == (5000, 1, 28, 28) and data.labels.shape == (5000,)
    assert data.images.min() == 0 and data.images.max() == 1
    assert torch.bincount(data.labels).min() > 400  # every digit present
    assert 0.1 < data.images.mean() < 0.15  # MNIST's mean intensity is about 0.13


def test_split_is_deterministic_stratified_and_disjoint():
    labels = load_mnist5k().labels
    a, b = split_indices(labels), split_indices(labels)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: len(v) for k, v in a.items()} == {"train": 4000, "val": 500, "test": 500}
    assert len(torch.unique(torch.cat(list(a.values())))) == 5000
    for part in ("val", "test"):
        counts = torch.bincount(labels[a[part]], minlength=10)
        expected = torch.bincount(labels, minlength=10) * 0.1
        assert torch.all((counts - expected).abs() <= 1)
    assert not torch.equal(split_indices(labels, seed=1)["test"], a["test"])
    first = labels[a["test"][:50]]
    assert len(torch.unique(first)) == 10  # the first images of val/test mix all classes


def test_load_split_rejects_unknown_names():
    with pytest.raises(InputError):
        load_split("mnist-5k", "holdout")
    with pytest.raises(InputError):
        load_split("svhn", "train")


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_files_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 28, 28))
    write_idx(tmp_path / "img.gz", pixels)
    write_idx(tmp_path / "lab", np.arange(6), gz=False)
    data = load_idx_pair(tmp_path / "img.gz", tmp_path / "lab", "idx")
    assert data.images.shape == (6, 1, 28, 28)
    assert torch.allclose(data.images[:, 0] * 255, torch.from_numpy(pixels).float())
    assert data.labels.tolist() == list(range(6))


def test_truncated_idx_file_is_refused(tmp_path):
    write_idx(tmp_path / "img", np.zeros((6, 28, 28)), gz=False)
    (tmp_path / "img").write_bytes((tmp_path / "img").read_bytes()[:-5])
    write_idx(tmp_path / "lab", np.arange(6), gz=False)
    with pytest.raises(InputError, match="truncated"):
        load_idx_pair(tmp_path / "img", tmp_path / "lab", "idx")


def test_cifar10_batch_reads_arrays_and_refuses_code(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (4, 3072)).astype(np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": data, b"labels": [1, 2, 3, 4]}, f)
    batch = load_cifar10_batch(tmp_path / "data_batch_1")
    assert batch.images.shape == (4, 3, 32, 32) and batch.labels.tolist() == [1, 2, 3, 4]
    assert torch.allclose(batch.images[0, 0, 0] * 255, torch.from_numpy(data[0, :32]).float())

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(InputError, match="refusing to unpickle"):
        load_cifar10_batch(tmp_path / "evil")


def test_image_folder_resizes_crops_and_rejects_bad_files(tmp_path):
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), colour).save(tmp_path / cls / "a.png")
    data = load_image_folder(tmp_path, size=16)
    assert data.images.shape == (2, 3, 16, 16) and data.labels.tolist() == [0, 1]
    assert data.images[0, 0].mean() == 1.0 and data.images[1, 2].mean() == 1.0
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable image"):
        load_image_folder(tmp_path, size=16)


def test_an_image_folder_decodes_only_the_images_a_run_picks(tmp_path):
    """ImageNet's folders hold 50,000 (val) and 1.28M (train) images: a run of 128 decodes 128."""
    root = tmp_path / "imagenet"
    for label, cls in enumerate(("n01", "n02", "n03")):
        (root / "test" / cls).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (20, 20), (60 * label, 10 * k, 0)).save(root / "test" / cls / f"{k}.png")
    (root / "test" / "n03" / "1.png").write_bytes(b"not an image")  # file 9 of 12: never picked below
    paper = load_split("imagenet", "test", root, subset="paper", n=3)
    expected = paper_order(12)[:3]  # 6, 11, 4
    assert paper.ids.tolist() == expected.tolist() and paper.labels.tolist() == (expected // 4).tolist()
    assert paper.images.shape == (3, 3, 224, 224)
    first = load_split("imagenet", "test", root, n=2)
    assert first.ids.tolist() == [0, 1] and first.labels.tolist() == [0, 0]
    picked = load_split("imagenet", "test", root, pick=lambda size: torch.tensor([10, 4]))
    assert picked.ids.tolist() == [10, 4] and picked.labels.tolist() == [2, 1]
    assert torch.equal(picked.images[1], load_split("imagenet", "test", root, n=5).images[4])
    with pytest.raises(InputError, match="not a readable image"):
        load_split("imagenet", "test", root)  # all twelve: the broken one is read


# Golden: the reference loaders' own call, np.random.RandomState(0).choice(len(dataset), n, replace=False),
# run in a scratch script outside the repo (numpy 2.4.6). Same call and seed in JiachengZ01/SSNI
# load_data.py (66f2363c19d9c79c979746f3b1c24bacf7259f21; CIFAR-10 n = 512, ImageNet n = 128 in main.py),
# NVlabs/DiffPure data/datasets.py (985703facc13da38d84bcaf52b3bc5b2ef9906f1) and
# ml-postech/robust-evaluation-of-diffusion-based-purification load_data.py (3b98b01d; n = 512 for both).
PAPER_CIFAR10_FIRST10 = [9394, 898, 2398, 5906, 2343, 8225, 5506, 6451, 2670, 3497]  # n = 512 of 10,000
PAPER_CIFAR10_512_LAST, PAPER_CIFAR10_512_SUM = 4539, 2536570
PAPER_IMAGENET_FIRST10 = [11841, 19602, 45519, 25747, 42642, 31902, 30346, 12363, 32490, 26128]  # 128 of 50,000


def test_paper_order_reproduces_the_reference_subsets():
    cifar = paper_order(10000)[:512]
    assert cifar[:10].tolist() == PAPER_CIFAR10_FIRST10
    assert int(cifar[-1]) == PAPER_CIFAR10_512_LAST and int(cifar.sum()) == PAPER_CIFAR10_512_SUM
    assert len(torch.unique(cifar)) == 512
    assert paper_order(50000)[:10].tolist() == PAPER_IMAGENET_FIRST10
    assert paper_order(10000, seed=1)[:10].tolist() != PAPER_CIFAR10_FIRST10


def test_paper_subset_keeps_ids_and_every_head_is_the_reference_draw():
    n = 10000
    test_set = ImageSet(torch.arange(n).float().reshape(n, 1, 1, 1), torch.arange(n) % 10, torch.arange(n), "t")
    paper = order_subset(test_set, "paper").head(512)
    assert paper.ids[:10].tolist() == PAPER_CIFAR10_FIRST10
    assert paper.images.flatten()[:10].tolist() == PAPER_CIFAR10_FIRST10  # images follow their ids
    assert order_subset(test_set, "paper").head(8).ids.tolist() == PAPER_CIFAR10_FIRST10[:8]
    assert order_subset(test_set, "first").head(3).ids.tolist() == [0, 1, 2]
    with pytest.raises(InputError, match="subset"):
        order_subset(test_set, "random")
    mnist = load_split("mnist-5k", "test", subset="paper").head(5)
    assert len(mnist) == 5 and mnist.name == "mnist-5k/test"


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped():
    from ssni.data import convert_image

    ramp = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    sixteen = Image.fromarray(ramp * 257)  # mode I;16: 0..65535
    assert np.array_equal(np.asarray(convert_image(sixteen, "L")), ramp)
    assert np.array_equal(np.asarray(convert_image(sixteen, "RGB")), np.repeat(ramp[..., None], 3, -1))
    eight = Image.fromarray(ramp.astype(np.uint8))
    assert convert_image(eight, "L").tobytes() == eight.tobytes()
