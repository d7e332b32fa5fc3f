"""The compute parties of the MPC aggregator: simulated in this process, or real CrypTen processes.

The server hands the parties one :class:`AggregationJob` per round: every surviving client's
:class:`~fedguard.secagg.mpc.sharing.SealedShares`. Each party decrypts *its own* share of each client
(:func:`~fedguard.secagg.mpc.sharing.open_share`), the parties agree on which clients sent authentic
shares, optionally run the norm check under MPC, add their shares locally and reveal only the sum.

Two implementations of :class:`ComputeParties`:

* :class:`SimulatedParties` (``backend: simulated``) — ``K`` party objects (each with its own X25519 key) in the calling process;
  adding shares is local, revealing is the sum of the parties' partial sums. No CrypTen, no norm check.
  It exists so the aggregator contract (which runs in-process) exercises the real sharing and channel
  code; it is **not** a deployment: one process holds every party's key.
* :class:`CryptenParties` (``backend: crypten``, the default) — ``K`` in {2, 3} OS processes that rendezvous over ``torch.distributed``
  (gloo) on loopback ``127.0.0.1`` and run CrypTen 0.4.1 (through :mod:`fedguard.secagg.mpc.crypten_compat`),
  plus, when the norm check is on, a dealer process (CrypTen's trusted third party, ``TTP``) that hands
  out Beaver triples and never sees a share. The coordinator (the server's process) never imports CrypTen.
  Each party's private key is generated inside that party's process and never leaves it.

Parties on other machines (``backend: network``): :class:`fedguard.secagg.mpc.network.NetworkParties` (same jobs, same party
code, a rendezvous address instead of loopback and an authenticated control channel instead of pipes).

Failure semantics: a party that crashes, raises, or does not answer within ``timeout_s`` makes
:meth:`CryptenParties.aggregate` raise :class:`~fedguard.errors.ProtocolAbort`; the coordinator then
stops every party process (the surviving parties would otherwise stop by themselves when their gloo
operations time out after ``timeout_s``). A result is returned only when every party revealed the same
sum, so a partial reveal never reaches the server.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from fedguard.checks import check_int, int_problem, number_problem
from fedguard.errors import ConfigError, ProtocolAbort
from fedguard.identity import Roster
from fedguard.secagg.mpc.crypten_rng import describe_generators
from fedguard.secagg.mpc.norm import NormCheck
from fedguard.secagg.mpc.sharing import (
    PURPOSE_SHARE_SIGNATURE,
    SealedShares,
    new_party_key,
    open_share,
    public_key_bytes,
    share_signature_body,
)

LOOPBACK = "127.0.0.1"


# -- jobs and results --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AggregationJob:
    """What the server hands the parties for one round.

    ``inputs[c]`` are client ``c``'s sealed shares of its ``vector_length``-long input. With ``norm`` set,
    each input is ``[q, w]`` (unweighted quantised update and weight) and the parties compute ``[w·q, w]``
    under MPC; without it, each input is the client's ring vector itself. When fewer than
    ``min_contributors`` clients remain after the checks, the parties reveal nothing and the round aborts
    (a sum over one client would be that client's update). The default, 2, is the safe one; 1 is accepted
    only when set explicitly (the aggregator sets it only under ``allow_single_client=True``).
    """

    round_id: int
    vector_length: int
    ring_bits: int
    inputs: Mapping[int, SealedShares]
    norm: NormCheck | None = None
    min_contributors: int = 2

    def __post_init__(self) -> None:
        check_int("min_contributors", self.min_contributors, low=1)

    @property
    def share_bits(self) -> int:
        """The ring the clients shared their inputs in (:func:`~fedguard.secagg.mpc.sharing.seal`): the round's
        ``ring_bits`` (party 0's share then travels in that word), or 64 under the norm check, which squares
        the inputs in Z_{2^64}."""
        return 64 if self.norm is not None else self.ring_bits

    def for_party(self, rank: int) -> AggregationJob:
        """The job party ``rank`` receives: every client's ephemeral key, only this party's ciphertext."""
        mine = {c: SealedShares(s.ephemeral_key, tuple(ct if k == rank else b"" for k, ct in enumerate(s.ciphertexts)),
                                tuple(sig if k == rank else b"" for k, sig in enumerate(s.signatures)))
                for c, s in self.inputs.items()}
        return replace(self, inputs=mine)


def require_running(state: str, job: AggregationJob, norm_check: bool, how_to_enable: str) -> None:
    """Refuse a round on parties that are not running, or a norm-check round on parties without it."""
    if state == "aborted":
        raise ProtocolAbort("the MPC compute parties were stopped by an earlier abort", round_id=job.round_id)
    if state != "running":
        raise ConfigError(f"the parties are {state}: start them first")
    if job.norm is not None and not norm_check:
        raise ConfigError(f"this round needs the norm check: {how_to_enable}")


@dataclass(frozen=True, slots=True)
class PartiesResult:
    """What the parties reveal: the ring sum over ``contributors``, and which clients they left out.

    ``excluded``: over the norm bound (only this bit is revealed about them); ``invalid``: shares that at
    least one party could not authenticate (or of the wrong size)."""

    ring_sum: np.ndarray
    contributors: tuple[int, ...]
    excluded: tuple[int, ...] = ()
    invalid: tuple[int, ...] = ()
    seconds: Mapping[str, float] = field(default_factory=dict)
    """Wall time per step at party 0 (CrypTen parties only; for benchmarks)."""


def _too_few(job: AggregationJob, count: int) -> str:
    return (f"only {count} client(s) passed the parties' checks in round {job.round_id}; "
            f"min_contributors={job.min_contributors} are needed: aborted, nothing revealed")


def _ring_mask(ring_bits: int) -> np.uint64:
    return np.uint64((1 << ring_bits) - 1) if ring_bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


def _signed_by_client(job: AggregationJob, party: int, client: int, roster: Roster) -> bool:
    """Whether ``client`` is on the party's roster and signed its share for this party, deployment and round
    (a server cannot make up shares under a participant's name: a Sybil)."""
    sealed = job.inputs[client]
    if client not in roster.keys or len(sealed.signatures) <= party or len(sealed.ciphertexts) <= party:
        return False
    body = share_signature_body(party, sealed.ephemeral_key, sealed.ciphertexts[party])
    return roster.verify(PURPOSE_SHARE_SIGNATURE, round_id=job.round_id, client=client, body=body,
                         signature=sealed.signatures[party])


def _open_all(job: AggregationJob, party: int, private: Any, roster: Roster | None = None
              ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """This party's share matrix (clients x length, uint64) and its local authenticity mask. With the
    party's ``roster``, a share also needs its client's valid signature (else it counts as invalid)."""
    ids = sorted(job.inputs)
    shares = np.zeros((len(ids), job.vector_length), dtype=np.uint64)
    ok = np.zeros(len(ids), dtype=bool)
    for i, c in enumerate(ids):
        if roster is not None and not _signed_by_client(job, party, c, roster):
            continue
        s = open_share(job.inputs[c], party, private, round_id=job.round_id, client_id=c, length=job.vector_length,
                       ring_bits=job.share_bits)
        if s is not None:
            shares[i], ok[i] = s, True
    return ids, shares, ok


class ComputeParties(ABC):
    """``K`` non-colluding compute parties that add secret shares and reveal only the sum."""

    n_parties: int

    @property
    @abstractmethod
    def public_keys(self) -> tuple[bytes, ...]:
        """The parties' X25519 public keys, in party order (clients encrypt shares to them)."""

    @property
    def supports_norm_check(self) -> bool:
        return False

    @abstractmethod
    def aggregate(self, job: AggregationJob) -> PartiesResult:
        """Run one round's aggregation; :class:`ProtocolAbort` if the parties cannot complete it."""

    def close(self) -> None:
        """Release the parties (no-op for simulated ones)."""

    def __enter__(self) -> ComputeParties:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_n_parties(n_parties: int, allowed: range) -> None:
    check_int("n_parties", n_parties, low=allowed.start, high=allowed.stop - 1)


class SimulatedParties(ComputeParties):
    """Simulated parties in this process (for tests and simulations; see the module docstring).

    The channel assumption this simulation makes explicit: clients' shares reach each party only through
    the authenticated encryption of :mod:`fedguard.secagg.mpc.sharing`; the server object never holds a
    party key. The party objects live in the same process, so this protects nothing against a process
    that reads its own memory.
    """

    def __init__(self, n_parties: int = 3, *, rng: Any = None, roster: Roster | None = None) -> None:
        _check_n_parties(n_parties, range(2, 17))
        self.n_parties = n_parties
        self._keys = [new_party_key(rng.spawn(f"party/{k}") if rng is not None else None) for k in range(n_parties)]
        self.roster = roster
        self._served: set[int] = set()

    @property
    def public_keys(self) -> tuple[bytes, ...]:
        return tuple(public_key_bytes(k) for k in self._keys)

    def aggregate(self, job: AggregationJob) -> PartiesResult:
        if job.norm is not None:
            raise ConfigError("the norm check runs under MPC: use CryptenParties(norm_check=True)")
        if self.roster is not None:  # a deployment: each round is served once (a replayed job is refused)
            if job.round_id in self._served:
                raise ProtocolAbort(f"the MPC parties already served round {job.round_id}: a second job for it "
                                    "(a replay) is refused, nothing revealed", round_id=job.round_id,
                                    nothing_revealed=True)
            self._served.add(job.round_id)
        partial, masks, ids = [], [], sorted(job.inputs)
        for k, key in enumerate(self._keys):
            _, shares, ok = _open_all(job, k, key, self.roster)
            partial.append(shares)
            masks.append(ok)
        valid = np.logical_and.reduce(masks)
        if int(valid.sum()) < job.min_contributors:
            raise ProtocolAbort(_too_few(job, int(valid.sum())), round_id=job.round_id, nothing_revealed=True)
        # each party adds its shares of the valid clients locally; revealing adds the K partial sums
        local_sums = [p[valid].sum(axis=0, dtype=np.uint64) for p in partial]
        total = np.zeros(job.vector_length, dtype=np.uint64)
        for s in local_sums:
            total += s
        total &= _ring_mask(job.ring_bits)
        contributors = tuple(c for c, v in zip(ids, valid) if v)
        invalid = tuple(c for c, v in zip(ids, valid) if not v)
        return PartiesResult(total, contributors, (), invalid)


class PinnedParties(ComputeParties):
    """The parties as a client knows them: their pinned public keys and nothing else
    (:mod:`fedguard.secagg.mpc.pin`). A client's aggregator seals to them
    (:meth:`fedguard.secagg.mpc.aggregator.MpcAggregator.for_client`); it cannot aggregate, and whether the
    parties run the norm check is theirs to say (the request carries it, the client compares it with its own
    configuration)."""

    def __init__(self, public_keys: tuple[bytes, ...]) -> None:
        _check_n_parties(len(public_keys), range(2, 17))
        if any(not isinstance(k, bytes) or len(k) != 32 for k in public_keys):
            raise ConfigError("pinned party keys must be 32-byte X25519 public keys")
        self.n_parties = len(public_keys)
        self._public = tuple(public_keys)

    @classmethod
    def from_file(cls, path: str, n_parties: int | None = None) -> PinnedParties:
        """The parties pinned by the party-keys file ``path`` (:func:`~fedguard.secagg.mpc.pin.read_party_keys`)."""
        from fedguard.secagg.mpc.pin import read_party_keys

        return cls(read_party_keys(path, n_parties))

    @property
    def public_keys(self) -> tuple[bytes, ...]:
        return self._public

    @property
    def supports_norm_check(self) -> bool:
        return True  # the parties' business: the client shares [q, w] in Z_2^64 when its own config says so

    def aggregate(self, job: AggregationJob) -> PartiesResult:
        raise ConfigError("a client holds only the compute parties' public keys (PinnedParties): it cannot "
                          "aggregate; the coordinator's aggregator talks to the parties")


def check_pinned(parties: ComputeParties, pinned: tuple[bytes, ...]) -> None:
    """:class:`ConfigError` unless ``parties`` hold exactly the ``pinned`` public keys, in party order (a
    coordinator whose parties are not the ones its clients pin would have every share refused)."""
    keys = parties.public_keys
    if len(keys) != len(pinned):
        raise ConfigError(f"{len(keys)} parties connected, the party-keys file pins {len(pinned)}")
    wrong = [rank for rank, (a, b) in enumerate(zip(keys, pinned)) if a != b]
    if wrong:
        raise ConfigError(f"the compute parties {wrong} hold other public keys than the party-keys file pins: the "
                          "clients would refuse to seal to them (start those parties with their --key-file)")


# -- real CrypTen parties ----------------------------------------------------------------------------------
def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def reseed_torch_from_os() -> int:
    """Seed this process's default torch generator from ``os.urandom`` (64 bits, torch's maximum); returns
    the seed.

    Every party and the dealer are forked from one fork server, so they inherit *the same* default torch
    generator state. Unpatched CrypTen's dealer (``TTPServer``) draws the seeds of the generators it shares
    with each party from that default generator (``torch.randint``): without a fresh seed per process, any
    party could replay the draw and recompute every party's Beaver masks. fedguard's
    :mod:`~fedguard.secagg.mpc.crypten_rng` replaces those seeds and generators by 256-bit ChaCha20 streams;
    the reseed stays as defence in depth for any CrypTen code path that still uses torch's default generator.
    """
    import torch

    seed = int.from_bytes(os.urandom(8), "little")
    torch.manual_seed(seed)
    return seed


def _prepare_process(rank: int, world_size: int, port: int, timeout_s: float, dealer: bool,
                     host: str = LOOPBACK, interface: str | None = "lo") -> Any:
    """Environment, thread count and timeouts of a party/dealer process; returns the crypten module.

    ``host:port`` is the gloo rendezvous (``MASTER_ADDR``/``RENDEZVOUS``): loopback for parties on this
    machine, the address of party 0's machine across machines. ``interface`` pins gloo's network
    interface (``lo`` on one machine; ``None`` lets gloo pick the one that routes to ``host``).
    """
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=host, MASTER_PORT=str(port),
        RENDEZVOUS=f"tcp://{host}:{port}", DISTRIBUTED_BACKEND="gloo", OMP_NUM_THREADS="1",
    )
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    import torch
    import torch.distributed as dist

    reseed_torch_from_os()
    torch.set_num_threads(1)
    timeout = timedelta(seconds=timeout_s)
    init, new_group = dist.init_process_group, dist.new_group

    def init_with_timeout(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return init(*args, **kwargs)

    def new_group_with_timeout(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return new_group(*args, **kwargs)

    # CrypTen's communicator calls these without a timeout (gloo's default is 30 minutes); this process
    # is CrypTen's own, so patching its torch.distributed module changes nobody else's behaviour.
    dist.init_process_group = init_with_timeout
    dist.new_group = new_group_with_timeout

    from fedguard.secagg.mpc.crypten_compat import load_crypten

    crypten = load_crypten()
    crypten.cfg.mpc.provider = "TTP" if dealer else "TFP"
    return crypten


_DEALER_SQUARE_AND_SCALE = "fedguard_square_and_scale"


def _dealer_square_and_scale(self: Any, size_q: tuple[int, ...], size_w: tuple[int, ...]) -> Any:
    """Dealer side of :func:`_square_and_scale`: party 0's shares of ``a^2`` and ``a·b``.

    ``a`` (like ``q``) and ``b`` (like ``w``) are the sums of every party's draws from the generator it
    shares with the dealer; parties ``1..K-1`` then draw their shares of ``a^2`` and of ``a·b`` from the
    same generators in that order, and party 0 receives the differences.
    """
    import torch

    a = self._get_additive_PRSS(size_q)
    b = self._get_additive_PRSS(size_w)
    a2 = a * a - self._get_additive_PRSS(size_q, remove_rank=True)
    ab = a * b - self._get_additive_PRSS(size_q, remove_rank=True)
    return torch.stack([a2, ab])


def _dealer_main(n_parties: int, port: int, timeout_s: float, host: str = LOOPBACK,
                 interface: str | None = "lo") -> None:
    """CrypTen's trusted third party: serves correlated randomness until rank 0 says terminate."""
    crypten = _prepare_process(n_parties, n_parties, port, timeout_s, dealer=True, host=host, interface=interface)
    setattr(crypten.mpc.provider.TTPServer, _DEALER_SQUARE_AND_SCALE, _dealer_square_and_scale)
    crypten.mpc.provider.TTPServer()  # initialises CrypTen itself and loops


def _clamped_tree_sum(mpc_tensor: Any, shares: Any, cap: int) -> Any:
    """``min(cap, Σ_c S_c)``-preserving sum of each row of non-negative secret values (R x C shares).

    Clamp every value to ``cap`` (``min(x, cap) = [x <= cap]·(x - cap) + cap``: an exact comparison and
    one Beaver product), add neighbours, clamp again, until one column is left. See
    :mod:`fedguard.secagg.mpc.norm` for why the decision ``<= cap - 1`` is exact and nothing wraps.
    """
    import torch

    def clamp(x: Any) -> Any:
        return x.le(cap) * (x - cap) + cap

    level = clamp(mpc_tensor.from_shares(shares, precision=0))
    while level.share.size(1) > 1:
        s = level.share
        if s.size(1) % 2:
            s = torch.cat([s, s.new_zeros(s.size(0), 1)], dim=1)
        level = clamp(mpc_tensor.from_shares(s[:, 0::2] + s[:, 1::2], precision=0))
    return mpc_tensor.from_shares(level.share[:, 0], precision=0)


def _clip_factors(mpc_tensor: Any, total: Any, norm: NormCheck) -> tuple[np.ndarray, Any]:
    """Clipping (see :mod:`fedguard.secagg.mpc.norm`): from the clamped ``S`` of R clients, the public bits
    ``c_J`` (within ``2^H`` times the bound) and each client's secret factor ``A`` as R shares.

    ``c_j = [S <= t_j]`` for all ``J + 1`` public thresholds in one comparison; ``A = Σ_j c_j·(a_j −
    a_{j+1})`` is linear in the bits, so each party computes its share of ``A`` locally.
    """
    import torch

    thresholds = torch.tensor(norm.thresholds, dtype=torch.int64)
    rows = total.share.size(0)
    repeated = mpc_tensor.from_shares(total.share.unsqueeze(1).expand(rows, len(norm.thresholds)).contiguous(),
                                      precision=0)
    bits = repeated.le(thresholds)  # R x (J+1) secret bits, monotone in j
    factors = list(norm.factors) + [0]
    steps = torch.tensor([factors[j] - factors[j + 1] for j in range(len(norm.factors))], dtype=torch.int64)
    factor_share = (bits.share * steps).sum(dim=1)
    last = mpc_tensor.from_shares(bits.share[:, -1].contiguous(), precision=0)
    within = last.get_plain_text().numpy().astype(bool)
    return within, factor_share


def _round_scaled(ring_sum: np.ndarray, length: int, scale_bits: int) -> np.ndarray:
    """``round(Z / 2^e)`` of the revealed (public) vector part ``Z``; the weight slot is unscaled."""
    out = ring_sum.copy()
    signed = ring_sum[:length].view(np.int64)  # |Z| < 2^62 by the choice of e: adding half cannot overflow
    out[:length] = ((signed + np.int64(1 << (scale_bits - 1))) >> np.int64(scale_bits)).view(np.uint64)
    return out


def _square_and_scale(crypten: Any, rank: int, q: Any, w: Any) -> tuple[Any, Any]:
    """Shares of ``q ⊙ q`` and ``w · q`` (``q``: R x n, ``w``: R x 1 int64 share tensors) with one opening.

    Beaver's trick with one mask ``a`` for ``q`` serving both products: the dealer hands out shares of
    ``(a, b, a^2, a·b)``; the parties open ``ε = q - a`` and ``δ = w - b`` and compute

        q^2 = a^2 + 2·ε·a + ε^2,        w·q = a·b + ε·b + δ·a + ε·δ

    (public terms added by party 0 only). Exact in Z_2^64: integers, no truncation. Compared with
    CrypTen's separate ``square`` and ``mul``, this saves one opening of ``R x n`` values and a third of
    the dealer's draws.
    """
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.provider.ttp_provider import TTPClient

    comm = crypten.communicator.get()
    client = TTPClient.get()
    gen = client.get_generator()
    a = generate_random_ring_element(q.size(), generator=gen)
    b = generate_random_ring_element(w.size(), generator=gen)
    if rank == 0:
        both = client.ttp_request(_DEALER_SQUARE_AND_SCALE, None, tuple(q.size()), tuple(w.size()))
        a2, ab = both[0], both[1]
    else:
        a2 = generate_random_ring_element(q.size(), generator=gen)
        ab = generate_random_ring_element(q.size(), generator=gen)
    eps, delta = comm.all_reduce([q - a, w - b], batched=True)
    square = a2 + 2 * eps * a
    scaled = ab + eps * b + delta * a
    if rank == 0:
        square += eps * eps
        scaled += eps * delta
    return square, scaled


def _party_main(rank: int, n_parties: int, port: int, timeout_s: float, dealer: bool, conn: Connection,
                roster: Roster | None = None) -> None:
    try:
        crypten = _prepare_process(rank, n_parties, port, timeout_s, dealer)
        private = new_party_key()
        crypten.init()
        conn.send(("ready", rank, (public_key_bytes(private), describe_generators(crypten))))
    except Exception as err:  # noqa: BLE001 - reported to the coordinator, which aborts
        conn.send(("error", rank, f"party {rank} failed to start: {err!r}"))
        return
    served: set[int] = set()  # rounds this party has served (refused again when a roster is set)
    while True:
        try:
            command, payload = conn.recv()
        except EOFError:
            os._exit(1)  # the coordinator is gone: leave without a clean CrypTen shutdown
        if command == "close":
            break
        try:
            conn.send(("result", rank, _party_aggregate(crypten, rank, n_parties, private, payload, roster, served)))
        except Exception as err:  # noqa: BLE001 - a failed round ends this party: the coordinator aborts
            # e.g. gloo's timeout when a peer stalls, or a reset connection when a peer died: this party
            # stops by itself, whether or not the coordinator is still there to stop it
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else repr(err)
            try:
                conn.send(("error", rank, f"MPC party {rank} stopped: {type(err).__name__}: {reason}"))
            finally:
                os._exit(1)
    crypten.uninit()


def _party_aggregate(crypten: Any, rank: int, n_parties: int, private: Any, job: AggregationJob,
                     roster: Roster | None = None, served: set[int] | None = None) -> dict[str, Any]:
    """One party's side of a round (runs inside the party process). With a ``roster``, shares need their
    client's signature and a round the party has ``served`` is refused (every party sees the same job
    round id, so all refuse together)."""
    if roster is not None and served is not None:
        if job.round_id in served:
            return {"abort": f"the MPC parties already served round {job.round_id}: a second job for it (a "
                             "replay) is refused, nothing revealed"}  # the same words at every party
        served.add(job.round_id)
    import torch
    from crypten.mpc import MPCTensor

    comm = crypten.communicator.get()
    clock = _Clock()
    ids, shares, ok = _open_all(job, rank, private, roster)
    clock.lap("open")
    # agree on which clients sent authentic shares to everybody (public information)
    votes = comm.all_reduce(torch.from_numpy(ok.astype(np.int64)))
    valid = (votes.numpy() == n_parties)
    clock.lap("agree")
    excluded: list[int] = []
    if job.norm is None:
        accepted = valid
        local = shares[accepted].sum(axis=0, dtype=np.uint64)
    else:
        norm = job.norm
        rows = np.flatnonzero(valid)
        accepted = np.zeros_like(valid)
        local = np.zeros(job.vector_length, dtype=np.uint64)
        if rows.size:
            q_share = torch.from_numpy(shares[rows, : norm.length].view(np.int64).copy())
            w_share = torch.from_numpy(shares[rows, norm.length :].view(np.int64).copy())
            squares, scaled = _square_and_scale(crypten, rank, q_share, w_share)  # exact, no truncation
            clock.lap("square+scale")
            pad = norm.chunks * norm.chunk - norm.length  # zero shares are shares of zero
            if pad:
                squares = torch.cat([squares, squares.new_zeros(rows.size, pad)], dim=1)
            chunk_sums = squares.view(rows.size, norm.chunks, norm.chunk).sum(dim=2)  # each < 2^61
            total = _clamped_tree_sum(MPCTensor, chunk_sums, norm.cap)
            clock.lap("clamped-sum")
            factor = None
            if norm.clipping:
                within, factor = _clip_factors(MPCTensor, total, norm)
            else:
                within = total.le(norm.threshold).get_plain_text().numpy().astype(bool)
            clock.lap("compare")  # the one bit per client is the only reveal about it
            keep = rows[within]
            excluded = [ids[i] for i in rows[~within]]
            accepted[keep] = True
            if keep.size:
                # the accepted clients' shares of [w·q, w] (or [w·q·A, w]): selecting and adding is local
                mine = scaled[torch.from_numpy(within)]
                if factor is not None:
                    a = factor[torch.from_numpy(within)].unsqueeze(1).expand_as(mine).contiguous()
                    mine = (MPCTensor.from_shares(mine, precision=0) * MPCTensor.from_shares(a, precision=0)).share
                    clock.lap("clip")
                local[: norm.length] = mine.sum(dim=0).numpy().view(np.uint64)
                local[norm.length :] = shares[keep, norm.length :].sum(axis=0, dtype=np.uint64)
    if int(accepted.sum()) < job.min_contributors:  # every party sees the same public bits: all stop here
        return {"abort": _too_few(job, int(accepted.sum()))}
    total = MPCTensor.from_shares(torch.from_numpy(local.view(np.int64).copy()), precision=0).get_plain_text()
    ring_sum = total.numpy().view(np.uint64)
    if job.norm is not None and job.norm.clipping:
        ring_sum = _round_scaled(ring_sum, job.norm.length, job.norm.scale_bits)
    ring_sum = ring_sum & _ring_mask(job.ring_bits)
    clock.lap("reveal")
    return {
        "seconds": clock.laps,
        "ring_sum": ring_sum,
        "contributors": [c for c, a in zip(ids, accepted) if a],
        "excluded": excluded,
        "invalid": [c for c, v in zip(ids, valid) if not v],
    }


def agreed_result(results: Mapping[int, Mapping[str, Any]], job: AggregationJob,
                  on_disagreement: Any) -> PartiesResult:
    """The parties' common answer to ``job`` (rank -> result of :func:`_party_aggregate`).

    The same clean abort from every party raises :class:`ProtocolAbort` (the parties stay up); results
    that differ in any field call ``on_disagreement()`` (which stops the parties) and raise
    :class:`ProtocolAbort`: a result is returned only when every party revealed the same sum.
    """
    first = results[0]
    if "abort" in first and all(r == first for r in results.values()):
        raise ProtocolAbort(str(first["abort"]), round_id=job.round_id)
    for rank, r in results.items():
        same = ("abort" not in r and "abort" not in first and np.array_equal(r["ring_sum"], first["ring_sum"])
                and list(r["contributors"]) == list(first["contributors"])
                and list(r["excluded"]) == list(first["excluded"]) and list(r["invalid"]) == list(first["invalid"]))
        if not same:
            on_disagreement()
            raise ProtocolAbort(f"MPC parties disagree on the result of round {job.round_id} (party {rank})",
                                round_id=job.round_id)
    return PartiesResult(np.asarray(first["ring_sum"], dtype=np.uint64), tuple(first["contributors"]),
                         tuple(first["excluded"]), tuple(first["invalid"]), dict(first["seconds"]))


class _Clock:
    """Wall time per step of a party's round (reported, not compared between parties)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 4)
        self._t = now


@dataclass
class _Proc:
    process: Any
    conn: Connection | None = None
    public_key: bytes = b""
    generators: dict[str, str] = field(default_factory=dict)


@dataclass
class CryptenParties(ComputeParties):
    """``n_parties`` CrypTen compute parties in their own processes on this machine (loopback only).

    Args:
        n_parties: 2 or 3.
        norm_check: start CrypTen's dealer process (trusted third party for Beaver triples) so rounds
            can run the norm check; without it the parties only add shares.
        timeout_s: how long a round (and every gloo operation inside it) may take before
            :class:`ProtocolAbort`.
        startup_timeout_s: how long the processes may take to import torch/CrypTen and rendezvous.

    Use as a context manager (``with CryptenParties(3) as parties: ...``) or call :meth:`start` and
    :meth:`close`. Processes start from multiprocessing's ``forkserver`` (which preloads torch and CrypTen
    once, :mod:`fedguard.secagg.mpc.preload`): CrypTen never enters the caller's process.
    """

    n_parties: int = 3
    norm_check: bool = False
    timeout_s: float = 30.0
    startup_timeout_s: float = 120.0
    roster: Roster | None = None
    """The deployment's client roster, given to each party process: shares must carry their client's
    signature, and each round is served once."""
    _procs: list[_Proc] = field(default_factory=list, init=False, repr=False)
    _dealer: Any = field(default=None, init=False, repr=False)
    _state: str = field(default="new", init=False, repr=False)

    def __post_init__(self) -> None:
        problems = [p for p in (
            int_problem("n_parties", self.n_parties, low=2, high=3),
            number_problem("timeout_s", self.timeout_s, low=0.0, low_open=True),
            number_problem("startup_timeout_s", self.startup_timeout_s, low=0.0, low_open=True),
        ) if p]
        if problems:
            raise ConfigError.collect(problems)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> CryptenParties:
        if self._state != "new":
            raise ConfigError(f"these parties are already {self._state}")
        ctx = mp.get_context("forkserver")
        # torch and CrypTen are imported once, in the fork server; no effect if it is already running
        ctx.set_forkserver_preload(["fedguard.secagg.mpc.preload"])
        port = _free_loopback_port()
        self._state = "starting"
        try:
            for rank in range(self.n_parties):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_party_main, name=f"fedguard-mpc-party-{rank}", daemon=True,
                    args=(rank, self.n_parties, port, self.timeout_s, self.norm_check, child, self.roster),
                )
                proc.start()
                child.close()
                self._procs.append(_Proc(proc, parent))
            if self.norm_check:
                self._dealer = ctx.Process(
                    target=_dealer_main, name="fedguard-mpc-dealer", daemon=True,
                    args=(self.n_parties, port, self.timeout_s),
                )
                self._dealer.start()
            replies = self._collect("ready", time.monotonic() + self.startup_timeout_s, what="start-up")
        except BaseException:
            self._stop()
            self._state = "aborted"
            raise
        for rank, (key, generators) in replies.items():
            self._procs[rank].public_key = key
            self._procs[rank].generators = generators
        self._state = "running"
        return self

    def __enter__(self) -> CryptenParties:
        if self._state == "new":
            self.start()
        return self

    def close(self) -> None:
        """Shut the parties down cleanly (or kill them if they do not leave within a few seconds)."""
        if self._state == "running":
            for p in self._procs:
                try:
                    p.conn.send(("close", None))  # type: ignore[union-attr]
                except (BrokenPipeError, OSError):
                    pass
            deadline = time.monotonic() + 10.0
            for proc in [p.process for p in self._procs] + ([self._dealer] if self._dealer else []):
                proc.join(max(0.0, deadline - time.monotonic()))
        self._stop()
        if self._state != "aborted":
            self._state = "closed"

    def _stop(self) -> None:
        procs = [p.process for p in self._procs] + ([self._dealer] if self._dealer else [])
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(5.0)
        for p in self._procs:
            if p.conn is not None:
                p.conn.close()
                p.conn = None

    @property
    def pids(self) -> tuple[int, ...]:
        """Process ids of the parties, in rank order (the dealer's is :attr:`dealer_pid`)."""
        return tuple(int(p.process.pid) for p in self._procs)

    @property
    def dealer_pid(self) -> int | None:
        return int(self._dealer.pid) if self._dealer is not None else None

    def alive(self) -> tuple[bool, ...]:
        """Whether each party process (then the dealer, if any) is still running."""
        procs = [p.process for p in self._procs] + ([self._dealer] if self._dealer else [])
        return tuple(proc.is_alive() for proc in procs)

    @property
    def public_keys(self) -> tuple[bytes, ...]:
        if self._state == "aborted":
            raise ProtocolAbort("the MPC compute parties were stopped by an earlier abort")
        if self._state != "running":
            raise ConfigError(f"the parties are {self._state}: start them first")
        return tuple(p.public_key for p in self._procs)

    @property
    def supports_norm_check(self) -> bool:
        return self.norm_check

    @property
    def generators(self) -> tuple[dict[str, str], ...]:
        """What each party's CrypTen randomness runs on, as the party reported it at start-up (rank order):
        ``{"prev": "ChaCha20 (256-bit seed)", ..., "dealer": ...}``."""
        return tuple(dict(p.generators) for p in self._procs)

    # -- one round -----------------------------------------------------------------------------------
    def aggregate(self, job: AggregationJob) -> PartiesResult:
        require_running(self._state, job, self.norm_check, "start CryptenParties(norm_check=True)")
        try:
            for rank, p in enumerate(self._procs):
                p.conn.send(("aggregate", job.for_party(rank)))  # type: ignore[union-attr]
            # a little longer than the parties' own gloo timeout, so a surviving party reports a stalled
            # peer itself; the coordinator's deadline only catches parties that stall outside gloo
            deadline = time.monotonic() + self.timeout_s + min(2.0, self.timeout_s / 2)
            results = self._collect("result", deadline, what=f"round {job.round_id}",
                                    round_id=job.round_id)
        except ProtocolAbort:
            raise
        except (BrokenPipeError, OSError) as err:
            self._abort()
            raise ProtocolAbort(f"lost the MPC compute parties in round {job.round_id}: {err}",
                                round_id=job.round_id) from err
        return agreed_result(results, job, on_disagreement=self._abort)

    def _collect(self, kind: str, deadline: float, *, what: str, round_id: int | None = None) -> dict[int, Any]:
        pending = {p.conn: rank for rank, p in enumerate(self._procs)}
        sentinels = {p.process.sentinel: rank for rank, p in enumerate(self._procs)}
        if self._dealer is not None:
            sentinels[self._dealer.sentinel] = -1
        out: dict[int, Any] = {}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abort()
                late = sorted(pending.values())
                raise ProtocolAbort(f"MPC party(ies) {late} did not answer within the {what} timeout: aborted, "
                                    "nothing revealed", round_id=round_id)
            ready = wait(list(pending) + list(sentinels), timeout=remaining)
            for obj in ready:
                if obj in pending:
                    try:
                        tag, rank, payload = obj.recv()
                    except (EOFError, OSError):
                        rank = pending[obj]
                        self._abort()
                        raise ProtocolAbort(f"MPC party {rank} closed its connection during {what}: aborted, "
                                            "nothing revealed", round_id=round_id) from None
                    if tag != kind:
                        self._abort()
                        raise ProtocolAbort(f"{payload} (during {what}): aborted, nothing revealed", round_id=round_id)
                    out[rank] = payload
                    del pending[obj]
            for sentinel, rank in sentinels.items():
                if sentinel in ready and (rank < 0 or rank in pending.values()):
                    who = "the dealer" if rank < 0 else f"MPC party {rank}"
                    self._abort()
                    raise ProtocolAbort(f"{who} died during {what}: aborted, nothing revealed", round_id=round_id)
        return out

    def _abort(self) -> None:
        self._state = "aborted"
        self._stop()

