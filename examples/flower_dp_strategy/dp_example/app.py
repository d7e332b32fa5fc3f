"""A Flower app with client-level DP: Flower's strategy wrapper, fedguard's accountant (two lines).

Each client fits a shared linear model ``y = X·w`` on its own synthetic data (a few gradient steps per
round) and returns its weights; the server averages them with FedAvg inside Flower's
``DifferentialPrivacyServerSideFixedClipping`` (updates clipped to ``clipping-norm``, Gaussian noise of
``noise-multiplier`` × clipping-norm / k on the mean). The two fedguard lines are marked below: the
accountant reports ε after every release (PLD accounting, tighter than an RDP bound), keeps a
write-ahead ledger, and Flower stops the run with ``PrivacyBudgetExhausted`` before a round that would
exceed ``max-epsilon``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fedguard_train.flower.dp_strategy import FedguardAccountant

DIM, EXAMPLES, N_CLIENTS = 8, 32, 3
TRUE_W = np.linspace(-1.0, 1.0, DIM)

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    record = msg.content.array_records["arrays"]
    w = record.to_numpy_ndarrays()[0].astype(np.float64)
    rng = np.random.default_rng(int(context.node_config.get("partition-id", 0)))
    x = rng.normal(size=(EXAMPLES, DIM))
    y = x @ TRUE_W + 0.1 * rng.normal(size=EXAMPLES)
    for _ in range(5):
        w -= 0.05 * (x.T @ (x @ w - y)) / EXAMPLES
    loss = float(np.mean((x @ w - y) ** 2))
    content = RecordDict({"arrays": ArrayRecord([w.astype(np.float32)]),
                          "metrics": MetricRecord({"num-examples": EXAMPLES, "train-loss": loss})})
    return Message(content, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    ledger = str(cfg["ledger"]) or None
    # fedguard line 1: the accountant (PLD ε, budget, write-ahead ledger)
    accountant = FedguardAccountant(population_size=N_CLIENTS, target_delta=float(cfg["target-delta"]),
                                    max_epsilon=float(cfg["max-epsilon"]), ledger=ledger)
    # fedguard line 2: hand it to Flower's own DP wrapper
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_train_nodes=N_CLIENTS, min_available_nodes=N_CLIENTS, fraction_evaluate=0.0),
        noise_multiplier=float(cfg["noise-multiplier"]), clipping_norm=float(cfg["clipping-norm"]),
        num_sampled_clients=N_CLIENTS, accountant=accountant)
    stopped = None
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(DIM, np.float32)]),
                       num_rounds=int(cfg["num-rounds"]), train_config=ConfigRecord({}))
    except PrivacyBudgetExhausted as err:
        stopped = str(err)
    spent = accountant.get_privacy_spent()
    print(f"epsilon per round: {[round(e, 3) for e in accountant.epsilon_per_round]}; stopped: {stopped}")
    if cfg["result"]:
        Path(str(cfg["result"])).write_text(json.dumps({
            "epsilon_per_round": accountant.epsilon_per_round, "stopped": stopped, "epsilon": spent.epsilon,
            "releases": spent.num_releases, "method": spent.accounting_method}))
