import pytest
import torch

from qconvert.formats.packing import pack_int4, pad_columns, unpack_int4


@pytest.mark.parametrize("shape", [(1, 2), (7, 6), (830, 546), (3, 1024)])
def test_int4_round_trip_odd_shapes(shape):
    g = torch.Generator().manual_seed(shape[0])
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_bit_order_low_nibble_first():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    # 1 -> 0x1 (low), -2 -> 0xE (high); 7 -> 0x7 (low), -8 -> 0x8 (high)
    assert pack_int4(q).tolist() == [[0xE1, 0x87]]


def test_pack_rejects_out_of_range_and_odd():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_pad_columns_zero_fills_to_multiple():
    x = torch.ones(3, 545)
    p = pad_columns(x, 128)
    assert p.shape == (3, 640) and p[:, :545].eq(1).all() and p[:, 545:].eq(0).all()
    assert pad_columns(x[:, :512], 128).shape == (3, 512)
