"""Regenerate tests/data/db_v2.sqlite, the committed database of schema v2: built with the v1 and v2
migrations exactly as released (they are never edited), then filled through plain SQL the way v2
wrote rows. Later schemas must keep opening this file.

What it holds: a 2-core CPU device with measurements keyed by the ratio *asked* (v2's meaning):
25 % (which granted 1 core) and 50 % (also 1 core), one kernel measured under both; 100 % (2
cores); and a green-context GPU row asked as 25 % of 132 SMs (granted 32)."""
import json
import sqlite3
import sys
import zlib
from pathlib import Path

import sqlite_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from spatialtune.store.schema import MIGRATIONS  # noqa: E402

out = Path(__file__).with_name("db_v2.sqlite")
out.unlink(missing_ok=True)
db = sqlite_utils.Database(sqlite3.connect(str(out), isolation_level=None))
db.enable_wal()
db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
MIGRATIONS[1](db)
MIGRATIONS[2](db)
db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
now = "2026-11-01T00:00:00Z"
db.execute("INSERT INTO workloads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
           ["dense_fp32_M4_N8_K16", "dense", "fp32", json.dumps({"M": 4, "N": 8, "K": 16}), "x", "tiny_dense", "",
            1024, now])
db.execute("INSERT INTO devices VALUES ('cpu-v2', 'cpu', 'Test CPU', '', 2, 'core', 'Linux 6', 'x86_64', '0.27', ?)",
           [now])
db.execute("INSERT INTO devices VALUES ('cuda-v2', 'cuda', 'Test GPU', '', 132, 'SM', '580', 'sm_90', '0.27', ?)",
           [now])
rows = [  # device, partition, ratio asked, mod_hash, time, units granted
    ("cpu-v2", "cpu", 25.0, "a", 4e-3, 1), ("cpu-v2", "cpu", 25.0, "b", 3e-3, 1),
    ("cpu-v2", "cpu", 50.0, "b", 3.5e-3, 1), ("cpu-v2", "cpu", 50.0, "c", 5e-3, 1),
    ("cpu-v2", "cpu", 100.0, "a", 2e-3, 2), ("cuda-v2", "green", 25.0, "g", 1e-4, 32)]
for i, (dev, part, r, h, t, u) in enumerate(rows):
    db.execute("INSERT INTO measurements (workload_key, device_id, partition, ratio, interference, mod_hash, trace,"
               " status, error, times, median_s, granted_units, granted_share, source, created_at)"
               " VALUES (?, ?, ?, ?, 'none', ?, ?, 'ok', '', ?, ?, ?, ?, 'tune', ?)",
               ["dense_fp32_M4_N8_K16", dev, part, r, h, zlib.compress(f"trace-{h}".encode()), json.dumps([t] * 3), t,
                u, u / (2 if dev == "cpu-v2" else 132), f"2026-11-01T00:00:0{i}Z"])
for dev, part, r in {(d, p, r) for d, p, r, *_ in rows}:
    best = db.execute("SELECT id, median_s FROM measurements WHERE device_id = ? AND ratio = ? ORDER BY median_s"
                      " LIMIT 1", [dev, r]).fetchone()
    n = db.execute("SELECT COUNT(*) FROM measurements WHERE device_id = ? AND ratio = ?", [dev, r]).fetchone()[0]
    db.execute("INSERT INTO best VALUES ('dense_fp32_M4_N8_K16', ?, ?, ?, 'none', ?, ?, ?, ?)",
               [dev, part, r, best[0], best[1], n, now])
db.execute("INSERT INTO baselines VALUES ('dense_fp32_M4_N8_K16', 'cpu-v2', 'cpu', 25.0, 'none', 'numpy', 6e-3, 1, ?)",
           [now])
db.execute("INSERT INTO cost_models VALUES ('cpu-v2', 'cpu', 25.0, 'none', 'random', '{\"kind\": \"random\"}', 2, ?)",
           [now])
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
db.close()
print(out)
