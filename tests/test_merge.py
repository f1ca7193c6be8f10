"""Merging measurement stores made on different hosts (``edgenas measurements --merge``)."""

from __future__ import annotations

import hashlib
import sqlite3

from profiler.merge import merge_stores
from profiler.store import Store
from tests.helpers import sweep


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_stores_merge_with_each_cell_once_and_conflicts_reported(tiny_ws, tmp_path) -> None:
    a_cfg, b_cfg, c_cfg = tiny_ws.space.sample(3, 4)
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    sweep(tiny_ws, "local", a, [a_cfg, b_cfg])
    sweep(tiny_ws, "local", b, [b_cfg, c_cfg])
    with sqlite3.connect(b) as db:  # the shared cell measured 50% slower on the other laptop's run
        db.execute("UPDATE measurements SET median_ms = median_ms * 1.5 WHERE subnet_hash=? AND phase='decode'",
                   (b_cfg.config_hash(),))
    before = _digest(a), _digest(b)
    report = merge_stores([a, b], tmp_path / "m.db")
    assert (_digest(a), _digest(b)) == before  # sources are read, never changed
    assert report.cells_added == 6 and report.cells_duplicate == 2
    assert report.devices_added == 1 and report.devices_matched == 1 and report.subnets_added == 3
    assert [(c["subnet"], c["phase"]) for c in report.conflicts] == [(b_cfg.config_hash(), "decode")]
    store = Store(tmp_path / "m.db")
    rows = [r for r in store.measurement_rows() if not r["is_reference"]]
    assert len(rows) == 6 and len({(r["subnet_hash"], r["phase"]) for r in rows}) == 6
    assert len(store.devices()) == 1
    store.close()
    again = merge_stores([a, b], tmp_path / "m.db")  # merging twice adds nothing
    assert again.cells_added == 0 and again.references_added == 0 and again.cells_duplicate == 8
