"""The I-LLM launchers (qconvert_kernels/illm/cuda.py) checked on the CPU, with the CuPy launch replaced
by a recorder (``launch.launch_hook``): argument validation, contiguous inputs and outputs, every
pointer argument alive at the launch, and no host synchronization (graph capture).  The kernels
themselves are checked against the integer reference on a GPU (tests/test_kernels_illm_gpu.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from qconvert_kernels import launch
from qconvert_kernels.illm import cuda as cuda_illm


class Recorder:
    """Launch hook: every pointer argument must resolve to a live tensor at launch time; keeps a
    clone of each so the test can look at what the kernel would have read."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, grid, block, args, smem, source):
        tensors = {}
        for i, a in enumerate(args):
            if getattr(a, "dtype", None) is not None and a.dtype.name == "uint64" and int(a):
                t = launch.tensor_at(int(a))  # LookupError if the tensor was already freed
                assert t.is_contiguous(), (name, i)
                tensors[i] = t.clone()
        self.calls.append((name, grid, block, args, tensors))


@contextlib.contextmanager
def no_sync():
    """Host reads of device values fail inside this block (the launcher's call)."""
    def boom(*a, **k):
        raise AssertionError("host synchronization in a launcher")

    with pytest.MonkeyPatch.context() as mp:
        for attr in ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy"):
            mp.setattr(torch.Tensor, attr, boom)
        yield


def test_matmul_computes_kmin_on_the_device_without_sync():
    gen = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (3, 64), generator=gen, dtype=torch.int8)
    q = torch.randint(-127, 128, (8, 64), generator=gen, dtype=torch.int8)
    wm = torch.randint(2**15, 2**16, (8,), generator=gen, dtype=torch.int32)
    wk = torch.randint(20, 30, (8,), generator=gen, dtype=torch.int32)
    want_kmin = int(wk.min())
    rec = Recorder()
    with launch.launch_hook(rec), no_sync():
        t = cuda_illm.illm_matmul(xq, q, wm, wk.long(), 8)
    name, grid, block, args, tensors = rec.calls[0]
    assert name == "illm_gemv_w8" and t.shape == (3, 8) and t.dtype == torch.int64  # M <= 8: the GEMV
    assert tensors[4].tolist() == [want_kmin] and tensors[4].dtype == torch.int32  # kmin by pointer


def test_matmul_validates():
    xq = torch.zeros((2, 64), dtype=torch.int8)
    with launch.launch_hook(Recorder()):
        with pytest.raises(ValueError, match="wm must be"):
            cuda_illm.illm_matmul(xq, torch.zeros((8, 64), dtype=torch.int8), torch.ones(7, dtype=torch.int32), torch.ones(8, dtype=torch.int32), 8)
        with pytest.raises(ValueError, match="qweight"):
            cuda_illm.illm_matmul(xq, torch.zeros((8, 64), dtype=torch.int8), torch.ones(8), torch.ones(8), 4)
        with pytest.raises(ValueError, match="w_bits"):
            cuda_illm.illm_matmul(xq, torch.zeros((8, 64), dtype=torch.int8), torch.ones(8), torch.ones(8), 2)
        with pytest.raises(ValueError, match="multiple of 32"):
            cuda_illm.illm_matmul(torch.zeros((2, 40), dtype=torch.int8), torch.zeros((8, 40), dtype=torch.int8), torch.ones(8), torch.ones(8), 8)
        with pytest.raises(ValueError, match=f"M={cuda_illm.MATMUL_MAX_M + 1} rows exceed the grid's"):
            tall = torch.zeros((1, 64), dtype=torch.int8).expand(cuda_illm.MATMUL_MAX_M + 1, 64)  # no memory
            cuda_illm.illm_matmul(tall, torch.zeros((8, 64), dtype=torch.int8), torch.ones(8), torch.ones(8), 8)


def test_softmax_contiguous_output_and_live_temporaries():
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(-2**20, 2**20, (37, 5), generator=gen, dtype=torch.int32)
    scores = base.t()  # [5, 37], non-contiguous
    valid = torch.arange(1, 6)                     # int64: converted to int32 for the kernel
    sm = torch.randint(2**15, 2**16, (5,), generator=gen, dtype=torch.int32)   # converted to int64
    sk = torch.randint(20, 30, (5,), generator=gen, dtype=torch.int32)
    rec = Recorder()
    with launch.launch_hook(rec), no_sync():
        p = cuda_illm.softmax(scores, valid, sm, sk)
    assert p.shape == (5, 37) and p.is_contiguous() and p.stride() == (37, 1)
    name, grid, block, args, tensors = rec.calls[0]
    assert name == "illm_softmax" and grid == (5,)
    assert torch.equal(tensors[0], scores)                       # the kernel reads the values, row-major
    assert tensors[1].dtype == torch.int32 and tensors[1].tolist() == valid.tolist()
    assert tensors[2].dtype == torch.int64 and tensors[2].tolist() == sm.tolist()
    assert tensors[3].dtype == torch.int64 and tensors[3].tolist() == sk.tolist()


@pytest.mark.parametrize("bad", ["valid", "sm", "sk"])
def test_softmax_checks_row_vectors(bad):
    scores = torch.zeros((4, 9), dtype=torch.int32)
    vecs = {"valid": torch.ones(4, dtype=torch.int32), "sm": torch.ones(4), "sk": torch.ones(4)}
    vecs[bad] = torch.ones(3, dtype=torch.int32)
    with launch.launch_hook(Recorder()):
        with pytest.raises(ValueError, match=f"{bad} must be \\[rows\\] = \\[4\\]"):
            cuda_illm.softmax(scores, vecs["valid"], vecs["sm"].long(), vecs["sk"].long())
        with pytest.raises(ValueError, match="clip"):
            cuda_illm.softmax(scores, torch.ones(4, dtype=torch.int32), torch.ones(4).long(), torch.ones(4).long(), clip=-1)


def test_valid_lengths_are_clamped_in_the_kernel():
    """valid[r] is a device value the host never checks: the kernel clamps it to [0, T]."""
    from qconvert_kernels.illm import ILLM

    src = ILLM.path.read_text()
    assert "min(max(valid[r], 0), T)" in src


def test_rmsnorm_and_requant_keep_temporaries_alive():
    x = torch.randint(-2**20, 2**20, (3, 64))
    gamma = torch.randint(-2**15, 2**15, (64,), dtype=torch.int32)  # converted to int64
    rec = Recorder()
    with launch.launch_hook(rec), no_sync():
        cuda_illm.rmsnorm(x.t().contiguous().t(), gamma, 14, 127)
        cuda_illm.requant_rows(x, 127)
    assert [c[0] for c in rec.calls] == ["illm_rmsnorm", "illm_requant_rows"]
    assert rec.calls[0][4][1].dtype == torch.int64 and torch.equal(rec.calls[0][4][1], gamma.long())
