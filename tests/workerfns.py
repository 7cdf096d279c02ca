"""Functions run inside test workers (importable by module path)."""
import os
import time


def add(a, b):
    return a + b


def sleep(s):
    time.sleep(s)
    return "woke"


def boom():
    raise ValueError("bad candidate")


def die():
    os.abort()


def getenv(name):
    return os.environ.get(name)


def pid():
    return os.getpid()


def affinity():
    return sorted(os.sched_getaffinity(0))


INITS = []


def init(tag):
    INITS.append(tag)
    return f"ready {tag}"


def inits():
    return list(INITS)


def thread_cpus():
    """{thread id: the CPUs it may run on} for every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list"):
                        out[int(tid)] = line.split(":", 1)[1].strip()
        except OSError:
            pass
    return out


def blas_matmul(n):
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    return float((a @ a).sum())


def fail_on_start(flag_path):
    """A worker initialiser that fails while ``flag_path`` exists (a restart that does not work)."""
    if os.path.exists(flag_path):
        raise RuntimeError("the device is not ready")
    return os.getpid()


def raise_then_answer(flag_path):
    """A measuring call: raises while ``flag_path`` holds 'raise', else a result with the pid."""
    with open(flag_path) as f:
        if f.read() == "raise":
            raise RuntimeError("TVMError: a kernel raised inside the worker")
    return {"status": "ok", "pid": os.getpid()}


def answer():
    return {"status": "ok", "pid": os.getpid()}
