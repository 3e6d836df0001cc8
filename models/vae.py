"""An scVI-style variational autoencoder on raw counts.

The math follows scvi-tools (`module/_vae.py`, `distributions/_negative_binomial.py`): the encoder sees
log1p(x) (and the batch covariate with ``encode_batch``, scVI's encode_covariates); the library size is observed
(l = log sum x); the decoder maps (z, batch) to gene proportions, mu = exp(l) * softmax(decoder); counts follow
NB(mu, theta) with one inverse dispersion per gene, or a zero-inflated NB; loss = NLL + kl_weight * KL(q(z|x) ||
N(0, I)), kl_weight warmed up linearly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.base import DataSummary, Loss, dense_x, obs_codes

EPS = 1e-8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta), elementwise."""
    log_theta_mu = torch.log(theta + mu + EPS)
    return (
        theta * (torch.log(theta + EPS) - log_theta_mu)
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor) -> torch.Tensor:
    """log ZINB(x; mu, theta, dropout logits), elementwise; numerically stable form of scvi-tools."""
    softplus_pi = F.softplus(-pi_logits)
    log_theta = torch.log(theta + EPS)
    log_theta_mu = torch.log(theta + mu + EPS)
    pi_theta_log = -pi_logits + theta * (log_theta - log_theta_mu)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_nonzero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return torch.where(x < EPS, case_zero, case_nonzero)


def mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(n_in if i == 0 else n_hidden, n_hidden))
        if norm == "layer":
            layers.append(nn.LayerNorm(n_hidden, elementwise_affine=False))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class VAEConfig:
    n_genes: int = 0  # 0: filled in from the data (the store's vocabulary or the transform's output width)
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.1
    likelihood: str = "nb"  # nb | zinb
    norm: str = "layer"  # layer | batch | none (layer norm keeps DDP ranks free of buffer syncing)
    batch_key: str | None = None  # an obs key used as batch covariate of the decoder (and encoder: encode_batch)
    encode_batch: bool = False  # the encoder sees the batch too (scVI's encode_covariates; off, as scVI's default)
    n_batch: int = 0  # categories of batch_key + 1 slot for missing; filled in from the store's obs schema
    batch_representation: str = "one-hot"  # one-hot | embedding
    batch_embedding_dim: int = 8
    kl_warmup_steps: int = 400  # kl_weight goes 0 -> max_kl_weight linearly over these optimizer steps
    max_kl_weight: float = 1.0  # the KL term's weight after warm-up (scVI's TrainingPlan max_kl_weight)
    encode_normalized: bool = False  # the encoder sees log1p(x / library * 1e4), not scVI's log1p(x)

    # what checkpoints written before these fields existed did
    FORMER_DEFAULTS: ClassVar[dict] = {"encode_batch": True}

    def __post_init__(self):
        if self.likelihood not in ("nb", "zinb"):
            raise ValueError(f"likelihood is {self.likelihood!r}, expected 'nb' or 'zinb'")
        if self.norm not in ("layer", "batch", "none"):
            raise ValueError(f"norm is {self.norm!r}, expected 'layer', 'batch' or 'none'")
        if self.batch_representation not in ("one-hot", "embedding"):
            raise ValueError(
                f"batch_representation is {self.batch_representation!r}, expected 'one-hot' or 'embedding'"
            )
        if self.n_latent < 1 or self.n_hidden < 1 or self.n_layers < 1:
            raise ValueError("n_latent, n_hidden and n_layers must be >= 1")
        if self.max_kl_weight < 0:
            raise ValueError(f"max_kl_weight is {self.max_kl_weight}, expected >= 0")

    def resolve(self, data: DataSummary) -> VAEConfig:
        """Fill in the sizes that come from the data: genes and batch categories."""
        n_batch = self.n_batch or (data.n_categories(self.batch_key, "batch_key") if self.batch_key else 0)
        return dataclasses.replace(self, n_genes=self.n_genes or data.n_genes, n_batch=n_batch)

    def obs_keys(self) -> tuple[str, ...]:
        return (self.batch_key,) if self.batch_key else ()

    @classmethod
    def debug(cls, n_genes: int = 64, **kw) -> VAEConfig:
        """A few thousand parameters: unit tests."""
        return cls(**{"n_genes": n_genes, "n_latent": 4, "n_hidden": 16, "dropout": 0.0, "kl_warmup_steps": 10, **kw})

    @classmethod
    def small(cls, **kw) -> VAEConfig:
        """Trains in a minute on 2 CPU cores (the bench/quality.py figures); sizes from the data. Wider than scVI's
        defaults (16 latent, 256 hidden) with a lighter KL term (0.25): the one setting of those measured that meets
        PCA's scIB total and 0.95x its kNN accuracy on all four labelled datasets, every seed (README, "The VAE
        preset")."""
        return cls(**{"n_latent": 16, "n_hidden": 256, "max_kl_weight": 0.25, "kl_warmup_steps": 100, **kw})


class VAE(nn.Module):
    Config = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.n_genes < 1:
            raise ValueError("VAEConfig.n_genes must be set (>= 1) before building the model")
        self.config = c = config
        self.use_batch = c.batch_key is not None and c.n_batch > 0
        n_cov = 0
        if self.use_batch:
            if c.batch_representation == "embedding":
                self.batch_embedding = nn.Embedding(c.n_batch, c.batch_embedding_dim)
                n_cov = c.batch_embedding_dim
            else:
                n_cov = c.n_batch
        self.encoder = mlp(c.n_genes + (n_cov if c.encode_batch else 0), c.n_hidden, c.n_layers, c.dropout, c.norm)
        self.z_mean = nn.Linear(c.n_hidden, c.n_latent)
        self.z_logvar = nn.Linear(c.n_hidden, c.n_latent)
        self.decoder = mlp(c.n_latent + n_cov, c.n_hidden, c.n_layers, 0.0, c.norm)
        self.px_scale = nn.Linear(c.n_hidden, c.n_genes)
        self.px_dropout = nn.Linear(c.n_hidden, c.n_genes) if c.likelihood == "zinb" else None
        self.log_theta = nn.Parameter(torch.randn(c.n_genes) * 0.1)  # gene-wise inverse dispersion

    def _covariate(self, batch: dict) -> torch.Tensor | None:
        if not self.use_batch:
            return None
        codes = obs_codes(batch, self.config.batch_key, self.config.n_batch)
        if self.config.batch_representation == "embedding":
            return self.batch_embedding(codes)
        return F.one_hot(codes, self.config.n_batch).float()

    @staticmethod
    def _cat(x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        return x if cov is None else torch.cat([x, cov.to(x.dtype)], dim=-1)

    def encode(self, x: torch.Tensor, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.encode_normalized:
            x = x / x.sum(dim=1, keepdim=True).clamp(min=1.0) * 1e4
        h = self.encoder(self._cat(torch.log1p(x), cov if self.config.encode_batch else None))
        return self.z_mean(h), self.z_logvar(h).clamp(-12, 12)

    def loss(self, batch: dict, step: int | None = None) -> Loss:
        x = dense_x(batch)
        cov = self._covariate(batch)
        mean, logvar = self.encode(x, cov)
        std = torch.exp(0.5 * logvar) + 1e-4**0.5  # scvi's var_eps, on the std
        z = mean + std * torch.randn_like(std)
        h = self.decoder(self._cat(z, cov))
        library = torch.log(x.sum(dim=1, keepdim=True).clamp(min=1.0))
        # Likelihood terms in float32 even under autocast: lgamma and softmax over many genes need the range.
        logits = self.px_scale(h).float()
        mu = torch.exp(library) * torch.softmax(logits, dim=-1)
        theta = torch.exp(self.log_theta.float())
        if self.px_dropout is not None:
            log_px = log_zinb(x, mu, theta, self.px_dropout(h).float())
        else:
            log_px = log_nb(x, mu, theta)
        nll = -log_px.sum(dim=1)
        var = std.float() ** 2
        kl = 0.5 * (var + mean.float() ** 2 - 1.0 - torch.log(var)).sum(dim=1)
        kl_weight = self.kl_weight(step)
        loss = (nll + kl_weight * kl).mean()
        return Loss(
            loss,
            {"nll": nll.mean().detach(), "kl": kl.mean().detach(), "kl_weight": kl_weight},
            n_cells=x.shape[0],
        )

    def kl_weight(self, step: int | None) -> float:
        top = self.config.max_kl_weight
        if step is None or self.config.kl_warmup_steps <= 0:
            return top
        return top * min(1.0, step / self.config.kl_warmup_steps)

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """The latent mean of q(z | x) (q(z | x, batch) with encode_batch)."""
        x = dense_x(batch)
        mean, _ = self.encode(x, self._covariate(batch))
        return mean.float()
