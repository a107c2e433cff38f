"""Groups of duplicate images: the same bytes, or the same picture resized or re-encoded.

Pairs closer than a Hamming distance of NEAR_BITS between perceptual hashes are joined, and groups
are the connected pairs. Every pair is compared (64-bit XOR and popcount, a block of rows against
all at a time): exact, and quadratic in the number of images, but with a small constant."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Hamming distance between 64-bit DCT hashes at which two images count as the same picture (always
# even: each hash has 32 bits set). On the 1,398 shared photos (bench/data_check.py): a photo and
# its copy at half the size saved as JPEG at quality 75 differ in 0-4 bits, and no two photos outside
# the groups found are closer than 10. Looked at by eye: the pair at 8 is two crops of one photo, the
# pairs at 10 one more crop of it and two different cats. A 90% crop moves 2-18 bits: found sometimes.
NEAR_BITS = 8
BLOCK = 1 << 22  # pair distances computed at once: 32 MB of uint64


def duplicate_groups(
    digests: Sequence[str], hashes: Sequence[int | None], *, near_bits: int = NEAR_BITS
) -> list[list[int]]:
    """Indices of images that are copies of each other, in groups of two or more, each sorted, in
    order of their first member. `digests` (of the files' bytes) join exact copies; `hashes`
    (perceptual; None for an image without one) join those at most `near_bits` apart."""
    parent = list(range(len(digests)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[str, int] = {}
    for i, d in enumerate(digests):
        if d:
            join(first.setdefault(d, i), i)
    for i, j in near_pairs(hashes, near_bits):
        join(i, j)
    groups: dict[int, list[int]] = {}
    for i in range(len(digests)):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def near_pairs(hashes: Sequence[int | None], near_bits: int) -> list[tuple[int, int]]:
    """(i, j), i < j, of every two hashes at most `near_bits` bits apart."""
    index = np.asarray([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if len(index) < 2:
        return []
    h = np.asarray([hashes[i] for i in index], dtype=np.uint64)
    rows = max(1, BLOCK // len(h))
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(h), rows):
        block = h[start : start + rows]
        close = np.bitwise_count(block[:, None] ^ h[None, :]) <= near_bits
        a, b = np.nonzero(close)
        a += start
        keep = b > a
        pairs += zip(index[a[keep]].tolist(), index[b[keep]].tolist(), strict=True)
    return pairs


def distances(hashes: Sequence[int]) -> np.ndarray:
    """Each hash's distance in bits to its nearest other (for choosing NEAR_BITS)."""
    h = np.asarray(hashes, dtype=np.uint64)
    d = np.bitwise_count(h[:, None] ^ h[None, :]).astype(np.int64)
    np.fill_diagonal(d, 64)
    return d.min(axis=1)
