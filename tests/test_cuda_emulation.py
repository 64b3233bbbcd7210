"""The CUDA emulation (LOSSFORGE_CUDA_EMULATE=1, csrc/emulate/): what it models and what it reports.

The kernels of tests/emulation/kernels.cu run on the emulation's scheduler as a plain host program:
barriers and warp collectives exchange values between threads, launch limits are the driver's,
conversions round as the GPU does, and each kind of bug the GPU would show only as a hang or garbage
is reported with its source line. Under AddressSanitizer an out-of-bounds global access fails, in
that program and in one small call of every kernel family of the real extension.
The kernel families themselves are tested against the references by every test that takes
`kernel_backend` (the "cuda" backend runs on CPU tensors under the emulation).
"""
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from lossforge_kernels import _cuda_emulation

ROOT = pathlib.Path(__file__).resolve().parent.parent
CXX = shutil.which("c++") or shutil.which("g++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="a host C++ compiler is needed")


def _libasan():
    if CXX is None:
        return None
    found = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def _build(tmp_path_factory, sanitize=None):
    from torch.utils.cpp_extension import include_paths

    tmp = tmp_path_factory.mktemp("emulation")
    exe = tmp / "kernels"
    flags = [f.replace("-O2", "-O1") for f in _cuda_emulation.compile_flags(sanitize)]
    cmd = [CXX, "-std=c++17", *flags, "-Wall", "-Werror", *[f"-I{p}" for p in include_paths()], "-x", "c++",
           str(ROOT / "tests" / "emulation" / "kernels.cu"), "-x", "none", str(_cuda_emulation.CSRC / "emulate" / "runtime.cpp"),
           "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}"
    return exe


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if CXX is None:
        pytest.skip("a host C++ compiler is needed")
    return _build(tmp_path_factory)


def _run(program, case, env=None):
    done = subprocess.run([str(program), case], capture_output=True, text=True, env=env, timeout=120)
    return done.returncode, done.stdout.strip(), done.stderr


def _floats(text):
    return [float(v) for v in text.split()]


def test_barriers_order_shared_memory(program):
    code, out, _ = _run(program, "reverse")
    assert code == 0 and _floats(out) == [float(b * 64 + 63 - i) for b in range(2) for i in range(64)]


def test_a_missing_barrier_reads_unwritten_shared_memory_as_nan(program):
    # Without __syncthreads thread 0 reads buf[63] before thread 63 wrote it: NaN, as no GPU promises.
    code, out, _ = _run(program, "reverse_nosync")
    values = _floats(out)
    assert code == 0 and values[0] != values[0] and values[32] == 31.0


def test_warp_and_block_collectives(program):
    code, out, _ = _run(program, "collectives")
    assert code == 0
    sums, rest = out.split("\n")
    want = [sum(float((b * 96 + w * 32 + i) % 7) + 0.5 for i in range(32)) for b in range(2) for w in range(3)]
    assert _floats(sums) == want
    ballots = rest.split()[:6]
    assert ballots == ["aaaaaaaa"] * 6
    assert [int(v) for v in rest.split()[6:]] == [32, 1, 32, 1]  # __syncthreads_count(i % 3 == 0), _or(i == 7)


@pytest.mark.parametrize("case, message", [
    ("divergent_barrier", r"__syncthreads at kernels.cu:\d+ is reached by 16 of 64 threads \(48 exited"),
    ("exited_barrier", r"__syncthreads at kernels.cu:\d+ is reached by 63 of 64 threads \(1 exited"),
    ("two_barriers", r"wait at different barriers: __syncthreads at kernels.cu:\d+ and __syncthreads at kernels.cu:\d+"),
    ("missing_lane", r"__shfl_xor_sync at kernels.cu:\d+ in warp 0 waits for lanes 3 \(exited\) that never join"),
    ("partial_warp", r"in warp 1 waits for lanes 3 \(exited\) 8 \(not in the block\)"),
    ("smem_over_default", r"65536 bytes of dynamic shared memory, the kernel allows 49152"),
    ("too_many_threads", r"1025 threads per block"),
])
def test_reports_what_a_gpu_shows_as_a_hang_or_garbage(program, case, message):
    import re

    code, out, _ = _run(program, case)
    assert code == 3 and out.startswith("error: CUDA emulation"), out
    assert re.search(message, out), out


def test_opted_in_shared_memory_launches(program):
    assert _run(program, "smem_opted_in")[:2] == (0, "ok")


def test_unwritten_dynamic_shared_memory_is_nan(program):
    code, out, _ = _run(program, "unwritten_smem")
    values = _floats(out)
    assert code == 0 and values[:7] == [2.0] * 7 and values[7] != values[7]


def test_unwritten_static_shared_memory_is_nan_in_every_block(program):
    # slots[0] is never written: NaN in the second block too (not the first block's leftovers)
    code, out, _ = _run(program, "unwritten_static_smem")
    values = _floats(out)
    assert code == 0 and values[:3] == [3.0] * 3 and values[3] != values[3]


def test_half_conversions_round_to_nearest_even(program):
    code, out, _ = _run(program, "halves")
    # ties go to the even neighbour (1.0), above them up; 65504 is half's largest; __expf(-100) is
    # subnormal in float and flushed to zero like ex2.approx.ftz.
    assert code == 0 and out.split() == ["3c00", "3c02", "3f80", "3f82", "65504", "0"]


@pytest.mark.skipif(not _cuda_emulation.enabled() or shutil.which("readelf") is None,
                    reason="runs with the CUDA emulation (LOSSFORGE_CUDA_EMULATE=1) and readelf")
def test_only_shared_memory_lives_in_the_emulated_librarys_tls():
    # The runtime fills the library's whole TLS block with 0xff before every block (the static
    # __shared__ variables live there): any other thread-local would be destroyed.
    listing = subprocess.run(["readelf", "-sW", _cuda_emulation.load()], capture_output=True, text=True).stdout
    tls = {line.split()[-1] for line in listing.splitlines() if " TLS " in line}
    assert tls, "no static shared memory found in the emulated library"
    assert all("9lossforge" in name for name in tls), sorted(n for n in tls if "9lossforge" not in n)


# ---- the tensor-core product (csrc/mma.cuh): mma.sync m16n8k16 as a warp collective ----

MMA_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _bits(x, dtype):
    return (x.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF).tolist()


def _words(x):
    """x's fp32 bits as unsigned ints, nested as x is."""
    return (x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF).tolist()


def _mma_fragments(a, b, c, dtype, swap_a=False):
    """Each lane's registers of A (16 x 16), B (16 x 8) and C (16 x 8, fp32) as the PTX ISA lays them
    out for m16n8k16 (g = lane // 4, t = lane % 4); swap_a exchanges a[1] and a[2] (a wrong layout)."""
    ab, bb = _bits(a, dtype), _bits(b, dtype)
    cw = _words(c)
    lanes = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        row_pair = lambda r, k: ab[r][k] | ab[r][k + 1] << 16  # noqa: E731
        regs_a = [row_pair(g, 2 * t), row_pair(g + 8, 2 * t), row_pair(g, 2 * t + 8), row_pair(g + 8, 2 * t + 8)]
        if swap_a:
            regs_a[1], regs_a[2] = regs_a[2], regs_a[1]
        regs_b = [bb[2 * t][g] | bb[2 * t + 1][g] << 16, bb[2 * t + 8][g] | bb[2 * t + 9][g] << 16]
        regs_c = [cw[g][2 * t], cw[g][2 * t + 1], cw[g + 8][2 * t], cw[g + 8][2 * t + 1]]
        lanes.append(regs_a + regs_b + regs_c)
    return lanes


def _mma_d(words):
    """D (16 x 8) from each lane's d[0..3] words, by the same layout."""
    vals = torch.tensor([int(w, 16) for w in words], dtype=torch.int64).to(torch.int32).view(torch.float32)
    d = torch.empty(16, 8)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            d[g + (8 if i >= 2 else 0), 2 * t + (i & 1)] = vals[lane * 4 + i]
    return d


def _post_fragments(program, case, lanes):
    """D (16 x 8) from the program's warp product on each lane's posted registers."""
    text = "\n".join(" ".join(f"{w:x}" for w in lane) for lane in lanes)
    done = subprocess.run([str(program), case], input=text, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return _mma_d(done.stdout.split())


def _run_mma(program, name, dtype, swap_a=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    a, b = a.to(MMA_DTYPES[dtype]), b.to(MMA_DTYPES[dtype])
    got = _post_fragments(program, f"mma_fragments_{dtype}", _mma_fragments(a, b, c, MMA_DTYPES[dtype], swap_a))
    return got, a.double() @ b.double() + c.double()


@pytest.mark.parametrize("dtype", list(MMA_DTYPES))
def test_mma_fragments_follow_the_ptx_layout(program, dtype):
    # Every lane's D elements, from the whole warp's fragments, against the float64 product.
    for seed in range(3):
        got, want = _run_mma(program, "mma", dtype, seed=seed)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", list(MMA_DTYPES))
def test_mma_with_a_wrong_fragment_layout_does_not_match(program, dtype):
    # The comparison above can fail: A's registers 1 and 2 exchanged give another product.
    got, want = _run_mma(program, "mma", dtype, swap_a=True)
    assert (got.double() - want).abs().max() > 0.1


@pytest.mark.parametrize("dtype", list(MMA_DTYPES))
@pytest.mark.parametrize("k", [16, 48])
def test_mma_fragment_loads_from_shared_memory(program, dtype, k):
    # mma::load_a / load_b on shared tiles of element pairs, k / 16 products accumulated.
    g = torch.Generator().manual_seed(k)
    x = torch.randn(16, k, generator=g).to(MMA_DTYPES[dtype])
    y = torch.randn(8, k, generator=g).to(MMA_DTYPES[dtype])
    pairs = lambda m: [r[i] | r[i + 1] << 16 for r in _bits(m, MMA_DTYPES[dtype]) for i in range(0, k, 2)]  # noqa: E731
    got = _run_tile(program, f"mma_tile_{dtype}", k, pairs(x) + pairs(y))
    torch.testing.assert_close(got, x.double() @ y.double().T, rtol=1e-5, atol=1e-5)


def _run_tile(program, case, k, words):
    """D (16 x 8, float64) of the program's tile product on X and Y given as operand words, row by row."""
    text = f"{k}\n" + " ".join(f"{w:x}" for w in words)
    done = subprocess.run([str(program), case], input=text, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.tensor(_floats(done.stdout), dtype=torch.float64).reshape(16, 8)


# ---- fp32 operands: mma.sync m16n8k8 tf32, and mma_step's three products on a tf32 split ----

def _tf32(x):
    """x with the low 13 bits of each float cleared: values a tf32 operand carries exactly."""
    return (x.float().view(torch.int32) & -8192).view(torch.float32)


def _run_tf32_mma(program, seed, swap_a=False):
    g = torch.Generator().manual_seed(seed)
    a, b = _tf32(torch.randn(16, 8, generator=g)), _tf32(torch.randn(8, 8, generator=g))
    c = torch.randn(16, 8, generator=g)
    aw, bw, cw = _words(a), _words(b), _words(c)
    lanes = []
    for lane in range(32):  # the PTX ISA's m16n8k8 tf32 layout
        gr, t = lane // 4, lane % 4
        regs_a = [aw[gr][t], aw[gr + 8][t], aw[gr][t + 4], aw[gr + 8][t + 4]]
        if swap_a:
            regs_a[1], regs_a[2] = regs_a[2], regs_a[1]
        lanes.append(regs_a + [bw[t][gr], bw[t + 4][gr]] + [cw[gr][2 * t], cw[gr][2 * t + 1], cw[gr + 8][2 * t],
                                                          cw[gr + 8][2 * t + 1]])
    return _post_fragments(program, "mma_fragments_tf32", lanes), a.double() @ b.double() + c.double()


def test_tf32_mma_fragments_follow_the_ptx_layout(program):
    # tf32 operands (exact products): every lane's D elements against the float64 product; A's
    # registers 1 and 2 exchanged give another product (the comparison can fail).
    for seed in range(3):
        got, want = _run_tf32_mma(program, seed)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    got, want = _run_tf32_mma(program, 0, swap_a=True)
    assert (got.double() - want).abs().max() > 0.1


def _run_fp32_tile(program, x, y):
    return _run_tile(program, "mma_tile_fp32", x.shape[1], sum(_words(x), []) + sum(_words(y), []))


@pytest.mark.parametrize("k", [8, 48])
def test_fp32_mma_step_keeps_fp32_precision(program, k):
    # Full fp32 operands through mma_step's head/tail split: within fp32's accumulation error of the
    # float64 product, where one tf32 product (the heads alone) is 100x further off.
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(16, k, generator=g), torch.randn(8, k, generator=g)
    want = x.double() @ y.double().T
    torch.testing.assert_close(_run_fp32_tile(program, x, y), want, rtol=1e-5, atol=1e-5)
    heads = _tf32(x).double() @ _tf32(y).double().T
    assert (heads - want).abs().max() > 1e-3  # what a single tf32 product would miss


def test_fp32_mma_step_passes_inf_and_nan(program):
    # An inf feature makes its row +-inf against rows that are nonzero there (as the float64 product),
    # never NaN from inf times a zero or opposite-signed tail; a NaN makes its row NaN.
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 16, generator=g), torch.randn(8, 16, generator=g)
    y[:, 5] = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 1.0 + 2.0**-20, 2.0, -0.25])  # tails zero and not
    x[3, 5], x[9, 2] = math.inf, math.nan
    got, want = _run_fp32_tile(program, x, y), x.double() @ y.double().T
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), got[[3, 9]]
    assert torch.equal(got[3].sign(), want[3].sign())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_mma_needs_the_whole_warp(program):
    code, out, _ = _run(program, "mma_partial_warp")
    assert code == 3 and "mma.m16n8k16.f16 at mma.cuh" in out and "not in the block" in out, out


# ---- AddressSanitizer ----

needs_asan = pytest.mark.skipif(_libasan() is None, reason="the compiler's libasan is needed")


@needs_asan
def test_asan_reports_an_out_of_bounds_read_in_a_kernel(tmp_path_factory):
    exe = _build(tmp_path_factory, sanitize="address")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    code, out, err = _run(exe, "out_of_bounds", env)
    assert code != 0 and "heap-buffer-overflow" in err and "out_of_bounds_kernel" in err, err[-3000:]
    code, out, err = _run(exe, "collectives", env)  # the fibers' stack switches raise no false report
    assert code == 0, err[-3000:]


@needs_asan
@pytest.mark.skipif(not _cuda_emulation.enabled(), reason="runs with the CUDA emulation (LOSSFORGE_CUDA_EMULATE=1)")
def test_every_kernel_family_under_asan():
    # One small call of every family's kernels, forward and backward, built with AddressSanitizer:
    # a global access outside a tensor, with the kernels' real index arithmetic, fails here.
    env = dict(os.environ, LOSSFORGE_CUDA_EMULATE="1", LOSSFORGE_CUDA_EMULATE_SANITIZE="address",
               LD_PRELOAD=_libasan(), ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "tests.kernel_calls", "cuda", "cpu"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0 and "every family ran" in done.stdout, (done.stdout + done.stderr)[-5000:]
