"""Hand-built database content for tests that need no tuning run."""

from spatialtune.store.database import Measurement
from spatialtune.device import DeviceInfo
from spatialtune.workloads.spec import Workload

CPU = DeviceInfo(kind="cpu", name="Test CPU", units=8, unit="core", driver="Linux 6", arch="x86_64",
                 tvm_version="0.27.0.post1")
GPU = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", units=132, unit="SM", driver="580.159.04",
                 arch="sm_90", tvm_version="0.27.0.post1", uuid="GPU-test")
DENSE = Workload(op="dense", dtype="fp32", params={"M": 4, "N": 8, "K": 16}, name="tiny_dense")


def meas(w=DENSE, dev=CPU, ratio=100.0, h="h0", t=1e-3, status="ok", interference="none", partition="cpu", **kw):
    return Measurement(workload_key=w.key, device_id=dev.id, partition=partition, ratio=ratio,
                       interference=interference, mod_hash=h, trace=f"trace-{h}", status=status,
                       times=[t] * 3 if status == "ok" else [], median_s=t if status == "ok" else None,
                       error="" if status == "ok" else "boom", **kw)


def populate(db, w=DENSE, dev=CPU):
    db.add_workload(w)
    db.add_device(dev)
