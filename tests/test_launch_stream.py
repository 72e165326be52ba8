"""qconvert_kernels.launch.cupy_stream: CuPy's object on torch's stream, made once per stream, by
``cupy.cuda.Stream.from_external`` (the CUDA stream protocol) where CuPy has it and by the older
``ExternalStream`` (without its deprecation warning) where it has not or refuses.  A fake CuPy
records the calls; tests/test_kernels_norm_gpu.py launches on a real side stream."""

from __future__ import annotations

import warnings

import pytest

from qconvert_kernels import launch


class _Recorder:
    def __init__(self):
        self.protocol, self.external = [], []


def fake_cupy(rec: _Recorder, from_external: str = "ok"):
    """A CuPy with ``Stream.from_external`` ("ok"), without it ("absent"), or one refusing ("raises");
    its ExternalStream warns as CuPy 14's does."""

    class Stream:
        pass

    if from_external != "absent":
        def _from_external(obj):
            if from_external == "raises":
                raise TypeError("not a stream")
            rec.protocol.append(obj.__cuda_stream__())
            return ("protocol", obj.__cuda_stream__()[1])
        Stream.from_external = staticmethod(_from_external)

    def external(ptr):
        warnings.warn("ExternalStream is deprecated. Use Stream.from_external() instead", DeprecationWarning)
        rec.external.append(ptr)
        return ("external", ptr)

    class cuda:  # noqa: N801
        pass

    cuda.Stream, cuda.ExternalStream = Stream, staticmethod(external)

    class cp:
        pass

    cp.cuda = cuda
    return cp


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(launch, "_STREAMS", {})


def test_the_stream_protocol_is_used_once_per_stream():
    rec = _Recorder()
    cp = fake_cupy(rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = [launch.cupy_stream(cp, 0x1234, 0) for _ in range(3)]
        b = launch.cupy_stream(cp, 0x5678, 0)
        c = launch.cupy_stream(cp, 0x1234, 1)  # the same handle value on another device: its own
    assert a[0] is a[1] is a[2] and a[0] == ("protocol", 0x1234)
    assert b == ("protocol", 0x5678) and c == ("protocol", 0x1234) and c is not a[0]
    assert rec.protocol == [(0, 0x1234), (0, 0x5678), (0, 0x1234)] and rec.external == []


@pytest.mark.parametrize("mode", ["absent", "raises"])
def test_an_older_cupy_gets_external_stream_without_its_warning(mode):
    rec = _Recorder()
    cp = fake_cupy(rec, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warning would fail here
        s = [launch.cupy_stream(cp, 0, 0) for _ in range(2)]
    assert s[0] is s[1] and s[0] == ("external", 0) and rec.external == [0]


def test_the_cache_is_bounded(monkeypatch):
    rec = _Recorder()
    cp = fake_cupy(rec)
    monkeypatch.setattr(launch, "_MAX_STREAMS", 4)
    for ptr in range(10):
        launch.cupy_stream(cp, ptr, 0)
    assert len(launch._STREAMS) <= 4 and (0, 9) in launch._STREAMS
