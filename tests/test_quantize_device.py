"""quantize --device: the device-generic walk, proven on the CPU (there is no GPU in CI).

- The walk on ``device="cpu"`` writes the bytes it wrote before the device option existed: one
  sha256 per calibrated case and CPU vendor (MKL picks its float kernels by vendor), recorded with
  the code of commit 35cbeba on AMD and its equal of 75153f5 on Intel (tests/test_golden.py pins
  the layouts themselves, through round-to-nearest).
- Nothing of the walk lands on another device than the one asked: a TorchFunctionMode records
  every tensor factory called from qconvert's own code without an explicit ``device=`` (what
  would put a tensor on the CPU in the middle of a GPU run); a mutation shows it catches one.
- The errors: no usable GPU (both reasons), a CUDA out-of-memory in the middle of a run (the
  journal kept, the message naming --resume and --max-gpu-memory, and the resumed run
  bit-identical), --max-gpu-memory parsing, and the spill order GPU -> pinned -> disk
  (qconvert.placement.place, a pure function, under a fake GPU budget).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import GOLDEN_VENDOR, TEXT, cpu_flags, cpu_vendor, golden_state, run_cli, tiny_config, tiny_moe_config, write_model
from qconvert import placement, quantize
from qconvert.calibration_text import CalibSettings
from qconvert.errors import QConvertError
from qconvert.formats.safetensors_io import ShardedReader
from qconvert.schemes_registry import load_scheme, with_params

QCONVERT = Path(__file__).resolve().parents[1] / "qconvert"

# case: (model, scheme, parameter overrides, group size, calibration dtype)
CASES = {
    "is-w4a8": ("dense", "is-w4a8", {}, 32, "float32"),
    "is-w4a8-bf16": ("dense", "is-w4a8", {}, 32, "bfloat16"),
    "zqfp-w4a8-lorc": ("dense", "zqfp-w4a8", {"lorc_weighting": "hessian"}, 32, "float32"),
    "quik-w4a4": ("dense", "quik-w4a4", {"outliers": 8, "act_clip": 1, "outlier_select": "amax", "clip_min": 0.8},
                  None, "float32"),  # DIGESTS: the preset as it was (unclipped, outliers by max |x|, range search to 0.8)
    "illm-w4a8-fsbr": ("dense", "illm-w4a8", {"fsbr_steps": 4}, None, "float32"),
    "w8a8": ("dense", "w8a8", {}, None, "float32"),
    "mixtral-is-w4a8": ("moe", "is-w4a8", {}, 32, "float32"),
}
# sha256 of each case's tensors, quantization_config and report rows, as the CPU-only walk wrote
# them, per CPU vendor (tests/helpers.py, GOLDEN_VENDOR: MKL picks its float kernels by vendor, and
# every case here calibrates through float GEMMs).  AuthenticAMD: the walk of 35cbeba on an AMD
# EPYC.  (The MoE case came out so only when no two experts routed as many tokens had their inputs
# at one address; the device walk fixed that, see _Observer._hook.)  GenuineIntel: the walk of
# 75153f5 (the same quantization code as 35cbeba's digests passed with on AMD) on an Intel Xeon
# with AVX-512 VNNI, 2026-12-04 (no bf16 case: that CPU runs bf16 natively, where the case skips).
VENDOR_DIGESTS = {
    "AuthenticAMD": {
        "is-w4a8": "dd39130dd54c0ae7906a97671b4262f6a10adb8e51965335fbca8ce9611adfdf",
        "is-w4a8-bf16": "aca1002b2b7210ed2a710a85d2d9cf4c5edc1547d426b287e00eed12a1baa192",
        "zqfp-w4a8-lorc": "9110b3b98aac59a7466f2a7cca998fa17bc7c49f11778a2d53f29f1fd89f4437",
        "quik-w4a4": "95ea3627161004004f296d75ead18ba48863877262d6f1a2c08239fd911193bb",
        "illm-w4a8-fsbr": "c69d5ef502b3ab17de6a4bd9ee4b69ce41572ad1f31978343a4c08371988e91d",
        "w8a8": "32311b6dd1a1d9a0b1d2102c4d886153bef41646ce0e86ee04e0a21a8ac2832c",
        "mixtral-is-w4a8": "192734af648542ef2ee823598d40af703d6f69461fa295613c0f64a1321f7124",
    },
    "GenuineIntel": {
        "is-w4a8": "12cb94d0f49c968f80bd6ef143d9427144cb280c526402ee016fd426fcf34b5e",
        "zqfp-w4a8-lorc": "3de95a83e67e64b018d524549433cdfb13f5d1f1014905818b87c91fcacd578f",
        "quik-w4a4": "816e647deb33ab70e939c8a4ff444e93843e29bb51b5dfe75d59a55179ebcc5b",
        "illm-w4a8-fsbr": "30fc977422c5701d8b5b53e3365ac0eeb41c060ecf1e95f161fa6f4dce107173",
        "w8a8": "e183f7f32f456aacc6aa8fd928284798001dfb4a149ad1d67e270cbbf9d663fa",
        "mixtral-is-w4a8": "35b1894e638d604eead001963061b6b7444bd9d79fe18ac31c090ee359a800aa",
    },
}
# another vendor's CPU is checked against the first pinning, and says so if it differs
DIGEST_VENDOR = cpu_vendor() if cpu_vendor() in VENDOR_DIGESTS else GOLDEN_VENDOR
DIGESTS = VENDOR_DIGESTS[DIGEST_VENDOR]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("device")
    (d / "calib.txt").write_text(TEXT)
    dense = tiny_config(hidden=64, intermediate=160, layers=2, vocab=300)
    moe = tiny_moe_config("mixtral", hidden=64, layers=2, intermediate=96, vocab=300)
    return {"dense": write_model(d / "dense", dense, state=golden_state(dense)),
            "moe": write_model(d / "moe", moe, state=golden_state(moe))}


def _run(sources, case: str, out: Path, **kwargs) -> Path:
    model, scheme, params, group, dtype = CASES[case]
    sch = with_params(load_scheme(scheme), params) if params else scheme
    calib = CalibSettings("file", str(sources[model].parent / "calib.txt"), nsamples=4, seqlen=32, dtype=dtype,
                          asym=0.0)  # DIGESTS pin symmetric GPTQ (the presets' default --asym-calib: tests/test_asym_calib.py)
    kwargs.setdefault("rotate", "none")  # DIGESTS pin the unrotated walk (rotation: tests/test_rotation.py)
    return quantize(str(sources[model]), sch, out, group_size=group, progress=False, calib=calib, **kwargs)


def resume_matches_whole(tmp_path: Path, sources, device: str) -> None:
    """``qconvert quantize`` killed after 20 tensors and resumed writes the bytes of ``_run``'s
    uninterrupted is-w4a8 walk on ``device``.  The command spells out what ``_run`` pins: no
    rotation and symmetric GPTQ (--rotate none --asym-calib 0), whatever the presets' defaults."""
    whole = _run(sources, "is-w4a8", tmp_path / "whole", device=device)
    src = sources["dense"]
    cmd = [sys.executable, "-m", "qconvert.cli", "quantize", str(src), "-o", str(tmp_path / "out"), "-q", "-g", "32",
           "--device", device, "--calib", "file", "--data-file", str(src.parent / "calib.txt"), "--nsamples", "4",
           "--seqlen", "32", "--calib-dtype", CASES["is-w4a8"][4], "--rotate", "none", "--asym-calib", "0"]
    killed = subprocess.run(cmd, env={**os.environ, "QCONVERT_FAULT": "tensor:20"}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert digest(tmp_path / "out") == digest(whole)


def digest(out: Path) -> str:
    h = hashlib.sha256()
    reader = ShardedReader(out)
    for name in sorted(reader.keys()):
        t = reader.get(name)
        h.update(f"{name} {t.dtype} {list(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc.pop("qconvert_version")
    if (qc.get("config") or {}).get("symmetric") is True:  # integer-scale's `symmetric` (2026-12-01) postdates
        del qc["config"]["symmetric"]  # DIGESTS; its default, true, is what every pinned case ran
    if qc.get("format_version") == 2:  # format version 2 (2026-12-02: QUIK's and I-LLM's act_clip) postdates
        qc["format_version"] = 1  # DIGESTS, as does act_clip itself: the pinned QUIK and I-LLM cases run unclipped (1)
        cfg = qc.get("config") or {}
        if cfg.get("act_clip") == 1:
            del cfg["act_clip"], cfg["activations"]["clip"]
    if (qc.get("config") or {}).get("outlier_select") == "amax":  # QUIK's outlier_select (2026-12-02) postdates
        del qc["config"]["outlier_select"]  # DIGESTS; "amax" is what the pinned QUIK case ran
    h.update(json.dumps(qc, sort_keys=True).encode())
    h.update(json.dumps(json.loads((out / "qconvert.json").read_text())["layers"], sort_keys=True).encode())
    return h.hexdigest()


# ---- the CPU walk: same bytes, and no tensor made elsewhere than asked -----------------------

FACTORIES = {torch.zeros, torch.empty, torch.ones, torch.full, torch.arange, torch.randn, torch.rand, torch.randint,
             torch.randperm, torch.tensor, torch.as_tensor, torch.eye, torch.linspace, torch.empty_strided}
TORCH_DIR = Path(torch.__file__).resolve().parent
# factories that run on host tensors on purpose: the FP4 code table packs levels that
# zeroquant_fp moves to the CPU first (OUT is written from the CPU)
HOST_SIDE = {"qconvert/formats/fp4.py:levels_to_codes"}


class HostFactories(TorchFunctionMode):
    """Records every tensor factory that qconvert's own code calls without ``device=``: on a GPU
    such a tensor would land on the CPU (``*_like`` and ``Tensor.new_*`` follow their tensor)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame, optimizer = inspect.currentframe().f_back, False
            while frame is not None and TORCH_DIR in (path := Path(frame.f_code.co_filename).resolve()).parents:
                optimizer |= TORCH_DIR / "optim" in path.parents
                frame = frame.f_back  # torch's own Python wrappers (nn.Linear(...) makes its weight here)
            path = Path(frame.f_code.co_filename).resolve() if frame is not None else None
            # torch.optim keeps a non-capturable optimizer's step count on the host by design (torch
            # 2.11's Adam makes it with a factory; FSBR's refinement steps one)
            if path is not None and QCONVERT in path.parents and not optimizer:
                self.calls.append(f"{path.relative_to(QCONVERT.parent)}:{frame.f_code.co_name}")
        return func(*args, **kwargs)


def _record_walk(monkeypatch) -> HostFactories:
    """A recorder active inside the walk: the block-0 inputs, and every block's onload, observation,
    solves, quantized re-run and release (the calibration tokens are host data by design)."""
    from qconvert import pipeline
    from qconvert.block_walk import Calibrator

    rec = HostFactories()

    def inside(fn):
        def wrapped(*a, **kw):
            with rec:
                return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(pipeline, "_calibrated_block", inside(pipeline._calibrated_block))
    monkeypatch.setattr(Calibrator, "embed", inside(Calibrator.embed))
    return rec


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_walk_writes_todays_bytes_and_makes_nothing_off_device(tmp_path, sources, case, monkeypatch):
    rec = _record_walk(monkeypatch)
    out = _run(sources, case, tmp_path / "out", device="cpu")
    assert set(rec.calls) <= HOST_SIDE, sorted(set(rec.calls) - HOST_SIDE)
    assert "device" not in json.loads((out / "qconvert.json").read_text())  # a CPU report is as before
    if case.endswith("-bf16") and _native_bf16_cpu():
        pytest.skip("bfloat16 matmuls run in oneDNN's native AVX-512 BF16 kernels on this CPU, which round "
                    "otherwise than the AVX2 kernels these bytes were recorded with (tests/conftest.py cannot cap "
                    "oneDNN: capped, its int8 GEMM saturates)")
    if case not in DIGESTS:
        pytest.skip(f"no digest of {case} pinned for this CPU vendor ({cpu_vendor()})")
    assert digest(out) == DIGESTS[case], f"{case} on {cpu_vendor()} (digests of {DIGEST_VENDOR})"


def _native_bf16_cpu() -> bool:
    """The CPU has AVX-512 BF16 or AMX (Linux's flags); elsewhere False."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() or set()))


def test_cpu_resume_matches_the_whole_walk(tmp_path, sources):
    """The CPU twin of tests/test_quantize_device_gpu.py's resume test (same helper): the CLI run,
    killed and resumed, gives _run's bytes.  On an H200 (2026-12-04) the cuda one failed while its
    command left the presets' rotation and asymmetric calibration on, which _run turns off."""
    resume_matches_whole(tmp_path, sources, "cpu")


def test_the_device_check_catches_a_factory_without_device(tmp_path, sources, monkeypatch):
    """Mutation: grids.pow2 as it was before the device walk (``torch.ones(e.shape)``)."""
    from qconvert.methods import zeroquant_fp
    from qconvert.solvers import grids

    ns = {"torch": torch}
    exec(compile("def pow2(e):\n    return torch.ldexp(torch.ones(e.shape), e.long())\n", grids.__file__, "exec"), ns)
    monkeypatch.setattr(grids, "pow2", ns["pow2"])
    monkeypatch.setattr(zeroquant_fp, "pow2", ns["pow2"])
    rec = _record_walk(monkeypatch)
    _run(sources, "zqfp-w4a8-lorc", tmp_path / "out", device="cpu")
    assert "qconvert/solvers/grids.py:pow2" in rec.calls


def test_moe_walk_is_reproducible_across_processes(tmp_path, sources):
    """The expert Hessians no longer depend on allocation addresses (a fresh interpreter each)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_quantize_device as t; "
            "from pathlib import Path; "
            f"print(t.digest(t._run({{'moe': Path({str(sources['moe'])!r})}}, 'mixtral-is-w4a8', Path(sys.argv[1]))))")
    import subprocess

    got = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"o{i}")], capture_output=True, text=True,
                          check=True).stdout.split()[-1] for i in range(2)}
    assert got == {DIGESTS["mixtral-is-w4a8"]}


# ---- which device, and the errors -----------------------------------------------------------


def test_no_cuda_build_and_no_device_are_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA support" in placement.cuda_unusable_reason()
    auto = placement.resolve_device(None)
    assert auto.device.type == "cpu" and auto.line.startswith("quantizing on cpu (no usable GPU: this torch build")
    with pytest.raises(QConvertError, match=r"--device cuda: no usable GPU \(this torch build .* no CUDA support\).*--device cpu"):
        placement.resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(QConvertError, match="torch sees no CUDA device"):
        placement.resolve_device("cuda")
    assert placement.resolve_device("cpu").line == "quantizing on cpu"
    with pytest.raises(QConvertError, match="--device tpu: unknown; choose cuda or cpu"):
        placement.resolve_device("tpu")


def test_cli_device_cuda_without_gpu_is_one_line_and_writes_nothing(tmp_path, sources, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    out = tmp_path / "out"
    res = run_cli("quantize", sources["dense"], "-o", out, "-q", "--device", "cuda", "--calib", "file",
                  "--data-file", sources["dense"].parent / "calib.txt", "--nsamples", "2", "--seqlen", "16", ok=False)
    assert res.exit_code == 1 and "no usable GPU" in res.output and "--device cpu" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_cli_says_where_it_quantizes_first(tmp_path, sources, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    res = run_cli("quantize", sources["dense"], "-o", tmp_path / "out", "-q", "--calib", "file",
                  "--data-file", sources["dense"].parent / "calib.txt", "--nsamples", "2", "--seqlen", "16")
    assert res.output.splitlines()[0].startswith("quantizing on cpu (no usable GPU: this torch build")
    res = run_cli("quantize", sources["dense"], "-o", tmp_path / "rtn", "-q", "--base", "rtn", "--device", "cpu")
    assert res.output.splitlines()[0].startswith("quantizing on cpu (round-to-nearest")


def test_out_of_memory_mid_run_keeps_the_journal_and_resumes_bit_identical(tmp_path, sources, monkeypatch):
    from qconvert.methods.integer_scale import IntegerScaleMethod

    calib = ["--calib", "file", "--data-file", sources["dense"].parent / "calib.txt", "--nsamples", "4", "--seqlen", "32"]
    ref = tmp_path / "ref"
    run_cli("quantize", sources["dense"], "-o", ref, "-q", "-g", "32", "--device", "cpu", *calib)
    real, calls = IntegerScaleMethod.quantize_linears, {"n": 0}

    def oom(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # block 1, after block 0 is journaled
            raise placement.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 79.19 GiB of which 1.06 GiB is free.")
        return real(self, *a, **kw)

    monkeypatch.setattr(IntegerScaleMethod, "quantize_linears", oom)
    out = tmp_path / "out"
    args = ["quantize", sources["dense"], "-o", out, "-q", "-g", "32", "--device", "cpu", "--max-gpu-memory", "8GB", *calib]
    res = run_cli(*args, ok=False)
    first, msg = res.output.strip().splitlines()  # where it quantizes, then the one-line error
    assert res.exit_code == 1 and first == ("quantizing on cpu; residual stream rotated (hadamard, seed 0); "
                                     "each layer aimed at the float model's output (--asym-calib 0.25; 0 turns it off)")
    assert "Traceback" not in res.output
    assert "ran out of memory" in msg and "2.00 GiB" in msg and "--resume" in msg and "--max-gpu-memory" in msg
    assert "now 8.0 GB" in msg and "finished stage" in msg
    assert not out.exists() and (tmp_path / "out.partial" / ".journal.jsonl").is_file()
    monkeypatch.setattr(IntegerScaleMethod, "quantize_linears", real)
    run_cli(*args, "--resume")
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(out) == files(ref)


def test_max_gpu_memory_is_parsed_and_checked(tmp_path, sources, monkeypatch):
    assert CalibSettings(max_gpu_memory="12GB").validated().max_gpu_memory == "12GB"
    with pytest.raises(QConvertError, match="cannot read size 'lots'"):
        CalibSettings(max_gpu_memory="lots").validated()
    res = run_cli("quantize", sources["dense"], "-o", tmp_path / "out", "-q", "--max-gpu-memory", "12XB", ok=False)
    assert res.exit_code == 1 and "cannot read size '12XB'" in res.output
    gb = 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gb, 80 * gb))
    cuda = torch.device("cuda", 0)
    assert placement.gpu_budget(cuda, None, 4 * gb) == int(40 * gb * placement.GPU_FRACTION)  # the default
    assert placement.gpu_budget(cuda, 30 * gb, 4 * gb) == 30 * gb
    assert placement.gpu_budget(cuda, 39 * gb, 4 * gb) == 36 * gb  # room left for one block
    with pytest.raises(QConvertError, match=r"--max-gpu-memory 50.0 GB is more than the 40.0 GB free on cuda:0; lower it"):
        placement.gpu_budget(cuda, 50 * gb, 4 * gb)
    with pytest.raises(QConvertError, match=r"needs about 45.0 GB of GPU memory for one decoder block .* 40.0 GB is free"
                                            r".*--device cpu"):
        placement.gpu_budget(cuda, None, 45 * gb)


def test_spill_order_gpu_then_pinned_then_disk():
    mb = 10**6
    # activations (2 buffers) first, then the MLP cache, against a fake 1000 MB GPU and 500 MB of RAM
    assert placement.place(600 * mb, 1000 * mb, 500 * mb, cuda=True) == ("gpu", 400 * mb, 500 * mb)
    assert placement.place(450 * mb, 400 * mb, 500 * mb, cuda=True) == ("pinned", 400 * mb, 50 * mb)
    assert placement.place(450 * mb, 400 * mb, 50 * mb, cuda=True, spill="none") == ("none", 400 * mb, 50 * mb)
    assert placement.place(2000 * mb, 1000 * mb, 500 * mb, cuda=True) == ("disk", 1000 * mb, 500 * mb)
    # on the CPU the GPU budget is never used: RAM, then files (the CPU-only walk's rule)
    assert placement.place(600 * mb, 1000 * mb, 700 * mb, cuda=False) == ("ram", 1000 * mb, 100 * mb)
    assert placement.place(600 * mb, 1000 * mb, 500 * mb, cuda=False) == ("disk", 1000 * mb, 500 * mb)


def test_llama3_8b_block_fits_the_gpu_target():
    """The working-set estimate of one Llama-3-8B block at 4096 tokens a batch (9.6 GB, on the safe
    side: six 14336 x 14336 Hessian-sized matrices where GPTQ holds at most four at once): the
    figure the pre-flight check compares with the free GPU memory."""
    from transformers import LlamaConfig

    from qconvert.bench import SYNTHETIC

    need = placement.block_working_set(LlamaConfig(**SYNTHETIC["llama3-8b"]), 4096)
    assert 9e9 < need < 10e9, need


def test_verify_says_which_device_made_out(tmp_path, sources):
    from qconvert.verify import VerifyReport, verify

    out = _run(sources, "is-w4a8", tmp_path / "out", device="cpu")
    assert verify(out, compare_source=False, save=False).made_on == "cpu"
    report = json.loads((out / "qconvert.json").read_text())
    (tmp_path / "cuda_made").mkdir()
    (tmp_path / "cuda_made" / "qconvert.json").write_text(json.dumps({**report, "device": "cuda"}))
    assert VerifyReport(out=str(tmp_path / "cuda_made")).made_on == "cuda"
