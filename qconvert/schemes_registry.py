"""Schemes: declarative presets (what to do), read from TOML.

``--scheme is-w4a8`` reads the preset shipped in the package (``schemes/`` in the source
tree); ``--scheme ./mine.toml`` reads the user's file.  A scheme names a method (code,
``qconvert.methods``) and its parameters, and which linear modules stay in full precision.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from qconvert.errors import QConvertError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEYS = {"name", "description", "method", "exclude", "params", "rotate", "asym_calib"}
ROTATIONS = ("none", "hadamard", "random", "hadamard+online")  # --rotate: qconvert/solvers/rotation.py, before calibration;
# "+online": also the run-time Hadamard transform before down_proj (qconvert/online_hadamard.py)


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    method: str
    params: dict = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    path: str = ""
    rotate: str = "none"  # how the residual stream is rotated before calibration (ROTATIONS)
    asym_calib: float = 0.0  # GPTAQ's α when --asym-calib is not given (0: GPTQ's own, symmetric calibration)

    def with_overrides(self, group_size: int | None = None, quantize_lm_head: bool = False,
                       exclude: tuple[str, ...] = (), base: str | None = None, rotate: str | None = None) -> "Scheme":
        params = dict(self.params)
        if group_size is not None:
            params["group_size"] = group_size
        if base is not None:
            params["base"] = base
        excl = tuple(p for p in self.exclude if not (quantize_lm_head and p == "lm_head")) + tuple(exclude)
        if rotate is not None and rotate not in ROTATIONS:
            raise QConvertError(f"--rotate {rotate}: choose {', '.join(ROTATIONS)}")
        return replace(self, params=params, exclude=excl, rotate=self.rotate if rotate is None else rotate)


def presets_dir() -> Path:
    try:
        from importlib.resources import files

        return Path(str(files("qconvert.schemes")))
    except ModuleNotFoundError:  # running from a source tree without install
        return Path(__file__).resolve().parent.parent / "schemes"


def list_presets() -> list[Scheme]:
    return [parse_scheme(p) for p in sorted(presets_dir().glob("*.toml"), key=lambda p: p.stem)]


def parse_scheme(path: Path) -> Scheme:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise QConvertError(f"scheme file {path}: cannot read ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise QConvertError(f"scheme file {path} is not valid TOML ({e}); fix the file") from e
    unknown = set(data) - KEYS
    if unknown:
        raise QConvertError(f"scheme file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(KEYS)}")
    for key in ("name", "method"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise QConvertError(f"scheme file {path}: '{key}' must be a non-empty string")
    params = data.get("params", {})
    exclude = data.get("exclude", [])
    if not isinstance(params, dict):
        raise QConvertError(f"scheme file {path}: [params] must be a table")
    if not (isinstance(exclude, list) and all(isinstance(p, str) for p in exclude)):
        raise QConvertError(f"scheme file {path}: 'exclude' must be a list of module-name patterns")
    rotate = data.get("rotate", "none")
    if rotate not in ROTATIONS:
        raise QConvertError(f"scheme file {path}: 'rotate' must be one of {', '.join(ROTATIONS)}")
    asym = data.get("asym_calib", 0.0)
    if isinstance(asym, bool) or not isinstance(asym, (int, float)) or not 0.0 <= asym <= 1.0:
        raise QConvertError(f"scheme file {path}: 'asym_calib' must be a number from 0 (off) to 1")
    return Scheme(data["name"], str(data.get("description", "")), data["method"], params, tuple(exclude), str(path), rotate,
                  float(asym))


def load_scheme(spec: str) -> Scheme:
    """A preset name or a path to a ``.toml`` file."""
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():  # a directory named like a preset (an OUT) is not a scheme
        if not path.is_file():
            raise QConvertError(f"scheme file {spec} not found")
        return parse_scheme(path)
    preset = presets_dir() / f"{spec}.toml"
    if preset.is_file():
        return parse_scheme(preset)
    names = ", ".join(s.name for s in list_presets())
    raise QConvertError(f"unknown scheme {spec!r}; known schemes: {names} (or pass a path to a .toml file)")


def parse_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--param``: VALUE is read as a TOML value (``4``, ``0.8``, ``true``,
    ``"float"``, ``["*.down_proj"]``), or taken as a plain string when it is not one (``float``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise QConvertError(f"--param {text!r}: write it as KEY=VALUE, e.g. --param clip_min=0.8")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def with_params(scheme: Scheme, params: dict, options: dict | None = None) -> Scheme:
    """``scheme`` with ``params`` overriding its method parameters (``--param`` and its aliases such
    as ``--lorc-rank``; ``options`` names the option each key came from).  A key the scheme's
    method does not have is refused here with what it does have; values are validated when the
    method is built."""
    from qconvert.methods import available_methods, method_parameters

    known = method_parameters(scheme.method)
    for key in params:
        if key in known:
            continue
        option = (options or {}).get(key)
        if option:
            owners = [m for m in available_methods() if key in method_parameters(m)]
            raise QConvertError(f"{option} applies to {', '.join(owners) or 'no'} schemes; scheme {scheme.name!r} "
                                f"uses method {scheme.method!r}")
        raise QConvertError(f"--param {key}: method {scheme.method!r} (scheme {scheme.name!r}) has no parameter {key!r}; "
                            f"its parameters: {', '.join(known)}")
    return replace(scheme, params={**scheme.params, **params})
