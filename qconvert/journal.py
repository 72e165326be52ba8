"""The journal of a conversion in progress, kept in ``OUT.partial/.journal.jsonl``.

Line 1 holds the run's settings; each later line is written (and fsynced) after a stage
(the embeddings, then one decoder block) is durable on disk, and holds the writer's state,
the report rows of that stage and the float path it was made on.  ``--resume`` replays it and
continues with the next stage; a torn last line (the process died while writing it) is ignored.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

NAME = ".journal.jsonl"


class Journal:
    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = settings
        self.stage_paths: list[str | None] = []  # the float path each finished stage was made on
        self.writer_state: dict | None = None
        self.layers: list[dict] = []
        self.modules: dict[str, str] = {}
        self.stages_done = 0
        self.calib: dict | None = None  # where the calibration activations stand (qconvert.block_walk)

    @classmethod
    def create(cls, partial: Path, settings: dict) -> "Journal":
        j = cls(partial / NAME, settings)
        j._append({"settings": settings})
        return j

    @classmethod
    def read(cls, partial: Path) -> "Journal | None":
        """The journal in ``partial``, or None if there is none worth resuming."""
        path = partial / NAME
        if not path.is_file():
            return None
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn write: everything before it stands
        if not records or "settings" not in records[0]:
            return None
        j = cls(path, records[0]["settings"])
        for r in records[1:]:
            j.writer_state = r["writer"]
            j.layers += r["layers"]
            j.modules.update(r["modules"])
            j.calib = r.get("calib")
            j.stage_paths.append(r.get("float_path"))
            j.stages_done += 1
        if j.writer_state is None:
            return None  # no stage finished: starting over costs nothing
        # drop a torn tail so later appends start on a fresh line
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return j

    def stage_done(self, writer_state: dict, layers: list[dict], modules: dict[str, str],
                   calib: dict | None = None, float_path: str | None = None) -> None:
        self._append({"writer": writer_state, "layers": layers, "modules": modules, "calib": calib,
                      **({"float_path": float_path} if float_path else {})})
        self.stage_paths.append(float_path)
        self.calib = calib
        self.writer_state = writer_state
        self.layers += layers
        self.modules.update(modules)
        self.stages_done += 1

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


_counts: dict[str, int] = {}


def fault_point(tag: str) -> None:
    """Fault injection for the crash tests: ``QCONVERT_FAULT=tag:N`` SIGKILLs this process the
    N-th time it passes ``tag`` ("tensor" after each tensor written, "closed" after the shards
    are named, "finished" just before the final rename).  Unset, it costs a dict lookup."""
    spec = os.environ.get("QCONVERT_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != tag:
        return
    _counts[tag] = _counts.get(tag, 0) + 1
    if _counts[tag] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
