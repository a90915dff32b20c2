"""Small real images for benchmarks: square patches cut from public-domain and CC0 photographs.

Where the photographs come from (files shipped inside pip packages, so nothing is downloaded):

* scikit-image's ``skimage/data/`` folder (``pip install scikit-image``; the package is BSD-3-Clause,
  the licences of the photographs are the ones its ``skimage.data`` docstrings state):

  | file | what | licence | split |
  |---|---|---|---|
  | ``astronaut.png`` | Eileen Collins, NASA portrait | public domain (NASA) | train |
  | ``camera.png`` | man with a camera | CC0, photographer Lav Varshney | train |
  | ``coffee.png`` | cup of coffee | CC0, photographer Rachel Michetti | train |
  | ``rocket.jpg`` | SpaceX Falcon 9 on the pad | public domain (SpaceX) | train |
  | ``coins.png`` | Greek coins, Galleria Estense | no known copyright restrictions | train |
  | ``brick.png`` | brick wall texture (cc0textures.com) | CC0 | train |
  | ``grass.png`` | grass texture (cc0textures.com) | CC0 | train |
  | ``chelsea.png`` | Chelsea the cat | CC0, photographer Stefan van der Walt | test |
  | ``clock_motion.png`` | wall clock, motion blurred | public domain, photographer Stefan van der Walt | test |
  | ``gravel.png`` | gravel texture (cc0textures.com) | CC0 | test |

* matplotlib's ``mpl-data/sample_data/grace_hopper.jpg`` (matplotlib is a project dependency):
  Rear Admiral Grace Hopper, US Navy photograph, public domain; test.

Train and test patches come from DIFFERENT photographs, so a test score measures generalisation to
new scenes, not to new crops of scenes seen in training. Greyscale photographs (camera, coins,
brick, grass, clock, gravel) serve only ``channels=1``; with ``channels=3`` the sources are
astronaut, coffee, rocket (train) and chelsea, grace_hopper (test).

Patches are cut at full resolution and at 1/2 and 1/4 (box-filtered) on a grid with a stride of half
a patch, and nearly flat ones (standard deviation under ``min_std`` grey levels, e.g. saturated sky
or the black background of the astronaut portrait) are dropped: they would let a likelihood model
score huge values on pixels that carry no information. Pools at size 16: about 27k train and 14k
test patches in greyscale, 15k and 8.6k in RGB, from which ``n`` are drawn without replacement
with ``seed``.

Write an image folder for ``scripts/train_image.py --data-dir DIR`` (16x16 needs ``--preset tiny``
or another preset that names the size; 28/32/64 pick one by themselves)::

    python benchmarks/real_images.py DIR --size 16 --channels 1 --n-train 4000 --n-test 1000
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# (file, channels it can serve, split). Paths are relative to the package's data folder.
SKIMAGE_SOURCES = (
    ("astronaut.png", (1, 3), "train"),
    ("camera.png", (1,), "train"),
    ("coffee.png", (1, 3), "train"),
    ("rocket.jpg", (1, 3), "train"),
    ("coins.png", (1,), "train"),
    ("brick.png", (1,), "train"),
    ("grass.png", (1,), "train"),
    ("chelsea.png", (1, 3), "test"),
    ("clock_motion.png", (1,), "test"),
    ("gravel.png", (1,), "test"),
)
MATPLOTLIB_SOURCES = (("grace_hopper.jpg", (1, 3), "test"),)
SCALES = (1.0, 0.5, 0.25)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def source_photos(split: str = "train", channels: int = 1) -> list[Path]:
    """Paths of the photographs that feed ``split`` ("train" or "test") at ``channels`` (1 or 3)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    skimage_dir = _package_dir("skimage")
    if skimage_dir is None:
        raise RuntimeError("the real image patches need scikit-image's sample photographs: pip install scikit-image")
    matplotlib_dir = _package_dir("matplotlib")
    paths = [skimage_dir / "data" / name for name, served, s in SKIMAGE_SOURCES if s == split and channels in served]
    if matplotlib_dir is not None:
        sample_data = matplotlib_dir / "mpl-data" / "sample_data"
        paths += [sample_data / name for name, served, s in MATPLOTLIB_SOURCES if s == split and channels in served]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"sample photographs missing from the installed packages: {', '.join(missing)}")
    return paths


def _patches_of(photo: Image.Image, size: int, min_std: float) -> np.ndarray:
    """All size x size patches on a half-patch grid, at every scale: (N, H, W, C) uint8."""
    found = []
    stride = max(1, size // 2)
    for scale in SCALES:
        width, height = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        image = photo if scale == 1.0 else photo.resize((width, height), Image.BOX)
        array = np.asarray(image, dtype=np.uint8)
        array = array[:, :, None] if array.ndim == 2 else array
        if height < size or width < size:
            continue
        # (rows, cols, C, size, size) views on the half-patch grid -> (N, size, size, C)
        grid = np.lib.stride_tricks.sliding_window_view(array, (size, size), axis=(0, 1))[::stride, ::stride]
        patches = grid.transpose(0, 1, 3, 4, 2).reshape(-1, size, size, array.shape[2])
        keep = patches.reshape(len(patches), -1).std(axis=1) >= min_std
        found.append(patches[keep])
    channels = len(photo.getbands())
    return np.concatenate(found) if found else np.zeros((0, size, size, channels), np.uint8)


def real_image_patches(size: int = 16, channels: int = 1, n: int = 4000, seed: int = 0,
                       split: str = "train", min_std: float = 2.0) -> np.ndarray:
    """``n`` real ``size`` x ``size`` patches, uint8 (N, C, H, W), from the ``split`` photographs."""
    mode = "L" if channels == 1 else "RGB"
    pools = []
    for path in source_photos(split, channels):
        with Image.open(path) as photo:
            pools.append(_patches_of(photo.convert(mode), size, min_std))
    pool = np.concatenate(pools)
    if n > len(pool):
        raise ValueError(f"only {len(pool)} {split} patches of {size}x{size} exist; ask for n <= {len(pool)}")
    chosen = np.random.default_rng([seed, 0 if split == "train" else 1]).choice(len(pool), size=n, replace=False)
    return np.ascontiguousarray(pool[np.sort(chosen)].transpose(0, 3, 1, 2))


def write_image_folder(out_dir: Path, size: int = 16, channels: int = 1, n_train: int = 4000,
                       n_test: int = 1000, seed: int = 0) -> None:
    """``out_dir/train/*.png`` and ``out_dir/test/*.png``: the layout ``--data-dir`` reads."""
    for split, n in (("train", n_train), ("test", n_test)):
        folder = out_dir / split
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; choose a new output folder")
        folder.mkdir(parents=True, exist_ok=True)
        patches = real_image_patches(size=size, channels=channels, n=n, seed=seed, split=split)
        for i, patch in enumerate(patches):
            pixels = patch[0] if channels == 1 else patch.transpose(1, 2, 0)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write real image patches as an image folder (train/, test/).")
    parser.add_argument("out_dir", type=Path, help="output folder; train/ and test/ are created in it")
    parser.add_argument("--size", type=int, default=16, help="patch side in pixels (default 16)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 = greyscale, 3 = RGB (default 1)")
    parser.add_argument("--n-train", type=int, default=4000, help="training patches (default 4000)")
    parser.add_argument("--n-test", type=int, default=1000, help="test patches, from other photographs (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch draw (default 0)")
    args = parser.parse_args(argv)
    try:
        write_image_folder(args.out_dir, args.size, args.channels, args.n_train, args.n_test, args.seed)
    except (RuntimeError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.n_train} train and {args.n_test} test patches of {args.size}x{args.size}x{args.channels} "
          f"to {args.out_dir}")


if __name__ == "__main__":
    main()
