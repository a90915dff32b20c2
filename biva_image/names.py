"""Torch-free names, so the image scripts validate their flags before importing anything heavy."""

IMAGE_DATASETS = ("cifar10", "svhn", "mnist", "binarized-mnist", "omniglot", "celeba64", "folder")
IMAGE_PRESETS = ("binary", "cifar10", "celeba64", "tiny")
IMAGE_MODELS = ("biva", "lvae+", "lvae")
LIKELIHOODS = ("bernoulli", "logistic-mixture")
# The preset a dataset trains with by default (paper Appendix C).
DATASET_PRESET = {"cifar10": "cifar10", "svhn": "cifar10", "mnist": "binary", "binarized-mnist": "binary",
                  "omniglot": "binary", "celeba64": "celeba64"}
PRESET_BY_SIZE = {28: "binary", 32: "cifar10", 64: "celeba64"}
# Datasets whose likelihood literature trains on the whole training split and reports the test split
# (CIFAR-10 50k / 10k; dynamic MNIST 60k / 10k and OMNIGLOT chardata.mat 24,345 / 8,070 as in Burda et
# al.): train_image.py defaults to --valid-size 0 for them (validation on a seeded subset of train).
# The others carve their validation split out of train unless the source has one. Our choice.
FULL_TRAIN_DATASETS = ("cifar10", "mnist", "omniglot")

# Sample and reconstruction grids are enlarged (nearest) until every image is at least this many
# pixels on its shorter side: readable on a screen, and 64x64 images stay at their own size.
MIN_TILE_PX = 64
GRID_SCALE_HELP = (f"enlarge the grid this many times, pixels repeated (default auto: the smallest factor that makes "
                   f"every image at least {MIN_TILE_PX} px on its shorter side; 1 keeps the native size)")
