"""Cryptographic randomness for CrypTen 0.4.1: ChaCha20 streams with 256-bit seeds instead of MT19937.

CrypTen draws every mask it uses — the pairwise zero-sharings (generators ``prev``/``next``), each party's
private randomness (``local``), the shared ``global`` stream, and the Beaver triples that its trusted
dealer (``TTPServer``) and each party derive from a seed they share — from ``torch.Generator`` objects,
i.e. Mersenne Twister (MT19937) seeded with 64 bits. MT19937 is not a cryptographic generator (its
state follows linearly from 624 consecutive outputs) and 64-bit seeds are below any security level, so
masks built on them hide nothing by design.

This module replaces those generators with :class:`StreamGenerator`: a ChaCha20 keystream
(:class:`fedguard.rng.SecureRNG`, RFC 8439) keyed by a fresh 256-bit seed from ``os.urandom``. Seeds
travel exactly as CrypTen's 64-bit ones did (``next`` to the next rank, ``global`` broadcast from rank 0,
one seed per party from the dealer), only as four int64 words. Three patches, installed together by
:func:`install_stream_generators` (idempotent; :func:`fedguard.secagg.mpc.crypten_compat.load_crypten`
calls it):

1. ``crypten._setup_prng`` (run by ``crypten.init()`` in each party) creates the four streams;
2. ``TTPServer._setup_generators`` / ``TTPClient._setup_generators`` create the dealer's per-party
   streams on both sides;
3. ``generate_random_ring_element`` / ``generate_kbit_random_tensor`` — rebound in every CrypTen module
   that imported them by name — draw from a :class:`StreamGenerator` (a uniform int64 per ring element;
   the low ``k`` bits of one for a k-bit value) and leave any other generator to CrypTen's original code.

Only CPU streams are provided (fedguard's compute parties run on CPU); a CUDA generator request raises.
The seeds cross CrypTen's own communicator (gloo), which is not encrypted: between machines, the parties'
network must be private (``docs/secagg-mpc.md``); this module fixes the generator, not the link.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG

SEED_BYTES = 32
_SEED_WORDS = SEED_BYTES // 8
_CPU = torch.device("cpu")
_PATCHED = "__fedguard_stream_generators__"


class StreamGenerator:
    """A CPU random source for CrypTen backed by a ChaCha20 keystream (256-bit seed).

    It stands where CrypTen expects a ``torch.Generator``: it has ``device``, and the patched ``generate_*``
    functions recognise it. ``manual_seed`` is refused: a 64-bit seed would undo the point of the class.
    """

    def __init__(self, seed: bytes, label: str) -> None:
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ConfigError(f"a stream generator needs a {SEED_BYTES}-byte seed")
        self._rng = SecureRNG.from_seed(seed)
        self.label = label
        self.device = _CPU

    def int64(self, size: Any) -> torch.Tensor:
        """Uniform int64 values (every one of the 2^64) of the given shape."""
        shape = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (int(size),)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return torch.from_numpy(self._rng.uint64(n).view(np.int64).reshape(shape))

    def manual_seed(self, seed: int) -> None:
        raise ConfigError("StreamGenerator cannot be reseeded with a 64-bit torch seed")

    def __repr__(self) -> str:  # never print key material
        return f"StreamGenerator({self.label!r}, ChaCha20)"


def seed_to_tensor(seed: bytes) -> torch.Tensor:
    """32 seed bytes as the int64[4] tensor that travels over CrypTen's communicator."""
    return torch.from_numpy(np.frombuffer(seed, dtype=np.int64).copy())


def tensor_to_seed(tensor: torch.Tensor) -> bytes:
    words = tensor.detach().to(torch.int64).reshape(-1)
    if words.numel() != _SEED_WORDS:
        raise ConfigError(f"a seed tensor must hold {_SEED_WORDS} int64 words, got {words.numel()}")
    return words.numpy().tobytes()


def _require_cpu(kwargs: dict[str, Any]) -> None:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        raise ConfigError("fedguard's CrypTen streams are CPU only")


def _local_stream(crypten: ModuleType) -> StreamGenerator | None:
    gen = crypten.generators["local"].get(_CPU)
    return gen if isinstance(gen, StreamGenerator) else None


def _make_ring_element(original: Any, crypten: ModuleType) -> Any:
    def generate_random_ring_element(size: Any, ring_size: int = 2**64, generator: Any = None,
                                     **kwargs: Any) -> torch.Tensor:
        gen = generator if generator is not None else _local_stream(crypten)
        if not isinstance(gen, StreamGenerator):
            return original(size, ring_size=ring_size, generator=generator, **kwargs)
        if ring_size != 2**64:
            raise ConfigError(f"fedguard's CrypTen streams draw from the ring 2^64 only, got {ring_size}")
        _require_cpu(kwargs)
        return gen.int64(size)

    return generate_random_ring_element


def _make_kbit(original: Any, crypten: ModuleType, ring_element: Any) -> Any:
    def generate_kbit_random_tensor(size: Any, bitlength: int | None = None, generator: Any = None,
                                    **kwargs: Any) -> torch.Tensor:
        gen = generator if generator is not None else _local_stream(crypten)
        if not isinstance(gen, StreamGenerator):
            return original(size, bitlength=bitlength, generator=generator, **kwargs)
        bits = 64 if bitlength is None else int(bitlength)
        if bits == 64:
            return ring_element(size, generator=gen, **kwargs)
        if not 1 <= bits < 64:
            raise ConfigError(f"bitlength must be in [1, 64], got {bitlength}")
        _require_cpu(kwargs)
        return gen.int64(size) & ((1 << bits) - 1)  # the low k bits: uniform on [0, 2^k)

    return generate_kbit_random_tensor


def _setup_prng(crypten: ModuleType) -> None:
    """``crypten._setup_prng`` with 256-bit seeds: ``next`` goes to the next rank (and arrives from the
    previous one as ``prev``), ``global`` is broadcast from rank 0, ``local`` never leaves the process."""
    comm = crypten.communicator.get()
    world, rank = comm.get_world_size(), comm.get_rank()
    next_seed = os.urandom(SEED_BYTES)
    prev_words = torch.zeros(_SEED_WORDS, dtype=torch.int64)
    if world >= 2:
        sent = comm.isend(seed_to_tensor(next_seed), (rank + 1) % world)
        received = comm.irecv(prev_words, src=(rank - 1) % world)
        sent.wait()
        received.wait()
        prev_seed = tensor_to_seed(prev_words)
    else:
        prev_seed = next_seed
    global_seed = tensor_to_seed(comm.broadcast(seed_to_tensor(os.urandom(SEED_BYTES)), 0))
    seeds = {"prev": prev_seed, "next": next_seed, "local": os.urandom(SEED_BYTES), "global": global_seed}
    for key, seed in seeds.items():
        crypten.generators[key].clear()  # in place: modules hold a reference to this dict
        crypten.generators[key][_CPU] = StreamGenerator(seed, key)


def _server_setup_generators(self: Any) -> None:
    """The dealer's side: one fresh 256-bit seed per party, sent over the dealer's group."""
    import torch.distributed as dist
    from crypten import communicator

    world = communicator.get().get_world_size()
    seeds = [os.urandom(SEED_BYTES) for _ in range(world)]
    requests = [dist.isend(tensor=seed_to_tensor(s), dst=i, group=self.ttp_group) for i, s in enumerate(seeds)]
    self.generators = [StreamGenerator(s, f"dealer/{i}") for i, s in enumerate(seeds)]
    self.generators_cuda = [None] * world
    for request in requests:
        if request is not None:
            request.wait()
    dist.barrier(group=self.ttp_group)


def _client_setup_generators(self: Any) -> None:
    """A party's side: receive the seed it shares with the dealer."""
    import torch.distributed as dist
    from crypten import communicator

    words = torch.zeros(_SEED_WORDS, dtype=torch.int64)
    dist.recv(tensor=words, src=communicator.get().get_ttp_rank(), group=self.ttp_group)
    dist.barrier(group=self.ttp_group)
    self.generator = StreamGenerator(tensor_to_seed(words), "dealer")
    self.generator_cuda = None


def install_stream_generators(crypten: ModuleType) -> None:
    """Install the three patches of the module docstring into an imported CrypTen (idempotent)."""
    if getattr(crypten, _PATCHED, False):
        return
    rng = crypten.common.rng
    ring_element = _make_ring_element(rng.generate_random_ring_element, crypten)
    kbit = _make_kbit(rng.generate_kbit_random_tensor, crypten, ring_element)
    replaced = {rng.generate_random_ring_element: ring_element, rng.generate_kbit_random_tensor: kbit}
    for name, module in list(sys.modules.items()):
        if not (name == "crypten" or name.startswith("crypten.")) or module is None:
            continue
        for attr in ("generate_random_ring_element", "generate_kbit_random_tensor"):
            current = getattr(module, attr, None)
            if current in replaced:
                setattr(module, attr, replaced[current])
    crypten._setup_prng = lambda: _setup_prng(crypten)  # type: ignore[attr-defined]  # init() looks it up
    ttp = crypten.mpc.provider.ttp_provider
    ttp.TTPServer._setup_generators = _server_setup_generators
    ttp.TTPClient._TTPClient__TTPClient._setup_generators = _client_setup_generators
    setattr(crypten, _PATCHED, True)


CHACHA = "ChaCha20 (256-bit seed)"


def _kind(generator: Any) -> str:
    if isinstance(generator, StreamGenerator):
        return CHACHA
    return f"{type(generator).__name__} (not cryptographic)"


def describe_generators(crypten: ModuleType) -> dict[str, str]:
    """What this (initialised) party's CrypTen randomness runs on: ``{name: kind}`` for the ``prev``,
    ``next``, ``local`` and ``global`` streams (CPU) and, when a dealer serves this party, ``dealer``."""
    out = {key: _kind(by_device[_CPU]) for key, by_device in crypten.generators.items() if _CPU in by_device}
    if crypten.mpc.ttp_required():
        client = crypten.mpc.provider.ttp_provider.TTPClient.get()
        out["dealer"] = _kind(client.get_generator())
    return out
