"""The one rule for rows per chunk (ops/_chunks.py chunk_rows, csrc/chunks.h for the CUDA host loops):
its answers at the benchmarked shapes, the C++ header against the Python function, and every chunked
path sizing its chunks through it."""
from __future__ import annotations

import itertools
import re
import subprocess

import pytest
import torch

from lossforge_kernels.distributed import cross_entropy as dist_ce
from lossforge_kernels.ops import _chunks
from lossforge_kernels.ops import triplet as triplet_ops
from lossforge_kernels.ops._chunks import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, Chunks, chunk_rows
from lossforge_kernels.reference.triplet import Distance, Mining

from .test_csrc_build import CSRC, host_program

MiB = 1 << 20


def _lce(n, v, buffers=1):
    return chunk_rows(n, 2 * v, 0, buffers=buffers, min_rows=n)  # as Chunks asks, bf16 logits


@pytest.mark.parametrize("n,v,fwd,bwd", [
    (8192, 128256, 1024, 512), (16384, 128256, 1024, 512),  # the language-model shape: 8 and 16 chunks
    (8192, 32000, 4096, 2048), (16384, 32000, 4096, 2048), (4096, 32000, 4096, 2048),
    (16384, 256000, 512, 256),
])
def test_linear_cross_entropy_takes_the_most_rows_the_cap_allows(n, v, fwd, bwd):
    assert (_lce(n, v), _lce(n, v, buffers=2)) == (fwd, bwd)
    assert _lce(n, v) * 2 * v <= MAX_CHUNK_BYTES


@pytest.mark.parametrize("b,d,rows", [(16384, 768, 512), (65536, 512, 128), (4096, 512, 2048),
                                      (262144, 512, 128)])  # the last: a quarter of its 512 MiB of inputs
def test_contrastive_chunks(b, d, rows):
    got = chunk_rows(b, 4 * max(b, d), 0, input_bytes=2 * b * d * 2)  # as contrastive.cu asks, bf16
    assert got == rows
    assert got * 4 * b <= max(MIN_CHUNK_BYTES, 2 * b * d * 2 // 4)


@pytest.mark.parametrize("b,mining,rows", [(8192, 1024, 1024), (32768, 256, 256), (262144, 256, 64)])
def test_triplet_chunks(b, mining, rows):
    x_bytes = b * 512 * 2
    assert chunk_rows(b, 4 * b, 0, input_bytes=x_bytes, min_rows=256) == mining  # triplet.cu's mining
    assert chunk_rows(b, 4 * b, 0, input_bytes=x_bytes) == rows  # ops/triplet.py's row chunks


def test_explicit_sizes_and_edges():
    assert chunk_rows(100, 50, 7) == 7 and chunk_rows(5, 50, 7) == 5
    assert chunk_rows(10, 4 * 10**9, 0) == 1  # a row over the budget still runs, one at a time
    assert chunk_rows(0, 100, 0) == 1 and chunk_rows(0, 100, 3) == 1
    assert chunk_rows(10**6, 4 * 1000, 0) == (MIN_CHUNK_BYTES // 4000) // 128 * 128  # whole tiles
    assert chunk_rows(10**6, 4 * 10**6, 0) == 8  # under a tile: not rounded
    # min_rows is granted only within the cap
    assert chunk_rows(10**6, MiB, 0, min_rows=10**6) == MAX_CHUNK_BYTES // MiB
    for total, row, inputs, buffers in itertools.product((1, 300, 10**5), (4, 4000, 10**6), (0, 10**9, 10**12),
                                                         (1, 2)):
        rows = chunk_rows(total, row, 0, input_bytes=inputs, buffers=buffers)
        assert 1 <= rows <= total
        assert rows == 1 or rows * row * buffers <= min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, inputs // 4))


# ---- csrc/chunks.h answers as the Python function does ----------------------------------------------

_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "chunks.h"
int main(int argc, char** argv) {
  if (argc != 7) return 2;
  long long a[6];
  for (int i = 0; i < 6; ++i) a[i] = std::atoll(argv[i + 1]);
  namespace c = lossforge::chunks;
  std::printf("%lld %lld %lld %lld\n", static_cast<long long>(c::chunk_rows(a[0], a[1], a[2], a[3], a[4], a[5])),
              static_cast<long long>(c::kMinChunkBytes),
              static_cast<long long>(c::kMaxChunkBytes), static_cast<long long>(c::kTileRows));
  return 0;
}
"""

GRID = list(itertools.product((0, 1, 127, 4096, 262144), (1, 4 * 768, 2 * 128256, 4 * 262144, 3 << 30),
                              (0, 5), (0, 48 * MiB, 600 * MiB, 8 << 30), (1, 2), (1, 256, 262144)))


@pytest.fixture(scope="module")
def header_program(tmp_path_factory):
    return host_program(tmp_path_factory, "chunks", _MAIN)


def test_header_matches_the_python_rule(header_program):
    for args in GRID:
        got = subprocess.run([str(header_program), *map(str, args)], capture_output=True, text=True, check=True)
        rows, low, high, tile = (int(v) for v in got.stdout.split())
        total, row_bytes, chunk_size, inputs, buffers, min_rows = args
        want = chunk_rows(total, row_bytes, chunk_size, input_bytes=inputs, buffers=buffers, min_rows=min_rows)
        assert rows == want, f"chunks.h gives {rows}, chunk_rows {want} for {args}"
        assert (low, high, tile) == (MIN_CHUNK_BYTES, MAX_CHUNK_BYTES, _chunks.TILE_ROWS)


def test_cuda_host_loops_size_through_the_header():
    for name in ("contrastive.cu", "triplet.cu"):
        source = (CSRC / name).read_text()
        assert '#include "chunks.h"' in source and "chunks::chunk_rows(" in source, name
        assert not re.search(r"<<\s*20", source), f"{name} names a byte budget of its own"


# ---- every Python chunked path follows the rule ---------------------------------------------------

@pytest.fixture
def small_budget(monkeypatch):
    """A budget of 8000 bytes, so that small inputs are walked in several chunks."""
    monkeypatch.setattr(_chunks, "MIN_CHUNK_BYTES", 8000)
    monkeypatch.setattr(_chunks, "MAX_CHUNK_BYTES", 8000)


def test_linear_cross_entropy_chunks_follow_the_rule(small_budget):
    x, w = torch.randn(50, 8), torch.randn(40, 8)
    assert Chunks(x, w, None, 0).step == 8000 // (40 * 4)
    assert Chunks(x, w, None, 0, buffers=2).step == 8000 // (2 * 40 * 4)
    assert Chunks(x, w, None, 7).step == 7


def test_triplet_row_chunks_follow_the_rule(small_budget):
    x = torch.randn(60, 8)
    params = triplet_ops.ROWS_SPEC.named(dict(mining=Mining.SEMI_HARD, distance=Distance.EUCLIDEAN, margin=0.2,
                                              soft_margin=False, normalize=False, chunk_size=None,
                                              max_class_size=None))
    chunks = triplet_ops._RowChunks("triton", (x, torch.zeros(60, dtype=torch.int64), (None, None)), params)
    assert chunks.step == 8000 // (4 * 60) and chunks.gram.shape == (chunks.step, 60)


def test_vocab_parallel_blocks_follow_the_rule(small_budget):
    blocks = list(dist_ce.row_blocks(200, 40))
    assert blocks == [slice(start, start + 8000 // (4 * 40)) for start in range(0, 200, 50)]
