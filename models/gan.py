"""Wasserstein GAN with gradient penalty (Gulrajani et al. 2017) for counts, with an encoder that inverts the
generator so that cells can be embedded.

Count model (choice (a) of the design): the generator maps a latent z ~ N(0, I) and the cell's standardised
log library size (plus a one-hot batch, if any) to non-negative log-scale activities a = ReLU(output), and
gene proportions ρ = expm1(a) / Σ expm1(a) — a library-size normalisation as in scGAN (Marouf et al. 2020)
that gives exact zeros, as real cells have (a softmax output cannot, and trained far worse on PBMC 3k). The
critic compares log-normalised expression, log1p(ρ × target_sum) for generated cells against
log1p(x / library × target_sum) for real ones, given the same library condition. Counts are ρ × library,
made integers by unbiased stochastic rounding (`count_noise="round"`, default) or Poisson draws ("poisson").
Rounding is the default because the generator is trained against real cells that already carry the sampling
noise of counts: Poisson draws on top would add that noise a second time. Library sizes of prior draws come
from a per-batch log-normal fitted to the training cells; posterior draws keep the cell's own library.

Training: every mini-batch updates the critic (loss D(fake) − D(real) + λ·GP, λ = `gp_weight`); every
`n_critic`-th batch also updates the generator (−D(G(z))); every batch updates the encoder E with
‖E(G(z)) − z‖² on generated cells plus `reconstruction_weight` × ‖G(E(x)) − x‖² on real cells
(log-normalised, mean per gene; only E is stepped). Adam with betas `betas` for critic and generator.
Validation metric for early stopping (validation_loss): the MMD (multi-scale RBF) between validation cells and
cells generated from fixed latent draws with the same libraries, in log-normalised space — it measures sample
quality, does not depend on the moving critic and mostly decreases as training proceeds (train_loss: the same
on each training batch). The critic's Wasserstein estimate and the encoder's reconstruction on validation
cells are reported alongside; per training epoch also the critic loss, gradient penalty, the generator's
objective −D(G(z)) and both encoder terms.

Latent of a cell: E(x). A GAN has no posterior, so `embed` returns zeros as variance, and posterior draws
G(E(x)) differ only through the count sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from scdgm.models.base import check_at_least, check_non_negative, check_positive, require
from scdgm.models.data import Batch, Counts, expression_to_counts, log_normalize
from scdgm.models.likelihoods import LibraryPrior
from scdgm.models.nn import mlp, with_batch
from scdgm.models.torch_model import TorchCountEncoder, TrainConfig
from scdgm.models.training import StepContext

COUNT_NOISE = ("round", "poisson")
MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # RBF bandwidths relative to the median squared distance of real cells
MAX_ACTIVITY = 30.0  # cap of the generator's log-scale output before expm1, against overflow
VALIDATION_SEED = 12345  # latent draws of validation "fake" cells are fixed per batch, away from the global RNG


@dataclass
class WGANConfig(TrainConfig):
    """Hyperparameters of the WGAN-GP and its encoder (epochs, batch size, lr... from TrainConfig)."""

    n_latent: int = 10
    n_hidden: int = 256
    n_layers: int = 2
    n_critic: int = 5
    gp_weight: float = 10.0
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    reconstruction_weight: float = 1.0
    count_noise: str = "round"
    target_sum: float = 1e4
    lr: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 400
    patience: int = 30
    grad_clip: float | None = None

    def check(self) -> None:
        super().check()
        require(self.count_noise in COUNT_NOISE,
                f"count_noise must be one of {', '.join(COUNT_NOISE)}, got {self.count_noise!r}")
        check_at_least(1, n_latent=self.n_latent, n_hidden=self.n_hidden, n_layers=self.n_layers,
                       n_critic=self.n_critic)
        check_non_negative(gp_weight=self.gp_weight, reconstruction_weight=self.reconstruction_weight)
        check_positive(target_sum=self.target_sum)
        require(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
                f"betas must be two numbers in [0, 1), got {self.betas!r}")


def mmd_rbf_torch(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Biased squared MMD with a sum of RBF kernels whose bandwidths scale with the real cells' median distance."""
    both = torch.cat([real, fake])
    distances = torch.cdist(both, both).pow(2)
    n = real.shape[0]
    reference = distances[:n, :n]
    median = reference[reference > 0].median() if (reference > 0).any() else distances.new_tensor(1.0)
    kernel = sum(torch.exp(-distances / (scale * median)) for scale in MMD_SCALES)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


class WGANModule(nn.Module):
    """Generator, critic, encoder and the library-size model, with the WGAN-GP training step."""

    def __init__(self, n_genes: int, n_batches: int, config: WGANConfig) -> None:
        super().__init__()
        self.config = config
        self.n_batches = n_batches
        hidden = [config.n_hidden] * config.n_layers
        n_condition = 1 + n_batches
        self.generator = mlp(config.n_latent + n_condition, hidden, n_genes, layer_norm=True, activation=nn.LeakyReLU)
        self.critic = mlp(n_genes + n_condition, hidden, 1, activation=nn.LeakyReLU)
        self.encoder = mlp(n_genes + n_condition, hidden, config.n_latent, layer_norm=True, activation=nn.LeakyReLU)
        self.library_prior = LibraryPrior(n_batches)

    # --- networks ------------------------------------------------------------------------------------
    def condition(self, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        """Standardised log library (by the batch's training mean and sd), plus the one-hot batch."""
        mean, var = self.library_prior.parameters_for(batch_index, log_library.shape[0])
        standard = ((log_library - mean) / var.sqrt()).unsqueeze(1)
        return with_batch(standard, batch_index, self.n_batches)

    def generate_expression(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Log-normalised expression log1p(ρ × target_sum) of generated cells, ρ ∝ expm1(ReLU(output))."""
        activity = torch.relu(self.generator(torch.cat([z, condition], dim=1))).clamp(max=MAX_ACTIVITY)
        expressed = torch.expm1(activity)
        proportions = expressed / expressed.sum(1, keepdim=True).clamp(min=1e-12)
        return torch.log1p(proportions * self.config.target_sum)

    def score(self, expression: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Critic value of each cell."""
        return self.critic(torch.cat([expression, condition], dim=1))[:, 0]

    def encode_expression(self, expression: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.encoder(torch.cat([expression, condition], dim=1))

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Mean (‖∇D(x̂)‖ − 1)² on random interpolates of real and generated cells (same conditions)."""
        mix = torch.rand(real.shape[0], 1, device=real.device)
        interpolate = (mix * real + (1 - mix) * fake).requires_grad_(True)
        grad = torch.autograd.grad(self.score(interpolate, condition).sum(), interpolate, create_graph=True)[0]
        return ((grad.norm(dim=1) - 1) ** 2).mean()

    # --- training ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        c = self.config
        betas = (float(c.betas[0]), float(c.betas[1]))
        return [
            torch.optim.Adam(self.critic.parameters(), lr=c.lr, betas=betas, weight_decay=c.weight_decay),
            torch.optim.Adam(self.generator.parameters(), lr=c.lr, betas=betas, weight_decay=c.weight_decay),
            torch.optim.Adam(self.encoder.parameters(), lr=c.lr, weight_decay=c.weight_decay),
        ]

    def _encoder_losses(self, real: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent error ‖E(G(z)) − z‖² on generated cells and reconstruction ‖G(E(x)) − x‖² on real ones."""
        z = torch.randn(real.shape[0], self.config.n_latent, device=real.device)
        with torch.no_grad():
            generated = self.generate_expression(z, condition)
        latent = ((self.encode_expression(generated, condition) - z) ** 2).mean()
        rebuilt = self.generate_expression(self.encode_expression(real, condition), condition)
        return latent, ((rebuilt - real) ** 2).mean()

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        c = self.config
        real = log_normalize(batch.x, c.target_sum)
        condition = self.condition(batch.log_library, batch.batch_index)
        z = torch.randn(real.shape[0], c.n_latent, device=real.device)
        fake = self.generate_expression(z, condition).detach()
        real_score, fake_score = self.score(real, condition).mean(), self.score(fake, condition).mean()
        penalty = self.gradient_penalty(real, fake, condition)
        ctx.optimize(fake_score - real_score + c.gp_weight * penalty, 0)
        step = ctx.epoch * ctx.steps_per_epoch + ctx.step_in_epoch
        if (step + 1) % c.n_critic == 0:
            z = torch.randn(real.shape[0], c.n_latent, device=real.device)
            ctx.optimize(-self.score(self.generate_expression(z, condition), condition).mean(), 1)
        latent, reconstruction = self._encoder_losses(real, condition)
        ctx.optimize(latent + c.reconstruction_weight * reconstruction, 2)
        return {
            "loss": mmd_rbf_torch(real, fake).item(),
            "wasserstein": (real_score - fake_score).item(),
            "gradient_penalty": penalty.item(),
            "critic": (fake_score - real_score + c.gp_weight * penalty).item(),
            "generator": -fake_score.item(),
            "encoder_latent": latent.item(),
            "encoder_reconstruction": reconstruction.item(),
        }

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        real = log_normalize(batch.x, self.config.target_sum)
        condition = self.condition(batch.log_library, batch.batch_index)
        generator = torch.Generator(device=real.device).manual_seed(VALIDATION_SEED + int(batch.index[0]))
        z = torch.randn(real.shape[0], self.config.n_latent, device=real.device, generator=generator)
        fake = self.generate_expression(z, condition)
        rebuilt = self.generate_expression(self.encode_expression(real, condition), condition)
        return {
            "loss": mmd_rbf_torch(real, fake).item(),
            "wasserstein": (self.score(real, condition).mean() - self.score(fake, condition).mean()).item(),
            "encoder_reconstruction": ((rebuilt - real) ** 2).mean().item(),
        }

    # --- GenerativeModule hooks ------------------------------------------------------------------------
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.draw_posterior(batch)
        return z, torch.zeros_like(z)

    def draw_posterior(self, batch: Batch) -> torch.Tensor:
        condition = self.condition(batch.log_library, batch.batch_index)
        return self.encode_expression(log_normalize(batch.x, self.config.target_sum), condition)

    def draw_prior(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        log_library, batch_index = self.library_prior.sample(n)
        return torch.randn(n, self.config.n_latent, device=log_library.device), log_library, batch_index

    def generate(self, z: torch.Tensor, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        expression = self.generate_expression(z, self.condition(log_library, batch_index))
        return expression_to_counts(expression, log_library, self.config.target_sum, self.config.count_noise)

    def expected(self, batch: Batch) -> torch.Tensor:
        """Expected counts G(E(x)) × library: the generator's proportions at the cell's encoding."""
        condition = self.condition(batch.log_library, batch.batch_index)
        expression = self.generate_expression(self.draw_posterior(batch), condition)
        return torch.expm1(expression) * (batch.log_library.exp() / self.config.target_sum).unsqueeze(1)


class WGAN(TorchCountEncoder):
    """WGAN-GP producing counts, with an encoder trained to invert the generator."""

    kind = "gan"
    Config = WGANConfig

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    def build_module(self, n_genes: int, n_batches: int, train_counts: Counts | None) -> WGANModule:
        return WGANModule(n_genes, n_batches, self.config)
