"""One client's local training as its own (possibly multi-rank) DeepSpeed job.

Run by a trainer's client step (FedHomoLLM's) when ``training.nproc_per_node > 1``::

    torchrun --nproc-per-node N -m fedguard_train.client_worker \\
        --config resolved.json --client K --round R --global global.npy --out update.npz

Every rank loads the base model and the global adapter, DeepSpeed trains data-parallel across the ranks
(each rank draws micro-batches from its own shard of the client's data, gradients are averaged), and
rank 0 writes ``delta = local - global`` and the mean loss. CrypTen must never run in these processes
(it takes over the default process group).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.files import atomic_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--client", type=int, required=True)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--global", dest="global_path", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from fedguard_train.config import TrainConfig
    from fedguard_train.trainers import trainer_class
    from fedguard_train.trainers.base import seed_of

    config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    # a rank only trains: it builds no aggregator (no MPC parties, no keys); the coordinator aggregates
    trainer: Any = trainer_class(config.trainer)(config, quiet=True, coordinator=False)
    global_vec = np.load(args.global_path, allow_pickle=False)
    trainer.load(global_vec)
    local = trainer.local.train(trainer.model, trainer.client_items[args.client],
                                seed=seed_of(config.seed, args.round, args.client))
    delta = trainer.global_vector() - global_vec
    if int(os.environ.get("RANK", "0")) == 0:
        buffer = io.BytesIO()
        np.savez(buffer, delta=delta, loss=np.float64(local.mean_loss),
                 world_size=np.int64(int(os.environ.get("WORLD_SIZE", "1"))))
        atomic_write(args.out, buffer.getvalue())
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Wait until every rank is done (rank 0 has written the update), then leave the process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    # Exit without running C++ static destructors: on CPU, a rank sometimes aborted at interpreter exit
    # ("terminate called without an active exception", SIGABRT) after its work was done, failing the job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
