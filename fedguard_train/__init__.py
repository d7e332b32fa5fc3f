"""fedguard_train: the FATE-LLM trainers (FedHomoLLM, FedHeteroLLM, FedCoLLM, FedOST) on DeepSpeed.

A consumer of the :mod:`fedguard` core; the core never imports it.
"""
