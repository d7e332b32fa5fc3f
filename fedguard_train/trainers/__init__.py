"""The paper's trainers. FedHomoLLM (homo.py) is built; FedHeteroLLM, FedCoLLM and FedOST are to come."""

from fedguard_train.trainers.homo import FedHomoLLM, RunResult

__all__ = ["FedHomoLLM", "RunResult"]
