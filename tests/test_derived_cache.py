"""qconvert/layouts/derived.py: the CPU reference's derived weights, kept within a byte budget."""

import gc

import pytest
import torch

from helpers import tiny_config, write_model
from qconvert import quantize
from qconvert.errors import QConvertError
from qconvert.layouts import derived
from qconvert.layouts.derived import DerivedCache


class Layer(torch.nn.Module):
    pass


def test_least_recently_used_entries_go_first_and_big_ones_are_not_kept():
    cache = DerivedCache(budget=3 * 400)  # three 100-float tensors
    mods = [Layer() for _ in range(4)]
    made = []

    def maker(i):
        def make():
            made.append(i)
            return torch.full((100,), float(i))
        return make

    for i in range(3):
        assert cache.fetch(mods[i], "w", maker(i))[0] == i
    assert cache.used == 1200 and made == [0, 1, 2]
    cache.fetch(mods[0], "w", maker(0))  # a hit: 0 becomes the most recent
    cache.fetch(mods[3], "w", maker(3))  # over budget: 1, the least recent, is dropped
    assert made == [0, 1, 2, 3] and "w" not in mods[1]._derived and cache.used == 1200
    assert cache.fetch(mods[1], "w", maker(1))[0] == 1 and made[-1] == 1  # made again, same value
    assert "w" not in mods[2]._derived
    big = cache.fetch(mods[0], "big", lambda: torch.zeros(1000))
    assert big.numel() == 1000 and "big" not in mods[0]._derived and cache.used == 1200


def test_a_freed_module_gives_its_bytes_back():
    cache = DerivedCache(budget=10_000)
    m = Layer()
    cache.fetch(m, "a", lambda: torch.zeros(10))
    cache.fetch(m, ("b", torch.float32), lambda: (torch.zeros(5), torch.zeros(5, dtype=torch.int8)))
    assert cache.used == 40 + 25
    del m
    gc.collect()
    assert cache.used == 0 and not cache._order


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(derived.ENV, "2MB")
    assert DerivedCache().budget == 2_000_000
    monkeypatch.setenv(derived.ENV, "lots")
    with pytest.raises(QConvertError, match=r"QCONVERT_CPU_CACHE='lots' is not a size; set it like"):
        DerivedCache().budget
    monkeypatch.delenv(derived.ENV)
    monkeypatch.setattr("qconvert.placement.available_ram", lambda: 8_000)
    assert DerivedCache().budget == 2_000


def test_a_copied_module_makes_its_own_and_a_moved_one_drops_its_entries():
    import copy

    cache = DerivedCache(budget=10_000)
    m = Layer()
    cache.fetch(m, "a", lambda: torch.ones(10))
    twin = copy.deepcopy(m)  # holds a copy of the entry, which the cache does not know
    assert cache.fetch(twin, "a", lambda: torch.full((10,), 2.0))[0] == 2 and cache.used == 80
    cache.release(m)
    assert cache.used == 40 and "_derived" not in m.__dict__


@pytest.mark.parametrize("scheme", ["is-w4a8-rtn", "w4a16-gptq", "quik-w4a4", "zqfp-w4a8"])
def test_a_model_runs_the_same_within_any_budget(scheme, tmp_path, monkeypatch):
    """The outputs with every derived tensor kept, with none kept, and with room for half of them
    (calls evicting each other's entries) are identical; moving the model drops its entries."""
    from qconvert.runtime import load

    src = write_model(tmp_path / "src", tiny_config(layers=2))
    extra = {"base": "rtn"} if scheme in ("w4a16-gptq", "quik-w4a4", "zqfp-w4a8") else {}
    out = quantize(str(src), scheme, tmp_path / "out", progress=False, **extra)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    results, kept, dropped = [], [], []
    budget = 1 << 40
    for run in range(3):
        monkeypatch.setattr(derived, "CACHE", DerivedCache(budget))
        model = load(out, dtype=torch.float32)
        with torch.inference_mode():
            results.append(model(ids).logits)
            results.append(model(ids).logits)  # the second call: from what was kept, or made again
        kept.append(derived.CACHE.used)
        dropped.append(derived.CACHE.dropped)
        assert derived.CACHE.used <= budget
        budget = 0 if run == 0 else kept[0] // 2
    assert kept[0] > 0 and kept[1] == 0 and 0 < kept[2] <= kept[0] // 2
    assert dropped[0] == 0 and dropped[2] > 0
    for r in results[1:]:
        assert torch.equal(r, results[0])
    model.float()  # a move (here to the same dtype) drops what was derived before it
    assert derived.CACHE.used == 0
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, results[0])
