"""Numeric block quantizers (numpy only): symmetric int8 per row or per block, and the MatMulNBits layout.

``quantize_blocks_int8`` writes an 8-bit ``MatMulNBits`` weight: B [N, n_blocks, block] (uint8, value + 128),
scales [N * n_blocks]. ``dequantize_rows`` reads a 4- or 8-bit MatMulNBits weight back as float rows.
The graph rewrites that use them are in ``quant.tied``.
"""

from __future__ import annotations

import numpy as np

#: Symmetric 8-bit MatMulNBits blocks along K: the tied table's layout, also the n-bit pass's 8-bit head and
#: int8 ``granularity="block"``.
INT8_BLOCK_SIZE = 128


def quantize_row_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``w ~= q * scale[:, None]``."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def pow2_block(k: int, block_size: int) -> int:
    """``block_size``, or the smallest power of two >= 16 covering K when K is smaller."""
    b = 16
    while b < min(k, block_size):
        b *= 2
    return b


def quantize_blocks_int8(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of ``block_size`` along each row (K zero-padded to whole blocks).

    Returns ``(b, scales)``: b uint8 [N, n_blocks, block_size] holding ``q + 128``, scales [N * n_blocks].
    """
    n, k = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((n, nb * block_size), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, block_size)
    amax = np.abs(blocks).max(axis=2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16)
    return (q + 128).astype(np.uint8), scale.reshape(-1)


def unpack_nibbles(arr: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte, low nibble first, along the last axis."""
    lo, hi = arr & 0x0F, arr >> 4
    return np.stack([lo, hi], axis=-1).reshape(*arr.shape[:-1], arr.shape[-1] * 2)


def dequantize_rows(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, k: int) -> np.ndarray:
    """Numpy reference of the MatMulNBits weight: [N, K] rows (used to verify the tie)."""
    n, nb, _ = b.shape
    q = unpack_nibbles(b) if bits == 4 else b
    q = q.reshape(n, nb, -1).astype(np.float32)
    if zp is None:
        z = np.full((n, nb), 2 ** (bits - 1), np.float32)
    else:
        z = (unpack_nibbles(zp) if bits == 4 else zp)[:, :nb].astype(np.float32)
    return ((q - z[..., None]) * scales.reshape(n, nb)[..., None]).reshape(n, -1)[:, :k]
