"""fedguard: privacy and IP protection for federated fine-tuning of large language models.

The core library after the FATE-LLM paper (Fan et al., 2023, arXiv:2310.10049): watermarks (FedIPR),
secure aggregation (pairwise masking, packed Paillier, MPC), and differential privacy, each a component a
user imports into their own training loop. Only torch and numpy are imported eagerly; every heavy
dependency is imported lazily by the module that needs it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fedguard.errors import (
    BudgetExceededError,
    ConfigError,
    FedGuardError,
    InvalidUpdateError,
    KeyMismatchError,
    MessageError,
    ProtocolAbort,
    ProtocolViolation,
    RingOverflowError,
)

__all__ = [
    "__version__",
    "FedGuardError",
    "ConfigError",
    "MessageError",
    "ProtocolAbort",
    "ProtocolViolation",
    "KeyMismatchError",
    "BudgetExceededError",
    "RingOverflowError",
    "InvalidUpdateError",
]
