"""Hadamard matrices of the orders qconvert can build: Sylvester's (powers of two) and Paley's
constructions I and II (from the quadratic character of a finite field GF(q), q a prime power),
and their Kronecker products (``hadamard_factors``): 12 = Paley I (q = 11), 20 = Paley I (19),
28 = Paley I (27 = 3^3), 36 = Paley II (17), ...  Used by the residual-stream rotations
(``qconvert.solvers.rotation``) and the online transform (``qconvert.online_hadamard``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch

from qconvert.errors import RotationUnsupported

DENSE_FACTOR = 64  # Kronecker factors are merged into dense blocks up to this order for x @ Q


# ---- number theory: prime powers and the quadratic character of GF(q) ----------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with ``q = p**k``, p prime; None when q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); polynomials are coefficient lists, constant term first, f monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _monic(p: int, degree: int) -> Iterator[list[int]]:
    """Every monic polynomial of ``degree`` over GF(p), in a fixed order."""
    for code in range(p**degree):
        yield [(code // p**i) % p for i in range(degree)] + [1]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic polynomial of degree k over GF(p) (in ``_monic`` order) that no monic
    polynomial of degree 1..k/2 divides: it defines GF(p^k) as polynomials modulo it."""
    for f in _monic(p, k):
        if f[0] == 0:
            continue
        if all(any(_poly_mod(f, d, p)) for deg in range(1, k // 2 + 1) for d in _monic(p, deg)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _quadratic_character(p: int, k: int) -> torch.Tensor:
    """chi(x) for the elements of GF(p^k), numbered by their base-p digits (constant term
    first): 0 at zero, +1 on nonzero squares, -1 on the rest.  int64 [q]."""
    q = p**k
    if k == 1:  # Euler's criterion
        return torch.tensor([0] + [1 if pow(x, (p - 1) // 2, p) == 1 else -1 for x in range(1, q)])
    f = _irreducible(p, k)
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    for x in range(1, q):
        a = [(x // p**i) % p for i in range(k)]
        square = _poly_mod([sum(a[i] * a[n - i] for i in range(max(0, n - k + 1), min(n, k - 1) + 1))
                            for n in range(2 * k - 1)], f, p)
        chi[sum(c * p**i for i, c in enumerate(square))] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """``J[i, j] = chi(a_i - a_j)`` over GF(q) (int64 [q, q]): antisymmetric for q = 3 mod 4,
    symmetric for q = 1 mod 4; ``J J^T = q I - 1`` and every row sums to 0."""
    p, k = _prime_power(q)
    chi = _quadratic_character(p, k)
    digits = torch.stack([(torch.arange(q) // p**i) % p for i in range(k)], dim=1)  # [q, k]
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # digit-wise subtraction in GF(p^k)
    return chi[(diff * torch.tensor([p**i for i in range(k)])).sum(-1)]


# ---- Hadamard matrices ---------------------------------------------------------------------

def _paley1(q: int) -> torch.Tensor:
    """Paley I, q = 3 mod 4: ``H = I + [[0, 1^T], [-1, J]]``, a Hadamard matrix of order q + 1."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Paley II, q = 1 mod 4: with the symmetric conference matrix ``C = [[0, 1^T], [1, J]]``,
    ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``, of order 2 (q + 1)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    return (torch.kron(c, torch.tensor([[1, 1], [1, -1]]))
            + torch.kron(torch.eye(q + 1, dtype=torch.int64), torch.tensor([[1, -1], [-1, -1]])))


def _paley_kind(m: int) -> tuple[Callable[[int], torch.Tensor], int] | None:
    """How to build an elementary Hadamard matrix of order m: (Paley I or II, q), or None."""
    pk = _prime_power(m - 1)
    if pk is not None and (m - 1) % 4 == 3:
        return _paley1, m - 1
    pk = _prime_power(m // 2 - 1) if m % 2 == 0 else None
    if pk is not None and (m // 2 - 1) % 4 == 1:
        return _paley2, m // 2 - 1
    return None


@functools.lru_cache(maxsize=None)
def _elementary(m: int) -> torch.Tensor:
    """An integer (+-1) Hadamard matrix of order m: Sylvester's [[1, 1], [1, -1]] for 2, else Paley."""
    if m == 2:
        h = torch.tensor([[1, 1], [1, -1]])
    else:
        build, q = _paley_kind(m)
        h = build(q)
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64)), f"Hadamard construction of order {m} failed"
    return h.to(torch.float64)


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders of elementary Hadamard matrices (2 = Sylvester, others Paley I/II) whose Kronecker
    product has order n, largest first; of all such products the cheapest to apply (smallest sum
    of orders, then the smallest tuple).  ``()`` for n = 1; None when qconvert knows no
    construction of order n."""
    if n < 1:
        return None
    if n == 1:
        return ()
    best = None
    for d in range(2, n + 1):
        if n % d or (d != 2 and _paley_kind(d) is None):
            continue
        rest = hadamard_factors(n // d)
        if rest is None:
            continue
        cand = tuple(sorted((d, *rest), reverse=True))
        if best is None or (sum(cand), cand) < (sum(best), best):
            best = cand
    return best


def has_hadamard(n: int) -> bool:
    """Whether ``hadamard(n)`` can build a matrix of order n."""
    return hadamard_factors(n) is not None


def _no_hadamard(n: int, what: str) -> RotationUnsupported:
    odd = n
    while odd % 2 == 0:
        odd //= 2
    return RotationUnsupported(
        f"no Hadamard matrix of order {n} ({what}) is known to qconvert: it builds orders 2^a * m from "
        f"Sylvester and Paley I/II matrices (m = 1, 12, 20, 28, 36, ...), and {n} = 2^{(n // odd).bit_length() - 1} * {odd} "
        "is not one of them; use --rotate random"
    )


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order n (float64 [n, n], entries +-1/sqrt(n), ``H H^T = I``):
    the Kronecker product of the elementary matrices ``hadamard_factors(n)``, scaled once."""
    factors = hadamard_factors(n)
    if factors is None:
        raise _no_hadamard(n, "asked for")
    h = torch.ones(1, 1, dtype=torch.float64)
    for block in _dense_blocks(factors):  # a few large products rather than many doublings
        h = torch.kron(h, block)
    return h / math.sqrt(n)


def _dense_blocks(factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Neighbouring elementary factors multiplied out (Kronecker) into integer blocks of order at
    most ``DENSE_FACTOR`` (or one elementary factor, if larger); their product is unchanged."""
    groups: list[list[int]] = []
    for m in factors:
        if groups and math.prod(groups[-1]) * m <= DENSE_FACTOR:
            groups[-1].append(m)
        else:
            groups.append([m])
    blocks = []
    for group in groups:
        f = torch.ones(1, 1, dtype=torch.float64)
        for m in group:
            f = torch.kron(f, _elementary(m))
        blocks.append(f)
    return blocks
