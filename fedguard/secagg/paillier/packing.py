"""Slot packing: many ring values in one Paillier plaintext, with headroom so that sums never carry.

A client's ring vector ``x ∈ Z_{2^k}^L`` (``[w·q mod 2^k, w]``, see :mod:`fedguard.encoding`) is mapped to
non-negative slot values ``v_j ∈ [0, U]`` and packed ``S`` per plaintext::

    m = Σ_{j<S} v_j · 2^(b·j)        (b = slot_bits, S = slots_per_ciphertext)

Adding the ciphertexts of ``c`` clients adds the plaintexts; slot ``j`` then holds ``Σ_i v_ij <= c·U``, and
the slots stay independent as long as ``c·U < 2^b``. The layout is therefore *derived*, not guessed:

    b = bit_length(N·U')                N = the planned number of clients (the headroom),
                                        U' = U + 2^k·(2^h - 1) with carry masks, U' = U without
    S = floor((bits(n) - 1) / b)        so m < 2^(S·b) <= 2^(bits(n)-1) <= n: no reduction modulo n

**Carry masks** (what the key holder learns). The key holder decrypts the *integer* slot sums ``Σ_i v_ij``,
which can say more than the ring sum ``Σ_i x_ij mod 2^k``: in ring mode the bits above ``k`` count how many
contributors' entries wrapped. Whenever a slot sum can reach ``2^k`` (``N·U >= 2^k``: always in ring mode
with ``N >= 2``, in bounded mode only for a ring too small for ``N`` clients), each client adds to every
slot a statistical mask ``2^k·r_ij`` with ``r_ij`` uniform in ``[0, 2^h)`` (fresh from the client's
CSPRNG), and the key holder keeps only the low ``k`` bits. The high part of a decrypted slot is then
``carry_j + Σ_i r_ij`` with ``carry_j <= N-1``; adding a uniform ``r`` on ``[0, 2^h)`` hides a shift by
``δ`` up to statistical distance ``δ/2^h``, so the key holder's whole view is within statistical distance
``L·(N-1)/2^h <= 2^-σ`` of one computed from the ring sum alone, with

    h = σ + bit_length(N-1) + bit_length(L),        σ = STATISTICAL_BITS = 40

(one honest client's masks suffice). The masks are multiples of ``2^k``, so the ring sum is unchanged.
Without masks (``N·U < 2^k``) the integer sum is below ``2^k`` and is itself a function of the ring sum.

Two mappings of a ring value to a slot value, both exact modulo ``2^k``:

* **ring** (the round has no fixed-point spec, ``RoundSpec.fixed_point is None``): ``v = x`` as an unsigned integer,
  ``U = 2^k - 1``; the sum's low ``k`` bits are the ring sum. Exact for *any* ring input (e.g. uniform
  64-bit elements), at ``b = k + h + log2(N)`` bits per value (carry masks always on for ``N >= 2``).
* **bounded** (the round's ``RoundSpec.fixed_point``): each entry is ``w·q`` with ``|w·q| <= B =
  max_weight·M`` (``M = 2^(value_bits-1) - 1``) and the weight slot ``1 <= w <= max_weight <= B``. The signed
  lift ``s`` of ``x`` is offset to ``v = s + B ∈ [0, 2B]``, so ``U = 2B``; after decryption the offset
  ``c·B`` of ``c`` contributors is subtracted modulo ``2^k``. With 8-bit values, weights up to 1024 and
  10 clients, ``b = 22``: 93 values per 2048-bit ciphertext, 5.5 bytes per value (BatchCrypt's idea,
  Zhang et al., USENIX ATC 2020, with a headroom derived from the encoding instead of tuned).

Decoding checks what a valid sum must satisfy (no bits above slot ``S-1``, every slot ``<= c·U'`` (mask included), padding
slots zero), so a plaintext decrypted under the wrong key or from a tampered sum raises
:class:`~fedguard.secagg.paillier.errors.DecryptionError` instead of returning garbage (a uniformly random
plaintext passes these checks with negligible probability for any realistic vector).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

import numpy as np

from fedguard.checks import check_int, int_problem
from fedguard.encoding import from_ring, ring_sub
from fedguard.errors import ConfigError, InvalidUpdateError
from fedguard.federation.protocol import RoundSpec
from fedguard.rng import SecureRNG
from fedguard.secagg.paillier.errors import DecryptionError, SlotLayoutError, SlotOverflowError

MAX_SLOT_BITS: Final[int] = 256
STATISTICAL_BITS: Final[int] = 40
"""``σ``: the key holder's view of the carries is within statistical distance ``2^-σ`` of uniform noise."""
_CHUNK: Final[int] = 2048  # ciphertexts packed or unpacked per numpy pass (bounds memory to ~S·b·2048 bytes)
_MASK64: Final[int] = (1 << 64) - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class SlotLayout:
    """How one client's ring vector is packed into Paillier plaintexts. Every party derives it from public
    parameters (:meth:`derive`) and the stage machine compares the copies (:meth:`require_equal`).

    Attributes:
        modulus_bits: bit length of the Paillier modulus ``n``.
        ring_bits: ``k``; the sum is returned modulo ``2^k``.
        vector_length: ``L``, entries per client (update + weight slot).
        max_clients: ``N``, the headroom: at most this many clients may be summed.
        offset: ``B`` added to each signed entry (0 in ring mode).
        mask_bits: ``h``, the width of each client's carry mask ``r`` (0: no mask needed).
        value_max: ``U'``, the largest slot value one client contributes (mask included).
        slot_bits: ``b = bit_length(N·U')``.
        slots_per_ciphertext: ``S = floor((modulus_bits - 1) / b)``.
        n_ciphertexts: ``ceil(L / S)``.
    """

    modulus_bits: int
    ring_bits: int
    vector_length: int
    max_clients: int
    offset: int
    mask_bits: int
    value_max: int
    slot_bits: int
    slots_per_ciphertext: int
    n_ciphertexts: int

    @classmethod
    def derive(
        cls,
        *,
        modulus_bits: int,
        round_spec: RoundSpec,
        max_clients: int | None = None,
    ) -> SlotLayout:
        """The layout for a round: bounded when the round has a fixed-point encoding
        (``round_spec.fixed_point``), ring mode otherwise; headroom ``N = max_clients`` (default: the
        round's participant count).

        Raises :class:`SlotOverflowError` if the round has more participants than ``max_clients``, and
        :class:`ConfigError` if no slot fits.
        """
        k = round_spec.ring_bits
        fixed_point = round_spec.fixed_point
        n_clients = round_spec.n_clients if max_clients is None else max_clients
        problem = int_problem("max_clients", n_clients, low=1)
        if problem:
            raise ConfigError(problem)
        if round_spec.n_clients > n_clients:
            raise SlotOverflowError(
                f"round {round_spec.round_id} has {round_spec.n_clients} participants but the slots were sized "
                f"for max_clients={n_clients}: a slot could carry into its neighbour"
            )
        if fixed_point is None:
            offset, value_max = 0, (1 << k) - 1
        else:  # RoundSpec guarantees fixed_point.ring_bits == k
            offset = fixed_point.max_weight * fixed_point.max_int
            value_max = 2 * offset
        mask_bits = 0
        if n_clients * value_max >= 1 << k:  # an integer slot sum could carry past 2^k: hide the carries
            if value_max >= 1 << k:  # cannot happen for a valid FixedPointSpec (|w·q| < 2^(k-1))
                raise ConfigError(f"slot values up to {value_max} do not fit below 2^{k}")
            mask_bits = STATISTICAL_BITS + (n_clients - 1).bit_length() + round_spec.vector_length.bit_length()
            value_max += ((1 << mask_bits) - 1) << k
        slot_bits = (n_clients * value_max).bit_length()
        if slot_bits > MAX_SLOT_BITS:
            raise ConfigError(f"{n_clients} clients need {slot_bits}-bit slots, more than {MAX_SLOT_BITS}")
        slots = (modulus_bits - 1) // slot_bits
        if slots < 1:
            raise ConfigError(f"a {modulus_bits}-bit modulus cannot hold one {slot_bits}-bit slot")
        return cls(
            modulus_bits=modulus_bits,
            ring_bits=k,
            vector_length=round_spec.vector_length,
            max_clients=n_clients,
            offset=offset,
            mask_bits=mask_bits,
            value_max=value_max,
            slot_bits=slot_bits,
            slots_per_ciphertext=slots,
            n_ciphertexts=math.ceil(round_spec.vector_length / slots),
        )

    # -- wire form --------------------------------------------------------------------------------
    def to_meta(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def meta_schema(cls) -> dict[str, type]:
        return {f.name: int for f in fields(cls)}

    def require_equal(self, meta: Mapping[str, Any], who: str) -> None:
        """Raise :class:`SlotLayoutError` naming the first field where ``meta`` differs from this layout."""
        mine = self.to_meta()
        for name, value in mine.items():
            theirs = meta.get(name)
            if isinstance(theirs, bool) or theirs != value:
                raise SlotLayoutError(f"{who} uses {name}={theirs!r}, the round's slot layout has {name}={value}")

    # -- sizes ------------------------------------------------------------------------------------
    def bytes_per_value(self, ciphertext_bytes: int) -> float:
        return self.n_ciphertexts * ciphertext_bytes / self.vector_length

    # -- packing ----------------------------------------------------------------------------------
    def slot_values(self, ring_vector: np.ndarray) -> np.ndarray:
        """Map a ring vector to slot values in ``[0, U]`` (uint64); raises :class:`InvalidUpdateError` for
        an entry outside the bounded range (bounded mode)."""
        x = np.asarray(ring_vector)
        if x.dtype != np.uint64 or x.shape != (self.vector_length,):
            raise InvalidUpdateError(
                f"ring vector must be uint64 of shape ({self.vector_length},), got {x.dtype} {x.shape}"
            )
        if self.ring_bits < 64 and x.size and int(x.max()) >> self.ring_bits:
            raise InvalidUpdateError(f"ring vector has an element outside Z_2^{self.ring_bits}")
        if self.offset == 0:
            return x.astype(np.uint64, copy=True)
        signed = from_ring(x, self.ring_bits)
        bad = np.flatnonzero((signed > self.offset) | (signed < -self.offset))
        if bad.size:
            i = int(bad[0])
            raise InvalidUpdateError(
                f"ring entry {i} is {int(signed[i])}, outside the bounded range |w·q| <= {self.offset} of the "
                f"fixed-point spec ({bad.size} entries out of range)"
            )
        # s + B lies in [0, 2B] with 2B < 2^64: two's-complement addition modulo 2^64 is exact.
        return signed.astype(np.uint64) + np.uint64(self.offset)

    def pack(self, ring_vector: np.ndarray, *, rng: SecureRNG | None = None) -> list[int]:
        """The client's plaintexts, ``n_ciphertexts`` integers below ``2^(S·b)``.

        With carry masks (``mask_bits > 0``) every real slot gets ``2^k·r``, ``r`` uniform in
        ``[0, 2^h)`` from ``rng`` (a fresh :class:`SecureRNG` by default); padding slots stay zero."""
        values = self.slot_values(ring_vector)
        s, b, k, h = self.slots_per_ciphertext, self.slot_bits, self.ring_bits, self.mask_bits
        masks_rng = rng if rng is not None else SecureRNG()
        padded = np.zeros(self.n_ciphertexts * s, dtype=np.uint64)
        padded[: values.size] = values
        rows = padded.reshape(self.n_ciphertexts, s)
        real = (np.arange(self.n_ciphertexts * s) < self.vector_length).reshape(self.n_ciphertexts, s)
        out: list[int] = []
        for start in range(0, rows.shape[0], _CHUNK):
            block = rows[start : start + _CHUNK]
            bits = np.unpackbits(block.astype("<u8").view(np.uint8).reshape(block.shape[0], s, 8), axis=-1,
                                 bitorder="little")
            if b <= 64:
                bits = bits[:, :, :b]
            else:
                bits = np.concatenate([bits, np.zeros((block.shape[0], s, b - 64), dtype=np.uint8)], axis=-1)
            if h:  # the value occupies bits [0, k) (it is < 2^k), the mask r bits [k, k + h)
                n_bits = block.shape[0] * s * h
                raw = np.frombuffer(masks_rng.bytes((n_bits + 7) // 8), dtype=np.uint8)
                noise = np.unpackbits(raw, axis=None, count=n_bits, bitorder="little").reshape(block.shape[0], s, h)
                bits[:, :, k : k + h] = noise * real[start : start + _CHUNK, :, None]
            packed = np.packbits(bits.reshape(block.shape[0], s * b), axis=-1, bitorder="little")
            out.extend(int.from_bytes(row.tobytes(), "little") for row in packed)
        return out

    def unpack(self, plaintexts: Sequence[int], contributors: int) -> np.ndarray:
        """From the decrypted sum of ``contributors`` clients to the ring sum (uint64, length ``L``).

        Raises :class:`SlotOverflowError` if ``contributors`` exceeds the headroom and
        :class:`DecryptionError` if a plaintext is not a valid packed sum.
        """
        check_int("contributors", contributors, low=1)
        if contributors > self.max_clients:
            raise SlotOverflowError(
                f"{contributors} contributors exceed the slot headroom of max_clients={self.max_clients}"
            )
        if len(plaintexts) != self.n_ciphertexts:
            raise SlotLayoutError(f"expected {self.n_ciphertexts} plaintexts, got {len(plaintexts)}")
        s, b = self.slots_per_ciphertext, self.slot_bits
        total_bits = s * b
        for i, m in enumerate(plaintexts):
            if int(m) >> total_bits:
                raise DecryptionError(
                    f"plaintext {i} has bits above its {s} slots of {b} bits: wrong key or tampered sum"
                )
        nbytes = (total_bits + 7) // 8
        n_words = (b + 63) // 64  # each slot as little-endian 64-bit words
        bound = contributors * self.value_max
        bound_words = [np.uint64((bound >> (64 * w)) & _MASK64) for w in range(n_words)]
        parts: list[list[np.ndarray]] = [[] for _ in range(n_words)]
        for start in range(0, len(plaintexts), _CHUNK):
            block = plaintexts[start : start + _CHUNK]
            raw = np.frombuffer(b"".join(int(m).to_bytes(nbytes, "little") for m in block), dtype=np.uint8)
            bits = np.unpackbits(raw.reshape(len(block), nbytes), axis=-1, bitorder="little")
            bits = bits[:, :total_bits].reshape(len(block), s, b)
            for w in range(n_words):
                parts[w].append(_bits_to_u64(bits[:, :, 64 * w : 64 * (w + 1)]))
        words = [np.concatenate(p).reshape(-1) for p in parts]
        lo = words[0]
        # slot <= bound, compared word by word from the most significant one
        less = np.zeros(lo.size, dtype=bool)
        equal = np.ones(lo.size, dtype=bool)
        for w in reversed(range(n_words)):
            less |= equal & (words[w] < bound_words[w])
            equal &= words[w] == bound_words[w]
        within = less | equal
        if not within.all():
            i = int(np.flatnonzero(~within)[0])
            raise DecryptionError(
                f"decrypted slot {i} exceeds the bound {contributors}·{self.value_max} of {contributors} "
                "contributors: wrong key or tampered sum"
            )
        L = self.vector_length
        if lo.size > L and any(word[L:].any() for word in words):
            raise DecryptionError("a padding slot decrypted to a non-zero value: wrong key or tampered sum")
        # the low 64 bits hold the sum modulo 2^64 >= 2^k; ring_sub reduces modulo 2^k, which drops the
        # carry masks 2^k·Σr (and, unmasked, the carries themselves)
        correction = np.uint64((contributors * self.offset) & _MASK64)
        return ring_sub(lo[:L], np.full(L, correction, dtype=np.uint64), self.ring_bits)


def _bits_to_u64(bits: np.ndarray) -> np.ndarray:
    """``(..., w)`` little-endian bit arrays with ``w <= 64`` to uint64."""
    width = bits.shape[-1]
    if width < 64:
        pad = [(0, 0)] * (bits.ndim - 1) + [(0, 64 - width)]
        bits = np.pad(bits, pad)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8")[..., 0].astype(np.uint64)
