"""The order of the data: seeded permutations and the weighted mixture schedule. Pure functions of their keys.

- `Permutation(n, key)`: a stateless bijection of [0, n) (a 4-round Feistel network on the next even power of two,
  cycle-walking back into range), evaluated for any index array without building a table: an epoch of a prepared
  corpus of any size is shuffled at no start-up cost, and any rank maps any index on its own.
- `block_permutation(size, key)`: a small seeded shuffle (within-block shuffling of a logical stream).
- `Mixture`: which source global sample g comes from, by the largest-deficit rule of Megatron's blending: sample g
  goes to the source whose count lags its weight's share the most (`w_s * (n + 1) - count_s`, ties to the first
  name). Deterministic, no random draws; the state is the counts, so a resume continues it exactly, and a resume with
  new weights starts a new segment from the counts reached (each source continues where it stopped).
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)


def derive_key(*parts: object) -> int:
    """A 64-bit key from any printable parts (seed, purpose, source fingerprint, epoch, ...)."""
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Permutation:
    """A bijection of [0, n) keyed by `key`; `perm[i]` for ints or integer arrays."""

    ROUNDS = 4

    def __init__(self, n: int, key: int) -> None:
        self.n = int(n)
        bits = max(2, (max(self.n - 1, 1)).bit_length())
        self.half = (bits + 1) // 2  # domain 2^(2*half) >= n, at most 4n: under 4 walks on average
        self.low = np.uint64((1 << self.half) - 1)
        rng = np.random.Generator(np.random.PCG64(key))
        self.round_keys = rng.integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.low
        for k in self.round_keys:
            mixed = (right * np.uint64(0x9E3779B97F4A7C15) + k) & np.uint64(0xFFFFFFFFFFFFFFFF)
            mixed ^= mixed >> np.uint64(29)
            mixed = (mixed * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
            mixed ^= mixed >> np.uint64(32)
            left, right = right, left ^ (mixed & self.low)
        return (left << half) | right

    def __getitem__(self, index):
        scalar = np.isscalar(index)
        x = np.atleast_1d(np.asarray(index, dtype=np.uint64))
        if x.size and (int(x.max()) >= self.n or int(x.min()) < 0):
            raise IndexError(f"index out of range [0, {self.n})")
        with np.errstate(over="ignore"):
            x = self._encrypt(x)
            out = x >= np.uint64(self.n)
            while out.any():  # cycle-walking: re-encrypt until inside [0, n); a bijection on [0, n) results
                x[out] = self._encrypt(x[out])
                out = x >= np.uint64(self.n)
        result = x.astype(np.int64)
        return int(result[0]) if scalar else result


def block_permutation(size: int, key: int) -> np.ndarray:
    """A seeded shuffle of range(size)."""
    return np.random.Generator(np.random.PCG64(key)).permutation(size)


class Mixture:
    """The source of each global sample, from `start` on: largest-deficit over normalised weights.

    `counts` are the samples each source has had in the whole run (they are what a checkpoint saves and what
    `samples_<name>` logs); `segment_start`/`base` record where the current weights took over, so that the deficit
    is measured from there and an unchanged resume continues the same sequence.
    """

    def __init__(
        self,
        weights: dict[str, float],
        start: int = 0,
        counts: dict[str, int] | None = None,
        segment: dict | None = None,
    ) -> None:
        self.names = sorted(weights)
        total = float(sum(weights.values()))
        self.weights = [weights[n] / total for n in self.names]
        self.next = start
        self.counts = [int((counts or {}).get(n, 0)) for n in self.names]
        same = segment is not None and segment.get("weights") == {n: weights[n] for n in self.names}
        if same:
            self.segment_start = int(segment["start"])
            self.base = [int(segment["base"].get(n, 0)) for n in self.names]
        else:  # first start, or new weights: a new segment from the counts reached
            self.segment_start, self.base = start, list(self.counts)
        self._raw_weights = {n: weights[n] for n in self.names}

    def take(self) -> int:
        """The source index of the next global sample; advances by one."""
        if len(self.names) == 1:
            s = 0
        else:
            n = self.next - self.segment_start + 1
            best, s = None, 0
            for i, w in enumerate(self.weights):
                deficit = w * n - (self.counts[i] - self.base[i])
                if best is None or deficit > best:
                    best, s = deficit, i
        self.counts[s] += 1
        self.next += 1
        return s

    def state_dict(self) -> dict:
        return {
            "counts": dict(zip(self.names, self.counts)),
            "segment": {
                "weights": self._raw_weights,
                "start": self.segment_start,
                "base": dict(zip(self.names, self.base)),
            },
        }
