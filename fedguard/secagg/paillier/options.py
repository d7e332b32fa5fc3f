"""Options of ``aggregator: paillier`` and the key-size policy: a light module (no phe, no gmpy2).

Why 2048 bits by default and 3072 as the option: see :mod:`fedguard.secagg.paillier.keys`.

>>> PaillierOptions(key_bits=3072).key_bits
3072
>>> PaillierOptions(key_bits=1024, min_clients=2)
Traceback (most recent call last):
...
fedguard.errors.ConfigError: 2 problems: key_bits must be one of (2048, 3072) (112/128-bit security), got 1024; smaller keys need allow_insecure_test_keys=True and are for tests only; min_clients must be >= 3 (the key holder plus 2 others: from a sum over itself and one other client the key holder learns that client's update), got 2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, Literal

from fedguard.checks import int_problem, is_int
from fedguard.errors import ConfigError
from fedguard.federation.protocol import AggregatorOptions

__all__ = [
    "DEFAULT_KEY_BITS",
    "DEFAULT_OBFUSCATOR",
    "MIN_CLIENTS",
    "MIN_OTHER_CONTRIBUTORS",
    "MIN_TEST_KEY_BITS",
    "OBFUSCATOR_METHODS",
    "SECURE_KEY_BITS",
    "BadInputPolicy",
    "ObfuscatorMethod",
    "PaillierOptions",
    "check_key_bits",
    "key_bits_problem",
]

DEFAULT_KEY_BITS: Final[int] = 2048
SECURE_KEY_BITS: Final[tuple[int, ...]] = (2048, 3072)
"""Key sizes offered for real use (112- and 128-bit security, NIST SP 800-57 Part 1 Rev. 5)."""
MIN_TEST_KEY_BITS: Final[int] = 256
"""Smallest key accepted with ``allow_insecure_test_keys=True`` (unit tests only; trivially factored)."""

ObfuscatorMethod = Literal["standard", "djn"]
OBFUSCATOR_METHODS: Final[tuple[str, ...]] = ("standard", "djn")
DEFAULT_OBFUSCATOR: Final[ObfuscatorMethod] = "djn"
"""Fixed-base obfuscators with a long exponent: DCR-secure (see :mod:`fedguard.secagg.paillier.keys`)."""
BadInputPolicy = Literal["abort", "exclude"]
BAD_INPUT_POLICIES: Final[tuple[str, ...]] = ("abort", "exclude")

MIN_OTHER_CONTRIBUTORS: Final[int] = 2
"""Contributors besides the key holder that every decrypted sum must include (with one, the key holder
would recover that client's input by subtracting its own)."""
MIN_CLIENTS: Final[int] = MIN_OTHER_CONTRIBUTORS + 1
"""The smallest allowed ``min_clients``: the key holder always contributes, plus two others."""


def key_bits_problem(bits: object, *, allow_insecure_test_keys: bool = False) -> str | None:
    """Why ``bits`` is not an acceptable key size (2048 or 3072; any size >= 256 for test keys), or None."""
    if not is_int(bits):
        return f"key_bits must be an int, got {bits!r}"
    if allow_insecure_test_keys:
        if bits < MIN_TEST_KEY_BITS:  # type: ignore[operator]
            return f"key_bits must be >= {MIN_TEST_KEY_BITS} even for test keys, got {bits}"
    elif bits not in SECURE_KEY_BITS:
        return (f"key_bits must be one of {SECURE_KEY_BITS} (112/128-bit security), got {bits}; "
                "smaller keys need allow_insecure_test_keys=True and are for tests only")
    return None


def check_key_bits(bits: int, *, allow_insecure_test_keys: bool = False) -> int:
    """Validate a key size: 2048 or 3072, or any size >= 256 when insecure test keys are allowed."""
    problem = key_bits_problem(bits, allow_insecure_test_keys=allow_insecure_test_keys)
    if problem:
        raise ConfigError(problem)
    return int(bits)


@dataclass(frozen=True, kw_only=True)
class PaillierOptions(AggregatorOptions):
    """Options of :class:`~fedguard.secagg.paillier.aggregator.PaillierAggregator`.

    The slot layout is sized from the round's fixed-point encoding when the round has one
    (:attr:`fedguard.federation.protocol.RoundSpec.fixed_point`), not from an option. The key holder's
    long-lived key pair and a pinned public key are runtime arguments of the aggregator, not options.

    Attributes:
        key_bits: modulus size, 2048 (default, 112-bit security) or 3072 (128-bit).
        key_holder: client id of the designated key holder; ``None`` picks the lowest participant id.
        max_clients: the slot headroom ``N``; ``None``: the round's participant count.
        min_clients: the fewest contributors whose sum may be decrypted (the threshold; default and minimum
            3: the key holder always contributes, and a sum over it and one other client would reveal that
            client's update to it). Every decrypted sum also includes two contributors besides the key holder.
        workers: processes used for encryption and decryption (``<= 1``: in this process).
        on_bad_input: ``"abort"`` (default) aborts the round when a client sends an unusable ciphertext;
            ``"exclude"`` drops that client and goes on.
        obfuscator: ``"djn"`` (default: ``h_s^α`` from a fixed-base table with a ``2·bits(n)+40``-bit ``α``,
            about 4x faster than ``r^n``, DCR only) or ``"standard"`` (``r^n`` with a fresh uniform ``r``, DCR
            only); see :mod:`fedguard.secagg.paillier.keys`. A client-side choice: ciphertexts look the same.
        allow_insecure_test_keys: accept keys below 2048 bits (unit tests only).
        precompute: the offline half of encryption between rounds. The key holder keeps one long-lived key
            pair for the whole run (generated once, when the aggregator is built, instead of one per round), so
            each client can fill an :class:`~fedguard.secagg.paillier.keys.ObfuscatorPool` for it before its
            update exists (:meth:`PaillierAggregator.precompute`, called by the trainer before local
            training); encryption in the round is then one multiplication per ciphertext.
        precompute_background: with ``precompute``, fill the pools on low-priority (``nice 19``) worker
            processes *while* the clients train, instead of before: the filling then uses only the CPU time
            local training leaves idle, and a client's encryption waits for whatever is not ready yet, so its
            cost stays inside the round's time (``workers`` processes, at least one).
    """

    removed: ClassVar[dict[str, str]] = {
        "fixed_point": "the fixed-point encoding now travels with each round (RoundSpec.fixed_point; in the "
                       "trainer: federation.clip and federation.value_bits)",
    }


    key_bits: int = DEFAULT_KEY_BITS
    key_holder: int | None = None
    max_clients: int | None = None
    min_clients: int = MIN_CLIENTS
    workers: int = 1
    on_bad_input: BadInputPolicy = "abort"
    obfuscator: ObfuscatorMethod = DEFAULT_OBFUSCATOR
    allow_insecure_test_keys: bool = False
    precompute: bool = False
    precompute_background: bool = False

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if not isinstance(self.precompute, bool):
            problems.append(f"precompute must be a bool, got {self.precompute!r}")
        if not isinstance(self.precompute_background, bool):
            problems.append(f"precompute_background must be a bool, got {self.precompute_background!r}")
        elif self.precompute_background and self.precompute is not True:
            problems.append("precompute_background needs precompute: true (it fills the pools of the run's "
                            "long-lived key)")
        if not isinstance(self.allow_insecure_test_keys, bool):
            problems.append(f"allow_insecure_test_keys must be a bool, got {self.allow_insecure_test_keys!r}")
        problems += [p for p in (
            key_bits_problem(self.key_bits, allow_insecure_test_keys=self.allow_insecure_test_keys is True),
            int_problem("key_holder", self.key_holder, low=0, optional=True),
            int_problem("max_clients", self.max_clients, low=1, optional=True),
            int_problem("workers", self.workers, low=0),
        ) if p]
        if not is_int(self.min_clients) or self.min_clients < 1:
            problems.append(f"min_clients must be an int >= {MIN_CLIENTS}, got {self.min_clients!r}")
        elif self.min_clients < MIN_CLIENTS:
            problems.append(
                f"min_clients must be >= {MIN_CLIENTS} (the key holder plus {MIN_OTHER_CONTRIBUTORS} others: from a "
                f"sum over itself and one other client the key holder learns that client's update), "
                f"got {self.min_clients}"
            )
        elif is_int(self.max_clients) and self.max_clients < self.min_clients:  # type: ignore[operator]
            problems.append(f"max_clients={self.max_clients} is below min_clients={self.min_clients}: "
                            f"no round could be decrypted")
        if self.on_bad_input not in BAD_INPUT_POLICIES:
            problems.append(f"on_bad_input must be 'abort' or 'exclude', got {self.on_bad_input!r}")
        if self.obfuscator not in OBFUSCATOR_METHODS:
            problems.append(f"obfuscator must be one of {OBFUSCATOR_METHODS}, got {self.obfuscator!r}")
        return problems
