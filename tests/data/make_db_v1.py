"""Regenerate tests/data/db_v1.sqlite, the committed database of schema v1 (run it at a commit whose
SCHEMA_VERSION is 1, e.g. 9e19bb1): later schemas must keep opening this file unchanged."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dbutil import CPU, DENSE, meas, populate  # noqa: E402

from spatialtune.database import TuningDatabase  # noqa: E402

out = Path(__file__).with_name("db_v1.sqlite")
out.unlink(missing_ok=True)
with TuningDatabase(out) as db:
    populate(db)
    for i, t in enumerate([3e-3, 1e-3, 2e-3]):
        db.record(meas(h=f"h{i}", t=t))
    db.record(meas(h="bad", status="wrong_result"))
    db.save_cost_model(CPU.id, "cpu", 100.0, "none", "random", '{"kind": "random"}', 3)
    db.record_baseline(DENSE.key, CPU.id, "cpu", 100.0, "none", "tvm-default", 5e-3, 8)
    db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
