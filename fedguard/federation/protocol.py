"""The aggregation protocol as an explicit stage machine.

An :class:`Aggregator` is not a function but a *message-passing protocol*: a :class:`ServerSide` and one
:class:`ClientSide` per client exchange serialised :mod:`fedguard.wire` messages, stage by stage
(e.g. setup -> keys -> masked input -> unmask). Every stage is opened by the server: it sends each
surviving client one message for the stage, collects the replies that arrive, and closes the stage,
which either produces the messages of the next stage or the final :class:`AggregateResult`.

The same protocol objects run under the in-process transport (simulation and tests) and under a network
transport, so simulation and deployment share one code path.

What every aggregator computes: the sum, in the ring Z_{2^k}, of the ring vectors of the clients that
completed the protocol's *input stage* (see :mod:`fedguard.encoding` for how a weighted update becomes a
ring vector). A contract test (:mod:`fedguard.testing.aggregator_contract`) demands exact equality
with :class:`~fedguard.federation.plaintext.PlaintextAggregator` on the same inputs.

Guards (DESIGN.md §4.5, after Flower's SecAgg+ ``check_stage``): a message from a foreign round, for
another stage, replayed within a stage, addressed to someone else, or from a party that is not expected
raises :class:`ProtocolViolation` and leaves the receiver's state untouched; a stage that closes with
fewer survivors than the protocol's threshold raises :class:`ProtocolAbort`, after which the server
refuses every further call.

Configuration (DESIGN.md §4.3): each aggregator has a frozen, keyword-only options dataclass derived from
:class:`AggregatorOptions` (what a config file can say: plain JSON values, validated in ``__post_init__``,
unknown keys named with the nearest valid one). Runtime objects (key pairs, compute parties, generators)
are constructor arguments, not options. What every party of a round agrees on in public, including the
fixed-point encoding the ring inputs obey, is the :class:`RoundSpec`.
"""

from __future__ import annotations

import dataclasses
import difflib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedguard import wire
from fedguard.checks import int_problem, is_int
from fedguard.encoding import FixedPointSpec, ring_wire_dtype
from fedguard.errors import ConfigError, MessageError, ProtocolAbort, ProtocolViolation, RingOverflowError
from fedguard.rng import SecureRNG
from fedguard.wire import SERVER, Message, MessageSchema

Outbox = dict[int, bytes]
"""Serialised messages of one stage, by recipient client id."""


_O = TypeVar("_O", bound="AggregatorOptions")
_A = TypeVar("_A", bound="Aggregator")


def unknown_key_problem(key: object, valid: list[str], prefix: str = "") -> str:
    """``"unknown key 'p.k'; did you mean 'x'?"`` (or the valid keys listed when none is close)."""
    shown = f"{prefix}.{key}" if prefix else str(key)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (valid keys: {', '.join(valid) or 'none'})"
    return f"unknown key {shown!r}{hint}"


@dataclass(frozen=True, kw_only=True)
class AggregatorOptions:
    """Base of every aggregator's options: a frozen, keyword-only dataclass of JSON-plain values.

    Subclasses declare their fields and override :meth:`_problems`, which returns one sentence per
    problem; ``__post_init__`` raises them all at once (:meth:`ConfigError.collect`). Build one from a
    config mapping with :meth:`from_dict` (unknown keys are refused with the nearest valid key named),
    write it back with :meth:`to_dict`: ``type(o).from_dict(o.to_dict()) == o``.
    """

    removed: ClassVar[dict[str, str]] = {}
    """Options that existed once, with what replaces them (named when a config still uses one)."""

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError.collect(problems)

    def _problems(self) -> list[str]:
        """Every problem of these values (empty: valid)."""
        return []

    @classmethod
    def keys(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-plain mapping (every field, defaults included)."""
        return {name: getattr(self, name) for name in self.keys()}

    @classmethod
    def from_dict(cls: type[_O], raw: Mapping[str, Any] | None = None, *, prefix: str = "") -> _O:
        """Options from a plain mapping. Unknown keys (named as ``prefix.key``, with the nearest valid key)
        and invalid values are collected into one :class:`ConfigError`."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix or cls.__name__} must be a mapping, got {type(raw).__name__}")
        valid = cls.keys()
        problems = [f"{prefix + '.' if prefix else ''}{k} was removed: {cls.removed[k]}" if k in cls.removed
                    else unknown_key_problem(k, valid, prefix) for k in raw if k not in valid]
        known = {k: v for k, v in raw.items() if k in valid}
        try:
            options = cls(**known)
        except ConfigError as err:
            problems += list(err.problems)
        if problems:
            raise ConfigError.collect(problems)
        return options

    @classmethod
    def build(cls: type[_O], options: _O | Mapping[str, Any] | None, changes: Mapping[str, Any], *,
              prefix: str = "") -> _O:
        """``options`` (an instance, a mapping or ``None`` for the defaults) with ``changes`` applied, checked
        as one mapping: what aggregator constructors and :func:`~fedguard.federation.registry.make_aggregator`
        accept."""
        if options is None:
            base: dict[str, Any] = {}
        elif isinstance(options, cls):
            if not changes:
                return options
            base = options.to_dict()
        elif isinstance(options, Mapping):
            base = dict(options)
        else:
            raise ConfigError(f"options must be a {cls.__name__} or a mapping, got {type(options).__name__}")
        return cls.from_dict({**base, **changes}, prefix=prefix)


@dataclass(frozen=True, slots=True)
class RoundSpec:
    """What every party of one aggregation round agrees on in public.

    Attributes:
        round_id: the federated round (>= 0); every message carries it.
        participants: the client ids selected for the round (distinct, >= 0).
        vector_length: length of each client's ring vector (update length + 1 weight slot).
        ring_bits: the ring Z_{2^k} the sum lives in.
        fixed_point: the encoding every ring input obeys, when it is known: each input is
            ``[w·q mod 2^k, w]`` with ``|q_j| <= M`` and ``1 <= w <= max_weight``
            (:func:`fedguard.encoding.encode_weighted`). Aggregators use it to size what they send
            (Paillier's bounded slots) or to check inputs (MPC's norm bound). ``None``: the inputs are
            arbitrary ring elements (e.g. a custom encoder that adds noise inside the ring). Its
            ``ring_bits`` must be the round's, and the round's participants must fit its capacity.
        min_contributors: the fewest clients whose inputs may be in a revealed sum (default 1). An
            aggregator must abort with :class:`ProtocolAbort` *before decoding anything* when fewer
            clients survive to the reveal: the server refuses to unmask (masking), the key holder
            refuses to decrypt (Paillier), the parties refuse to open (MPC). Differential privacy
            with distributed noise sets it to ``min_survivors``, so that a dropout can never release
            a sum carrying less noise than planned.
    """

    round_id: int
    participants: tuple[int, ...]
    vector_length: int
    ring_bits: int = 64
    fixed_point: FixedPointSpec | None = None
    min_contributors: int = 1

    def __post_init__(self) -> None:
        problems = [p for p in (int_problem("round_id", self.round_id, low=0),
                                int_problem("vector_length", self.vector_length, low=1),
                                int_problem("ring_bits", self.ring_bits, low=2, high=64),
                                int_problem("min_contributors", self.min_contributors, low=1)) if p]
        ids = self.participants
        if not ids:
            problems.append("participants must not be empty")
        elif is_int(self.min_contributors) and self.min_contributors > len(ids):
            problems.append(f"min_contributors={self.min_contributors} exceeds the {len(ids)} participants: "
                            "no round could ever reveal")
        elif any(int_problem("id", c, low=0) for c in ids):
            problems.append(f"participant ids must be ints >= 0, got {ids!r}")
        elif len(set(ids)) != len(ids):
            problems.append(f"participant ids must be distinct, got {ids!r}")
        fp = self.fixed_point
        if fp is not None:
            if not isinstance(fp, FixedPointSpec):
                problems.append(f"fixed_point must be a FixedPointSpec or None, got {type(fp).__name__}")
            elif fp.ring_bits != self.ring_bits:
                problems.append(f"fixed_point.ring_bits={fp.ring_bits} differs from the round's ring_bits={self.ring_bits}")
            elif ids:
                try:
                    fp.check_capacity(len(ids))
                except RingOverflowError as err:
                    problems.append(f"fixed_point: {err}")
        if problems:
            raise ConfigError.collect(problems)

    @property
    def n_clients(self) -> int:
        return len(self.participants)


@dataclass(frozen=True, slots=True)
class AggregateResult:
    """What the server learns: the ring sum over ``contributors`` and who dropped where."""

    round_id: int
    ring_sum: np.ndarray
    ring_bits: int
    contributors: tuple[int, ...]
    dropped: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def too_few_contributors(spec: RoundSpec, count: int, who: str = "the server", *,
                         stage: str | None = None) -> ProtocolAbort | None:
    """The :class:`ProtocolAbort` to raise when ``count`` clients are too few to reveal a sum over
    (``count < spec.min_contributors``), or ``None`` when the reveal may go on. Every aggregator checks
    this *before* it decodes anything (unmask, decrypt, open); the message states both numbers."""
    if count >= spec.min_contributors:
        return None
    return ProtocolAbort(
        f"{who}: only {count} client(s) survive to the reveal of round {spec.round_id}; "
        f"min_contributors={spec.min_contributors} are needed: aborted before anything was decoded",
        round_id=spec.round_id, stage=stage, nothing_revealed=True)


def ring_input_schema(kind: str, *, extra_meta: Mapping[str, type] | None = None, ring_bits: int = 64) -> MessageSchema:
    """Schema of a message carrying one ring vector named ``x``, in the wire type of ``Z_{2^ring_bits}``
    (:func:`fedguard.encoding.ring_wire_dtype`: uint64 for the 64-bit ring, uint32 for a 32-bit one)."""
    return MessageSchema(kind=kind, meta=dict(extra_meta or {}), arrays={"x": (ring_wire_dtype(ring_bits).str, 1)})


def check_ring_vector(
    x: np.ndarray, spec: RoundSpec, what: str, *, error: type[Exception] = MessageError
) -> np.ndarray:
    """Validate a ring vector's dtype, length and range (raising ``error``); returns it as uint64. The round's
    wire type (:func:`fedguard.encoding.ring_wire_dtype`, e.g. uint32 for a 32-bit ring) is accepted too."""
    wire_type = ring_wire_dtype(spec.ring_bits)
    if isinstance(x, np.ndarray) and x.dtype == wire_type and x.dtype != np.uint64:
        x = x.astype(np.uint64)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint64:
        raise error(f"{what} must be a uint64 numpy array (or {wire_type} for the round's {spec.ring_bits}-bit "
                    f"ring), got {getattr(x, 'dtype', type(x).__name__)}")
    if x.shape != (spec.vector_length,):
        raise error(f"{what} must have shape ({spec.vector_length},), got {x.shape}")
    if spec.ring_bits < 64 and x.size and int(x.max()) >> spec.ring_bits:
        raise error(f"{what} has an element outside Z_2^{spec.ring_bits}")
    return x


class ServerSide(ABC):
    """The server's side of one round: a stage machine over :attr:`stages`.

    Subclasses implement :meth:`_open` (messages of the first stage), :meth:`_schema` (what replies of a
    stage look like), :meth:`_check_reply` (content checks) and :meth:`_close` (from the replies of a
    stage to the next stage's messages or the result).
    """

    stages: ClassVar[tuple[str, ...]]

    def __init__(self, spec: RoundSpec, threshold: int) -> None:
        if not 1 <= threshold <= spec.n_clients:
            raise ConfigError(f"threshold must be in [1, {spec.n_clients}] for {spec.n_clients} clients, got {threshold}")
        self.spec = spec
        self.threshold = threshold
        self._index = -1
        self._expected: set[int] = set(spec.participants)
        self._inbox: dict[int, Message] = {}
        self._dropped: dict[str, tuple[int, ...]] = {}
        self._state = "new"  # new -> running -> done | aborted

    @property
    def stage(self) -> str:
        if self._index < 0:
            return "not-started"
        return self.stages[self._index] if self._index < len(self.stages) else "done"

    @property
    def expected(self) -> frozenset[int]:
        """Clients from which a reply is awaited in the current stage."""
        return frozenset(self._expected)

    @property
    def received(self) -> frozenset[int]:
        return frozenset(self._inbox)

    def open(self) -> Outbox:
        """Start the round: the messages of the first stage."""
        if self._state != "new":
            raise ProtocolViolation(f"round {self.spec.round_id} was already opened", round_id=self.spec.round_id)
        outbox = self._open()
        unknown = set(outbox) - set(self.spec.participants)
        if unknown:
            raise ConfigError(f"the first stage addresses non-participants {sorted(unknown)}")
        self._state, self._index = "running", 0
        self._expected = set(outbox)  # a first stage may address only some clients
        return outbox

    def accept(self, sender: int, payload: bytes) -> None:
        """Take one client's reply for the current stage. Raises :class:`ProtocolViolation` (or
        :class:`MessageError` for a malformed payload) and changes nothing when the reply is refused."""
        self._require_running()
        stage = self.stage
        msg = wire.decode(payload)

        def refuse(reason: str) -> ProtocolViolation:
            return ProtocolViolation(reason, sender=sender, round_id=self.spec.round_id, stage=stage)

        if msg.round != self.spec.round_id:
            raise refuse(f"message from round {msg.round} refused in round {self.spec.round_id}")
        if msg.sender != sender:
            raise refuse(f"message claims sender {msg.sender} but arrived from {sender}")
        if msg.recipient != SERVER:
            raise refuse(f"message addressed to {msg.recipient}, not to the server")
        if msg.stage != stage:
            raise refuse(f"message for stage {msg.stage!r} refused in stage {stage!r}")
        if sender in self._inbox:
            raise refuse(f"client {sender} already replied in stage {stage!r} (replay)")
        if sender not in self._expected:
            raise refuse(f"client {sender} is not expected in stage {stage!r}")
        self._schema(stage).validate(msg)
        self._check_reply(stage, msg)
        self._inbox[sender] = msg

    def close_stage(self) -> Outbox | AggregateResult:
        """End the current stage with the replies received so far."""
        self._require_running()
        stage = self.stage
        responders = set(self._inbox)
        dropped = tuple(sorted(self._expected - responders))
        if dropped:
            self._dropped[stage] = dropped
        needed = self.min_replies(stage)
        if len(responders) < needed:
            self._state = "aborted"
            raise ProtocolAbort(
                f"only {len(responders)} of {len(self._expected)} clients replied in stage {stage!r}; "
                f"{needed} are needed: round {self.spec.round_id} aborted before the server decoded anything",
                round_id=self.spec.round_id,
                stage=stage,
            )
        try:
            out = self._close(stage, dict(self._inbox))
        except ProtocolAbort:
            self._state = "aborted"
            raise
        self._inbox = {}
        self._index += 1
        if isinstance(out, AggregateResult):
            self._state = "done"
        else:
            self._expected = set(out)
        return out

    def min_replies(self, stage: str) -> int:
        """Fewest replies that let ``stage`` close; the protocol's threshold unless a subclass says
        otherwise (e.g. a decryption stage addressed to one key holder needs exactly that one)."""
        return self.threshold

    def _require_running(self) -> None:
        if self._state == "aborted":
            raise ProtocolAbort(f"round {self.spec.round_id} was aborted", round_id=self.spec.round_id)
        if self._state != "running":
            raise ProtocolViolation(f"round {self.spec.round_id} is {self._state}", round_id=self.spec.round_id)

    def _message(self, stage: str, recipient: int, *, kind: str, meta: dict | None = None,
                 arrays: dict[str, np.ndarray] | None = None) -> bytes:
        return wire.encode(Message(kind=kind, round=self.spec.round_id, stage=stage, sender=SERVER,
                                   recipient=recipient, meta=meta or {}, arrays=arrays or {}))

    def _result(self, ring_sum: np.ndarray, contributors: set[int]) -> AggregateResult:
        return AggregateResult(self.spec.round_id, ring_sum, self.spec.ring_bits,
                               tuple(sorted(contributors)), dict(self._dropped))

    @abstractmethod
    def _open(self) -> Outbox: ...

    @abstractmethod
    def _schema(self, stage: str) -> MessageSchema: ...

    def _check_reply(self, stage: str, msg: Message) -> None:
        """Content checks beyond the schema (shapes, ranges); raise :class:`MessageError`."""

    @abstractmethod
    def _close(self, stage: str, replies: dict[int, Message]) -> Outbox | AggregateResult: ...


class ClientSide(ABC):
    """One client's side of one round: answers each server message of a stage with one reply."""

    stages: ClassVar[tuple[str, ...]]

    def __init__(self, spec: RoundSpec, client_id: int) -> None:
        if client_id not in spec.participants:
            raise ConfigError(f"client {client_id} is not a participant of round {spec.round_id}")
        self.spec = spec
        self.client_id = client_id
        self._index = 0

    @property
    def stage(self) -> str:
        return self.stages[self._index] if self._index < len(self.stages) else "done"

    def handle(self, payload: bytes) -> bytes:
        """Answer the server's message for the current stage. Out-of-order, foreign-round or misaddressed
        messages raise :class:`ProtocolViolation` and leave the client unchanged."""
        msg = wire.decode(payload)

        def refuse(reason: str) -> ProtocolViolation:
            return ProtocolViolation(reason, sender=msg.sender, round_id=self.spec.round_id, stage=self.stage)

        if self._index >= len(self.stages):
            raise refuse(f"client {self.client_id} has finished round {self.spec.round_id}")
        if msg.round != self.spec.round_id:
            raise refuse(f"message from round {msg.round} refused in round {self.spec.round_id}")
        if msg.sender != SERVER or msg.recipient != self.client_id:
            raise refuse(
                f"client {self.client_id} refuses a message from {msg.sender} to {msg.recipient}"
            )
        if msg.stage != self.stage:
            raise refuse(f"message for stage {msg.stage!r} refused in stage {self.stage!r}")
        reply = self._respond(self.stage, msg)
        self._index += 1
        return reply

    def _reply(self, *, kind: str, meta: dict | None = None, arrays: dict[str, np.ndarray] | None = None) -> bytes:
        return wire.encode(Message(kind=kind, round=self.spec.round_id, stage=self.stage, sender=self.client_id,
                                   recipient=SERVER, meta=meta or {}, arrays=arrays or {}))

    @abstractmethod
    def _respond(self, stage: str, msg: Message) -> bytes: ...


class Aggregator(ABC):
    """A secure (or plaintext) aggregation protocol: a factory of server and client sides.

    Class attributes every implementation declares:

    * ``name``: how configs select it (``aggregator: plaintext``);
    * ``stages``: the client-reply stages, in order;
    * ``input_stage``: the stage whose reply carries the client's input; exactly the clients that replied
      in it are summed.

    An aggregator may hold resources (MPC's party processes): :meth:`close` releases them (idempotent), and
    ``with make_aggregator(...) as agg:`` closes it on the way out.
    """

    name: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    input_stage: ClassVar[str]
    options: AggregatorOptions | None = None
    """The validated options this aggregator was built with (``None`` for a plug-in without any)."""

    @abstractmethod
    def threshold(self, n_clients: int) -> int:
        """Fewest clients that must reply at every stage for the round to complete."""

    @abstractmethod
    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide: ...

    @abstractmethod
    def client(
        self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *, rng: SecureRNG | None = None
    ) -> ClientSide: ...

    @property
    def label(self) -> str:
        """How reports and round tables name this aggregator: its ``name``, plus a warning where the
        configuration protects less than the name suggests (e.g. simulated MPC parties)."""
        return self.name

    def check_clients(self, n_clients: int) -> None:
        """Raise :class:`ConfigError` (naming the numbers and the option to change) when this protocol
        cannot run a round with ``n_clients`` participants. Called before any model is loaded.

        The default asks :meth:`threshold` and turns whatever it raises into a :class:`ConfigError`;
        protocols with rules beyond the threshold override this."""
        problem = int_problem("n_clients", n_clients, low=1)
        if problem:
            raise ConfigError(problem)
        try:
            t = self.threshold(n_clients)
        except Exception as err:  # any refusal of the subclass means "cannot run"
            raise ConfigError(f"aggregator {self.name!r} cannot run a round with {n_clients} clients: {err}") from err
        if not (isinstance(t, int) and 1 <= t <= n_clients):
            raise ConfigError(f"aggregator {self.name!r} cannot run a round with {n_clients} clients: "
                              f"its threshold is {t!r}")

    def check_round(self, spec: RoundSpec) -> None:
        """Raise :class:`ConfigError` when a round with these public parameters cannot run (e.g. no packing
        fits, a norm bound the encoding cannot hold, a designated key holder who is not a participant).
        Starts nothing and draws no keys: trainers call it before any model trains. Default:
        :meth:`check_clients`."""
        self.check_clients(spec.n_clients)

    def precompute(self, spec: RoundSpec) -> int:
        """Offline work for a coming round with these public parameters, done before the clients' inputs
        exist (e.g. Paillier obfuscators for a long-lived key); the trainer calls it before local training.
        Returns how many items were made (nothing by default)."""
        return 0

    def close(self) -> None:
        """Release what this aggregator holds (nothing by default). Idempotent."""

    def __enter__(self: _A) -> _A:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def survives(self, spec: RoundSpec, alive_per_stage: list[set[int]]) -> bool:
        """Whether the protocol completes when the clients in ``alive_per_stage[i]`` reply in stage ``i``
        (a client silent from stage ``i`` on is absent from every later set). Protocols with
        stage-specific requirements override this; the contract test relies on it."""
        t = self.threshold(spec.n_clients)
        contributors = alive_per_stage[self.stages.index(self.input_stage)]
        return len(contributors) >= spec.min_contributors and all(len(alive) >= t for alive in alive_per_stage)
