"""The roofline model (qconvert_kernels/roofline.py, benchmarks/roofline.py): its arithmetic and its
labels.  Predictions only; nothing is timed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qconvert_kernels import roofline as rf

ROOT = Path(__file__).resolve().parents[1]


def test_bytes_ops_and_roofline_of_q_proj_at_m1():
    t = rf.traffic(4096, 4096, 1)
    assert t["ops"] == 2 * 4096 * 4096
    assert t["bytes_fp16"] == 2 * 4096 + 2 * 4096 * 4096 + 2 * 4096
    assert t["bytes_w4a8"] == 2 * 4096 + 4096 * 4096 // 2 + 4096 * 32 * 2 + 4 * 4096 + 2 * 4096
    h200 = rf.DEVICES["H200"]
    assert abs(rf.roofline_us(4096, 4096, 1, h200) - t["bytes_w4a8"] / 4.8e6) < 1e-9
    assert abs(rf.roofline_us(4096, 4096, 1, h200, "fp16") - t["bytes_fp16"] / 4.8e6) < 1e-9
    # compute-bound at M = 4096: ops over the int8 peak
    assert abs(rf.roofline_us(4096, 4096, 4096, h200) - 2 * 4096**3 / 1979e6) < 1e-6


def test_table_covers_every_shape_m_and_device():
    rows = rf.table()
    assert len(rows) == 2 * len(rf.LLAMA3_8B) * len(rf.MS)
    assert {r["shape"] for r in rows} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                         "qkv_proj", "gate_up_proj"}
    for r in rows:
        assert r["pred_is_us"] >= r["roofline_w4a8_us"] and r["pred_fs_us"] >= r["roofline_w4a8_us"]
        assert 0 < r["pred_is_roofline_frac"] <= 1
        assert r["kernel"] == ("decode" if r["M"] <= 64 else "prefill")


def test_decode_splits_mirror_the_launcher():
    from qconvert_kernels.w4a8 import cuda
    from test_kernels_w4a8_emulate import _Meta

    for n, k in rf.LLAMA3_8B.values():
        for m in (1, 16, 64):
            assert rf.decode_splits(n, k, m, 128, 132) == cuda.plan(m, _Meta(n, k), 132).splits


def test_bench_rows_get_the_roofline_of_the_device():
    r = rf.roofline_for("NVIDIA H200", 4096, 4096, 1, "w4a8-is")
    assert r["roofline_device"] == "H200" and r["roofline_us"] > 0
    assert rf.roofline_for("NVIDIA H100 80GB HBM3", 4096, 4096, 1, "cublas-fp16")["roofline_device"] == "H100 SXM"
    assert rf.roofline_for("NVIDIA A100-SXM4-80GB", 4096, 4096, 1, "w4a8-is") is None


def test_script_prints_predictions_and_writes_json(tmp_path):
    out = tmp_path / "roof.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--devices", "H200", "--m", "1", "4096",
                           "--json", str(out)], capture_output=True, text=True, check=True)
    assert "PREDICTIONS" in proc.stdout and "gate_up_proj" in proc.stdout
    data = json.loads(out.read_text())
    assert data["kind"] == "roofline-prediction" and len(data["rows"]) == 2 * len(rf.LLAMA3_8B)
    assert data["assumptions"]["H200"]["hbm_tbps"] == 4.8


def test_block_table_sums_the_seven_linears_and_the_joined_four():
    rows = rf.table(devices=["H200"], ms=[1, 4096])
    block = {b["M"]: b for b in rf.block_table(rows)}
    assert sorted(block) == [1, 4096]
    at1 = {r["shape"]: r for r in rows if r["M"] == 1}
    qkv = at1["qkv_proj"]["pred_is_us"] + at1["o_proj"]["pred_is_us"] + at1["gate_up_proj"]["pred_is_us"] + at1["down_proj"]["pred_is_us"]
    seven = sum(at1[s]["pred_is_us"] for s in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert block[1]["pred_is_fused_us"] == round(qkv, 2) and block[1]["pred_is_unfused_us"] == round(seven, 2)
    # joining saves the fixed cost of three launches and streams larger tiles: a gain at decode sizes
    assert block[1]["pred_fused_vs_unfused"] > 1.1 and block[1]["pred_fused_vs_cublas"] > block[1]["pred_unfused_vs_cublas"]
    assert "fused gain" in rf.format_block_table(list(block.values()))
