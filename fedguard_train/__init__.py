"""fedguard_train: the FATE-LLM trainers on DeepSpeed, selected by a config's ``trainer:`` key.

FedHomoLLM (``homo``) is built on the shared skeleton :class:`fedguard_train.trainers.base.Trainer`;
FedHeteroLLM, FedCoLLM and FedOST are still to be written on it.

A consumer of the :mod:`fedguard` core; the core never imports it.
"""
