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
