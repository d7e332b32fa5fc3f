"""Differential privacy for federated fine-tuning: events, a budgeted accountant, calibration,
client-level DP-FedAvg (central or distributed noise), and example-level DP-SGD on adapters.

The math of accounting is delegated to ``dp_accounting`` (PLD, RDP) or Opacus (PRV); heavy dependencies
(``dp_accounting``, ``opacus``) are imported lazily inside the functions that need them.

    >>> from fedguard.dp import ClientDPConfig, ClientLevelDP
    >>> config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.1, sampling_rate=0.1, population=1000)
    >>> dp = ClientLevelDP(config, accountant=config.make_accountant(target_delta=1e-5, epsilon_budget=8.0))

See docs/dp.md.
"""

from fedguard.dp.accountant import BACKENDS, LedgerEntry, PrivacyAccountant, validate_delta
from fedguard.dp.calibration import calibrate_noise_multiplier, epsilon_for, max_steps
from fedguard.dp.client_level import (
    AdaptiveClipping,
    ClientDPConfig,
    ClientLevelDP,
    DPRoundResult,
    clip_to_norm,
    sample_clients,
)
from fedguard.dp.distributed import (
    DistributedDiscreteGaussian,
    discrete_gaussian_pmf,
    sample_discrete_gaussian,
    sample_discrete_gaussian_exact,
    upload_spec_with_noise,
)
from fedguard.dp.errors import (
    InsufficientNoiseError,
    UnreachableTargetError,
    UnsupportedEventError,
    UnsupportedModelError,
)
from fedguard.dp.events import (
    ComposedEvent,
    DistributedDiscreteGaussianEvent,
    Event,
    GaussianEvent,
    NonPrivateEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    ZCDPEvent,
    event_from_dict,
    event_to_dict,
)
from fedguard.dp.sample_level import DPSGDConfig, PrivateAdapterTrainer, StepResult, poisson_batches
from fedguard.errors import BudgetExceededError

__all__ = [
    "BACKENDS",
    "AdaptiveClipping",
    "BudgetExceededError",
    "ClientDPConfig",
    "ClientLevelDP",
    "ComposedEvent",
    "DPRoundResult",
    "DPSGDConfig",
    "DistributedDiscreteGaussian",
    "DistributedDiscreteGaussianEvent",
    "Event",
    "GaussianEvent",
    "InsufficientNoiseError",
    "LedgerEntry",
    "NonPrivateEvent",
    "PoissonSampledEvent",
    "PrivacyAccountant",
    "PrivateAdapterTrainer",
    "SelfComposedEvent",
    "StepResult",
    "UnreachableTargetError",
    "UnsupportedEventError",
    "UnsupportedModelError",
    "ZCDPEvent",
    "calibrate_noise_multiplier",
    "clip_to_norm",
    "discrete_gaussian_pmf",
    "epsilon_for",
    "event_from_dict",
    "event_to_dict",
    "max_steps",
    "poisson_batches",
    "sample_clients",
    "sample_discrete_gaussian",
    "sample_discrete_gaussian_exact",
    "upload_spec_with_noise",
    "validate_delta",
]
