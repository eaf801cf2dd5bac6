"""``ssni purify``: purify a folder of images with a configured defense, resumably.

Every image under the input folder (PNG/JPEG/BMP/WebP, any depth) is read, converted to the
config's format (grey 28x28 for MNIST-like data, RGB 32x32 for CIFAR-10, 224 for ImageNet),
purified and written as a PNG under the same relative path in the output folder. Beside them,
``purify.csv`` lists each file's score norm, noise level ``t*`` and the classifier's prediction
on the purified image. Each image's randomness is keyed by its relative path, so a result
does not depend on which other files are in the folder or on how a run was interrupted; a rerun
skips the files already listed in ``purify.csv``. Images go through the network in chunks;
within a chunk, purification uses continuous batching at ``width`` rows per call.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_FORMATS, _resize_crop, convert_image
from .defense import Defense
from .errors import ConfigError, InputError, ResumeError, SSNIWarning
from .evaluate.config import ExperimentConfig
from .evaluate.runner import precision, prepare_model
from .folders import claim, read_json
from .progress import tqdm
from .runtime import on_device, resolve_device

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
COLUMNS = ["file", "score_norm", "t_star", "prediction"]
SHRINK_WARNING = 4.0  # a side shrunk by more than this factor loses most of the image's detail: say so


def find_images(source: Path, skipped: list[Path] | None = None) -> list[Path]:
    """Image files under ``source`` (sorted relative paths); ``skipped`` receives the other files."""
    if not source.is_dir():
        raise InputError(f"{source} is not a folder of images")
    paths = sorted(p.relative_to(source) for p in source.rglob("*"))
    files = [p for p in paths if p.suffix.lower() in SUFFIXES]
    if skipped is not None:
        skipped += [p for p in paths if p.suffix.lower() not in SUFFIXES and (source / p).is_file()]
    if not files:
        raise InputError(f"{source} holds no images ({', '.join(sorted(SUFFIXES))})")
    seen: dict[Path, Path] = {}
    for file in files:
        target = output_name(file)
        if target in seen:
            raise InputError(f"{source / file} and {source / seen[target]} would both be written as {target}; "
                             "rename one of them")
        seen[target] = file
    return files


def skipped_note(source: Path) -> str | None:
    """The ``note:`` text for files under ``source`` that are not images purify reads (``None``: none);
    a folder without images is refused (:func:`find_images`)."""
    skipped: list[Path] = []
    find_images(Path(source), skipped)
    if not skipped:
        return None
    kinds = ", ".join(sorted({p.suffix.lower() or "no extension" for p in skipped}))
    return (f"{len(skipped)} file(s) under {source} skipped ({kinds}): purify reads "
            f"{', '.join(sorted(SUFFIXES))}")


def output_name(file: Path) -> Path:
    """Where the purified version of ``file`` goes, relative to the output folder."""
    return file.with_suffix(".png")


def read_images(source: Path, files: list[Path], dataset: str) -> torch.Tensor:
    """``[B, C, S, S]`` in ``[0, 1]`` in the dataset's format (square images resized to ``S``; 16-bit
    greys scaled, not clipped); a bad, non-square, far too small or far too large file names itself,
    and images shrunk by more than :data:`SHRINK_WARNING` are named in one :class:`SSNIWarning`."""
    from PIL import Image, UnidentifiedImageError

    mode, size = IMAGE_FORMATS[dataset]
    pixels, shrunk = [], []
    for file in files:
        try:
            with Image.open(source / file) as img:
                check_geometry(source / file, img.width, img.height, size)
                image = convert_image(img, mode, source / file)
                pixels.append(_resize_crop(image, size).reshape(size, size, -1))
                shrunk += [(img.width / size, file, img.width)] if img.width > SHRINK_WARNING * size else []
        except Image.DecompressionBombError as err:
            raise InputError(f"{source / file} is too large to decode safely ({err}); shrink it "
                             "first") from err
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"{source / file} is not a readable image ({err}); remove or replace it") from err
    if shrunk:
        factor, file, side = max(shrunk)
        warnings.warn(f"{len(shrunk)} image(s) shrunk more than {SHRINK_WARNING:g}x to the model's "
                      f"{size}x{size}, most {source / file} ({side}x{side}, by {factor:.0f}x): their detail "
                      "is lost", SSNIWarning)
    return torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).copy()).float() / 255


def check_geometry(path: Path, width: int, height: int, size: int) -> None:
    """Only square images are resized to the model's ``size`` (never cropped: a digit at the edge
    would be cut), and never up from less than half of it (that would invent the detail)."""
    if width != height:
        raise InputError(f"{path} is {width}x{height}; the model takes square {size}x{size} images: crop or "
                         "pad it to a square first (ssni does not crop, it could cut the object off)")
    if width < size / 2:
        raise InputError(f"{path} is {width}x{height}, less than half of the model's {size}x{size}; "
                         "upscaling it that far would invent the image")


def image_id(file: Path) -> int:
    """A stable sample id from the relative path (keys the image's randomness)."""
    return zlib.crc32(file.as_posix().encode())


def _read_table(table: Path) -> list[str]:
    """The lines of ``purify.csv`` (header first; none if it is missing). A run killed mid-write
    can leave an empty file or a last line without its newline: that line is dropped (its file
    is simply purified again)."""
    lines = (table.read_text() if table.is_file() else "").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    if lines and lines[0] != ",".join(COLUMNS) + "\n":
        raise ResumeError(f"{table} is not a table written by ssni purify (header {lines[0].strip()!r}); "
                          "use a new --out folder")
    return lines


def _resume_table(out: Path, lines: list[str]):
    """``purify.csv`` rewritten without the rows whose PNG is gone (said in a warning: those files
    are purified again, to the same result), open for appending; return it and the files done."""
    rows = list(csv.DictReader(lines))
    kept = [(line, row["file"]) for line, row in zip(lines[1:], rows)
            if (out / output_name(Path(row["file"]))).is_file()]
    if len(kept) < len(rows):
        gone = sorted({row["file"] for row in rows} - {file for _, file in kept})
        warnings.warn(f"{len(gone)} purified image(s) listed in {out / 'purify.csv'} are missing (e.g. "
                      f"{gone[0]}); they are purified again", SSNIWarning)
    (out / "purify.csv").write_text(",".join(COLUMNS) + "\n" + "".join(line for line, _ in kept))
    return open(out / "purify.csv", "a", newline=""), {file for _, file in kept}


def _write_png(image: torch.Tensor, target: Path) -> None:
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(partial, format="PNG")
    os.replace(partial, target)


def _check_same_config(path: Path, cfg: ExperimentConfig, resuming: bool) -> None:
    """A folder holds one config's results: resume only with the same config."""
    found = read_json(path).get("hash") if resuming and path.is_file() else None
    if found not in (None, cfg.hash()):
        raise ResumeError(f"{path.parent} holds images purified with another config (hash {found}, now "
                          f"{cfg.hash()}); use a new --out folder")


def _check_request(cfg: ExperimentConfig, source: Path, out: Path) -> None:
    if cfg.data.dataset not in IMAGE_FORMATS:
        raise ConfigError(f"unknown image format for dataset {cfg.data.dataset!r}; one of {sorted(IMAGE_FORMATS)}")
    if cfg.purifier.method == "none":
        raise ConfigError("the config has no purifier ([purifier] method = 'none')")
    if out == source or source in out.parents or out in source.parents:
        raise InputError(f"the output folder {out} and the input folder {source} must not contain each other")


def _purify_chunk(cfg: ExperimentConfig, defense: Defense, source: Path, out: Path, part: list[Path],
                  writer: csv.DictWriter, width: int) -> None:
    """Purify ``part``, write its PNGs and its rows of ``purify.csv``."""
    device = resolve_device(cfg.evaluate.device)
    x, ids = on_device(device, read_images(source, part, cfg.data.dataset), torch.tensor([image_id(f) for f in part]))
    with torch.inference_mode(), precision(cfg):
        purified, levels = defense.purify(x, ids, draw=0, width=width)
        prediction = defense.classifier(purified).argmax(1)
    for j, file in enumerate(part):
        _write_png(purified[j].float(), out / output_name(file))
        norm = "" if levels.score_norm is None else f"{float(levels.score_norm[j]):.4f}"
        writer.writerow({"file": file.as_posix(), "score_norm": norm,
                         "t_star": " ".join(str(int(t)) for t in levels.t[:, j]), "prediction": int(prediction[j])})


def purify_folder(cfg: ExperimentConfig, source: Path, out: Path, weights_dir: Path, width: int = 32,
                  chunk: int = 256, progress: bool = True) -> Path:
    """Purify every image under ``source`` into ``out``; return the path of ``purify.csv``.

    The prediction listed for a file is the classifier's on the image written (one purification,
    draw 0); a defense with ``votes > 1`` would vote over several.
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    _check_request(cfg, source, out)
    files = find_images(source)
    claim(out, "purify")
    lines = _read_table(out / "purify.csv")
    _check_same_config(out / "config.json", cfg, len(lines) > 1)
    (out / "config.json").write_text(json.dumps({"hash": cfg.hash(), **cfg.to_dict()}, indent=2) + "\n")
    handle, done = _resume_table(out, lines)
    with handle:
        todo = [f for f in files if f.as_posix() not in done]
        defense: Defense = prepare_model(cfg, weights_dir)
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        bar = tqdm(total=len(files), initial=len(files) - len(todo), desc="purify", unit="img",
                   disable=not progress)
        for start in range(0, len(todo), chunk):
            _purify_chunk(cfg, defense, source, out, todo[start:start + chunk], writer, width)
            handle.flush()
            bar.update(len(todo[start:start + chunk]))
        bar.close()
    return out / "purify.csv"


__all__ = ["find_images", "image_id", "output_name", "purify_folder", "read_images", "skipped_note"]
