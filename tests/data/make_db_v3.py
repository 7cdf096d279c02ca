"""Regenerate tests/data/db_v3.sqlite, the committed database of schema v3: built with the v1, v2
and v3 migrations exactly as released (they are never edited), then filled through plain SQL the
way v3 wrote rows. Later schemas must keep opening this file.

What it holds: one operator workload (v3 knew no other kind), a 2-core CPU device with its mattr,
measurements at 50 % (1 core) and 100 %, their best rows, a numpy baseline and a cost model."""
import json
import sqlite3
import sys
import zlib
from pathlib import Path

import sqlite_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from spatialtune.store.schema import MIGRATIONS  # noqa: E402

out = Path(__file__).with_name("db_v3.sqlite")
out.unlink(missing_ok=True)
db = sqlite_utils.Database(sqlite3.connect(str(out), isolation_level=None))
db.enable_wal()
db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
for v in (1, 2, 3):
    MIGRATIONS[v](db)
db.execute("INSERT INTO meta VALUES ('schema_version', '3')")
now = "2026-11-20T00:00:00Z"
key = "dense_fp32_M4_N8_K16"
db.execute("INSERT INTO workloads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
           [key, "dense", "fp32", json.dumps({"M": 4, "N": 8, "K": 16}), "x", "tiny_dense", "", 1024, now])
db.execute("INSERT INTO devices VALUES ('cpu-v3', 'cpu', 'Test CPU', '', 2, 'core', 'Linux 6', 'znver3', '0.27', ?,"
           " '-avx512f')", [now])
rows = [(50.0, "a", 4e-3, 1), (50.0, "b", 3e-3, 1), (100.0, "a", 2e-3, 2)]  # ratio, mod_hash, time, units
for i, (r, h, t, u) in enumerate(rows):
    db.execute("INSERT INTO measurements (workload_key, device_id, partition, ratio, interference, mod_hash, trace,"
               " status, error, times, median_s, granted_units, granted_share, source, created_at)"
               " VALUES (?, 'cpu-v3', 'cpu', ?, 'none', ?, ?, 'ok', '', ?, ?, ?, ?, 'tune', ?)",
               [key, r, h, zlib.compress(f"trace-{h}".encode()), json.dumps([t] * 3), t, u, u / 2,
                f"2026-11-20T00:00:0{i}Z"])
for r in (50.0, 100.0):
    best = db.execute("SELECT id, median_s FROM measurements WHERE ratio = ? ORDER BY median_s LIMIT 1", [r]).fetchone()
    n = db.execute("SELECT COUNT(*) FROM measurements WHERE ratio = ?", [r]).fetchone()[0]
    db.execute("INSERT INTO best VALUES (?, 'cpu-v3', 'cpu', ?, 'none', ?, ?, ?, ?)", [key, r, best[0], best[1], n, now])
db.execute("INSERT INTO baselines VALUES (?, 'cpu-v3', 'cpu', 50.0, 'none', 'numpy', 6e-3, 1, ?)", [key, now])
db.execute("INSERT INTO cost_models VALUES ('cpu-v3', 'cpu', 50.0, 'none', 'random', '{\"kind\": \"random\"}', 2, ?)",
           [now])
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
db.close()
print(out)
