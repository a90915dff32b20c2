"""The paper's image presets (Appendix C, docs/design.md §6) and a tiny one for tests and CPU runs.

A preset is a model config plus the training defaults that go with it; CLI flags override fields.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.config import TrainConfig
from shared.errors import UserError
from shared.ladder import VARIANTS, LadderConfig

from .model import ImageModelConfig


@dataclass
class ImagePreset:
    model: ImageModelConfig
    train: TrainConfig
    dataset: str
    description: str


def _per_level(levels: int, at: list[int], value: int, default: int = 1) -> list[int]:
    return [value if i in at else default for i in range(1, levels + 1)]


def binary(levels: int = 6) -> ImagePreset:
    """Binarised 28x28 images. Splits (train_image.py's defaults: our choice after the usual protocols,
    not taken from the paper): dynamic MNIST trains on all 60,000 training images and OMNIGLOT
    (Burda et al.'s chardata.mat) on all 24,345, validating on a seeded subset of them (5,000, at most
    10%: the signal of the free-bits schedule, including the switch to lambda = 0), and the 10,000 /
    8,070 test images are reported. Statically binarised MNIST keeps Larochelle's 50,000 / 10,000 /
    10,000 split (valid for the schedule, test reported).
    """
    ladder = LadderConfig(
        ndim=2, input_channels=1, input_size=[28, 28], output_channels=64, levels=levels,
        channels=[64] * levels, latent_channels=[48, 40, 32, 24, 16, 8][:levels] + [8] * max(levels - 6, 0),
        strides=_per_level(levels, [1, levels], 2), kernels=[5] + [3] * (levels - 1), depth=3,
        latent_kind="dense", dropout_inference=0.5, dropout_generative=0.5)
    model = ImageModelConfig(image_shape=[1, 28, 28], likelihood="bernoulli", binarize="dynamic", ladder=ladder)
    # Free bits 2 nats per group, dropped straight to the floor 0 (the paper's lambda = 0 fine-tuning) once
    # validation stalls; the floor must be 0 explicitly, since free_bits_min is a floor the budget stops at.
    # compile "cpu" (ours): the training step compiled where it runs on a CPU (fp32 or bf16), faster there
    # than eager (docs/performance.md; shared.launch.compile_wanted); --no-compile runs eager.
    train = TrainConfig(epochs=500, batch_size=48, lr=2e-3, eval_every=2000, save_every=2000, free_bits=2.0,
                        free_bits_factor=0.0, free_bits_patience=10, free_bits_min=0.0, ema_decay=0.9995,
                        compile="cpu")
    return ImagePreset(model, train, "mnist", "binarised 28x28 images (MNIST, OMNIGLOT): L=6, dense latents")


def _spread(first: int, last: int, levels: int) -> list[int]:
    """``levels`` integers falling linearly from ``first`` (level 1) to ``last`` (level L)."""
    if levels == 1:
        return [first]
    return [round(first - (first - last) * i / (levels - 1)) for i in range(levels)]


def cifar10(levels: int = 15) -> ImagePreset:
    """32x32 natural images. Splits (train_image.py's defaults: our choice after the usual protocol):
    CIFAR-10 trains on all 50,000 training images, validates on a seeded subset of 5,000 of them (the
    free-bits schedule's signal, scored on ``eval_examples`` of those) and reports the 10,000 test images;
    SVHN carves 5,000 validation images out of its 73,257 training images and reports its test split.
    """
    # Strides at levels 1, 11 and 15 for L = 15: 32 -> 16 -> 8 -> 4; latent channels 38, 36, ..., 10.
    # Another depth keeps the rule: the second stride at 11/15 of the depth, the third at the top,
    # and latent channels falling linearly from 38 to 10. For the LVAE+ L = 29 ablation (one level
    # per stochastic group of BIVA's inference path) that is 38, 37, ..., 10 with strides at 1, 21,
    # 29, the level that mirrors BIVA's level 11; "38 - 2i" would run out of channels at level 20.
    second = round(levels * 11 / 15)
    ladder = LadderConfig(
        ndim=2, input_channels=3, input_size=[32, 32], output_channels=96, levels=levels,
        channels=[96] * levels, latent_channels=_spread(38, 10, levels),
        strides=_per_level(levels, [1, second, levels], 2), kernels=[5] + [3] * (levels - 1), depth=3,
        latent_kind="conv", dropout_inference=0.2, dropout_generative=0.0)
    model = ImageModelConfig(image_shape=[3, 32, 32], likelihood="logistic-mixture", ladder=ladder)
    train = TrainConfig(epochs=1000, batch_size=48, lr=2e-3, eval_every=5000, save_every=5000, free_bits=2.0,
                        eval_examples=2000, ema_decay=0.9995)
    return ImagePreset(model, train, "cifar10", "32x32 natural images (CIFAR-10, SVHN): L=15, BIVA 18.5M in the paper")


def celeba64(levels: int = 20) -> ImagePreset:
    channels = [64 if i < 12 else 128 for i in range(1, levels + 1)]
    kernels = [7, 5] + [3] * (levels - 2)
    ladder = LadderConfig(
        ndim=2, input_channels=3, input_size=[64, 64], output_channels=64, levels=levels,
        channels=channels, latent_channels=[max(20 - i, 1) for i in range(levels)],
        strides=_per_level(levels, [1, 2, 11, levels], 2), kernels=kernels, depth=3,
        latent_kind="conv", dropout_inference=0.2, dropout_generative=0.0)
    model = ImageModelConfig(image_shape=[3, 64, 64], likelihood="logistic-mixture", ladder=ladder)
    train = TrainConfig(epochs=200, batch_size=48, lr=2e-3, eval_every=5000, save_every=5000, free_bits=2.0,
                        eval_examples=2000, ema_decay=0.9995)
    return ImagePreset(model, train, "celeba64", "64x64 faces (CelebA): L=20")


def tiny(shape: tuple[int, int, int] = (1, 8, 8), likelihood: str | None = None) -> ImagePreset:
    C, H, W = shape
    likelihood = likelihood or ("bernoulli" if C == 1 and H == 28 else "logistic-mixture")
    stride = 2 if H % 2 == 0 and W % 2 == 0 else 1
    ladder = LadderConfig(
        ndim=2, input_channels=C, input_size=[H, W], output_channels=16, levels=3, channels=[16, 16, 16],
        latent_channels=[4, 4, 4], strides=[stride, 1, 1], kernels=[3, 3, 3], depth=1, latent_kind="conv")
    model = ImageModelConfig(image_shape=[C, H, W], likelihood=likelihood,
                             binarize="dynamic" if likelihood == "bernoulli" else "none",
                             mixture_components=3, ladder=ladder)
    train = TrainConfig(max_steps=200, batch_size=16, lr=2e-3, eval_every=100, save_every=100, log_every=10,
                        free_bits=0.5, ema_decay=0.99, eval_examples=256)
    return ImagePreset(model, train, "folder", "a few-second CPU model for tests and smoke runs")


def with_labels(preset: ImagePreset, num_classes: int) -> ImagePreset:
    """The semi-supervised form of ``preset`` (train_image.py --labels-per-class): the same architecture
    and training defaults, plus the classifier q(y|x) and the class-conditioned ladder of the seed's
    Appendix B (``num_classes`` from the data). ``--dataset mnist --labels-per-class 10`` is the paper's
    Table 3 run (100 labels, binary preset: the paper's architecture). The classifier weight follows
    Kingma et al. (2014) and Maaloe et al. (2016): alpha = beta (N_l + N_u) / N_l, beta = 0.1
    (shared.semi.alpha_rule). Ours, as the seed does not give them: the labelled batch per step,
    min(--batch-size, labelled examples), and the binary preset's schedule (Adamax 2e-3, batch 48,
    free bits 2 then 0, EMA 0.9995) for the semi-supervised run too."""
    preset.model.ladder.num_classes = num_classes
    preset.train.compile = False  # the semi-supervised loss runs the uncompiled model; compiling is unmeasured there
    return preset


PRESETS = {"binary": binary, "cifar10": cifar10, "celeba64": celeba64, "tiny": tiny}


def get_preset(name: str, variant: str = "biva", **kw) -> ImagePreset:
    if name not in PRESETS:
        raise UserError(f"unknown image preset {name!r}; choose one of {', '.join(PRESETS)}")
    if variant not in VARIANTS:
        raise UserError(f"unknown model {variant!r}; choose one of {', '.join(VARIANTS)}")
    preset = PRESETS[name](**kw)
    preset.model.ladder.bu_latents, preset.model.ladder.td_skip = VARIANTS[variant]
    return preset
