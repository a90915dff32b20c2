"""BIVA for images: the shared ladder with a Bernoulli or discretised-logistic-mixture head."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.distributions import DiscretizedLogisticMixture, bernoulli_log_prob, mixture_param_channels
from shared.errors import UserError
from shared.ladder import LadderConfig
from shared.model import LadderModel
from shared.nn import WNConv, set_channels_last

from .names import LIKELIHOODS

BINARIZE_KEY = 8191  # noise key of dynamic binarisation (fixed per example in evaluation)
DECODE_KEY = 8192  # noise keys of drawing x ~ p(x|z) (8192 and 8193), apart from every latent group's


@dataclass
class ImageModelConfig:
    image_shape: list[int] = field(default_factory=lambda: [3, 32, 32])  # (C, H, W)
    likelihood: str = "logistic-mixture"
    binarize: str = "none"  # "none" | "dynamic" (x ~ Bernoulli(pixel/255)) | "static" (pixels are 0/255)
    mixture_components: int = 10
    ladder: LadderConfig = field(default_factory=LadderConfig)

    def validate(self) -> "ImageModelConfig":
        if self.likelihood not in LIKELIHOODS:
            raise UserError(f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        if self.binarize not in ("none", "dynamic", "static"):
            raise UserError(f"binarize must be none, dynamic or static, got {self.binarize!r}")
        if self.likelihood == "bernoulli" and self.binarize == "none":
            raise UserError("the Bernoulli likelihood needs binary images: set binarize to dynamic or static")
        C, H, W = self.image_shape
        if self.ladder.input_channels != C or list(self.ladder.input_size) != [H, W] or self.ladder.ndim != 2:
            raise UserError(
                f"ladder input {self.ladder.input_channels}x{self.ladder.input_size} does not match the image "
                f"shape {self.image_shape}")
        self.ladder.validate()
        return self


class ImageVAE(LadderModel):
    modality = "image"

    def __init__(self, cfg: ImageModelConfig):
        cfg.validate()
        super().__init__(cfg.ladder)
        self.cfg = cfg
        C = cfg.image_shape[0]
        out = C if cfg.likelihood == "bernoulli" else mixture_param_channels(C, cfg.mixture_components)
        self.head = WNConv(2, cfg.ladder.output_channels, out, kernel=3, init_scale=0.1)
        # channels_last feature maps by default (faster, same numbers up to rounding); training's
        # --no-channels-last turns it off (shared.nn.set_channels_last).
        set_channels_last(self, True)

    def binarized(self, x: torch.Tensor, noise) -> torch.Tensor:
        if self.cfg.binarize == "static":
            return (x > 127).float()
        u = noise.per_example().uniform(x.shape, BINARIZE_KEY, x.device)
        return (u < x.float() / 255.0).float()

    def embed(self, batch, noise):
        x = batch["x"]
        if self.cfg.likelihood == "bernoulli":
            xb = self.binarized(x, noise)
            return 2.0 * xb - 1.0, xb
        return x.float() / 127.5 - 1.0, x  # the data are normalised on the device, kept uint8 until here

    def log_likelihood(self, d0, target, batch):
        params = self.head(d0)
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_log_prob(params, target)
        C = self.cfg.image_shape[0]
        return DiscretizedLogisticMixture(params, C, self.cfg.mixture_components).log_prob(target)

    def data_size(self, batch):
        n = batch["x"][0].numel()
        return torch.full((batch["x"].shape[0],), float(n), device=batch["x"].device)

    def decode(self, d0: torch.Tensor, mode: str = "sample", noise=None) -> torch.Tensor:
        """uint8 images (B, C, H, W) from d_0: a draw from p(x|z), or its mean with mode="mean".

        With a keyed ``noise`` (HashedNoise) the draw depends on the example ids, not on the batching."""
        params = self.head(d0).float()
        if self.cfg.likelihood == "bernoulli":
            probs = torch.sigmoid(params)
            if mode == "mean":
                return (probs * 255).round().to(torch.uint8)
            u = torch.rand_like(probs) if noise is None else noise.uniform(probs.shape, DECODE_KEY, probs.device)
            return ((u < probs).float() * 255).to(torch.uint8)
        C = self.cfg.image_shape[0]
        return DiscretizedLogisticMixture(params, C, self.cfg.mixture_components).sample(noise, DECODE_KEY, mode=mode)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, mode: str = "sample", noise=None,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """n images from the prior; a conditional model draws class y (int64 (n,)), or uniform classes."""
        from shared.distributions import TrainNoise

        noise = noise or TrainNoise()
        return self.decode(self.decode_prior(n, noise, temperature, y=y), mode, noise)

    @torch.no_grad()
    def reconstruct(self, batch: dict, noise, from_level: int = 0, mode: str = "sample") -> torch.Tensor:
        """Posterior of levels > from_level kept, levels <= from_level drawn from the prior.

        A conditional model decodes with the batch's labels "y", else with argmax q(y|x)."""
        e0, _ = self.embed(batch, noise)
        d0 = self.ladder(e0, noise, mode="posterior", k=from_level, y=self._class_of(batch, e0)).d0
        return self.decode(d0, mode, noise)
