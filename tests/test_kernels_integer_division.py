"""The integer-only divisions of common.cuh (``qk::udiv_u64``, ``qk::DivBy``), as the I-LLM emulator
transcribes them line by line with 64-bit wrapping (qconvert_kernels/illm/emulate.py), against
Python's exact floor division.  The I-LLM kernels (requantization, DI-ClippedSoftmax, DI-Norm)
and the FP4 GEMM's group count divide only through these, so their bounds are checked here on
the CPU: edge divisors (1, 2, powers of two and their neighbours, 2^40 - 1, 2^63 + 1) and
numerators up to the stated bit bound.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from qconvert_kernels.illm.emulate import DivBy, EmulationError, udiv_u64

COMMON = (Path(__file__).parents[1] / "qconvert_kernels" / "common.cuh").read_text()
MASK = (1 << 64) - 1


def test_the_transcription_follows_the_source():
    """The constructs the emulator transcribes are the ones in common.cuh (a change there must be mirrored)."""
    for line in ("const int sh = __clzll(d) - __clzll(n);", "const unsigned long long ds = d << i;",
                 "int l = 64 - __clzll(d - 1ull);", "if (s < 64) s = 64;", "const bool carry = (r >> 63) != 0ull;",
                 "r = (r << 1) | 1ull;", "if (carry || r >= d) {", "m = q + 1ull;",
                 "return one ? n : (__umul64hi(n, m) >> shift);"):
        assert line in COMMON, line
    assert re.search(r"for \(int i = s - 1; i >= 0; --i\)", COMMON)


def _divisors(limit_bits: int, rng: random.Random) -> list[int]:
    d = {1, 2, 3, 5, 7, 127, 448, (1 << limit_bits) - 1}
    for b in range(1, limit_bits):
        d |= {(1 << b) - 1, 1 << b, (1 << b) + 1}
    d |= {rng.randrange(1, 1 << limit_bits) for _ in range(300)}
    return sorted(d)


def test_udiv_u64_is_floor_division():
    rng = random.Random(0)
    for d in _divisors(64, rng):
        for n in {0, 1, d - 1, d, d + 1, 2 * d, MASK, MASK - 1, rng.randrange(1 << 64), rng.randrange(max(d, 2) * 3)}:
            if 0 <= n <= MASK:
                assert udiv_u64(n, d) == n // d, (n, d)
    assert udiv_u64(5, 0) == 0  # d == 0 reads as 0, never loops


@pytest.mark.parametrize("nbits", [48, 32, 63])
def test_divby_is_floor_division_below_its_bound(nbits):
    """The callers' bounds: requant numerators < 2^48 with divisors < 2^40 (amax after its
    pre-shift), softmax numerators < 2^48 with divisors up to T 2^16."""
    rng = random.Random(nbits)
    for d in _divisors(40 if nbits == 48 else min(nbits, 62), rng):
        by = DivBy(d, nbits)
        assert by.m < 1 << 64
        top = (1 << nbits) - 1
        for n in {0, 1, d - 1, d, d + 1, top, top - 1, top - top % d, top - top % d - 1,
                  rng.randrange(1 << nbits), rng.randrange(1 << nbits)}:
            if 0 <= n <= top:
                assert by.div(n) == n // d, (n, d, nbits)


def test_divby_would_fail_above_its_bound():
    """The check can fail: numerators above what s covers (s = 64 for an 8-bit bound and d = 7:
    good below 2^61) give wrong quotients, and the emulator refuses a numerator above the bound."""
    by, rng = DivBy(7, 8), random.Random(1)
    raw = lambda n: ((n * by.m) >> 64) >> by.shift  # noqa: E731  the kernel's div, no bound check
    assert [n for n in (rng.randrange(1 << 63, 1 << 64) for _ in range(200)) if raw(n) != n // 7]
    with pytest.raises(EmulationError, match="outside the 8-bit bound"):
        by.div(256)
