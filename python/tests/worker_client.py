"""A small client of moecheck_worker.py (the protocol of docs/python-adapters.md), for tests."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "python", "moecheck_worker.py")


class Worker:
    def __init__(self, adapter: str, env: dict | None = None, python: str = sys.executable):
        e = dict(os.environ)
        e["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env or {})
        self.p = subprocess.Popen([python, "-u", WORKER, adapter], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=e)
        self.hello = self.read(60)

    def read(self, timeout: float = 60) -> dict:
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"no reply in {timeout} s")
        line = self.p.stdout.readline()
        if not line:
            raise EOFError(f"worker closed the channel (exit {self.p.wait()}): {self.p.stderr.read().decode()[-2000:]}")
        return json.loads(line)

    def send(self, obj) -> None:
        self.p.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n")
        self.p.stdin.flush()

    def request(self, obj, timeout: float = 120) -> dict:
        self.send(obj)
        return self.read(timeout)

    def close(self) -> int:
        try:
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        try:
            return self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()


def case_request(rid, case_file: str, out_dir: str, *, route=True, repeats=2, mutant=None, key=None, prefix=None,
                 config=None):
    from moecheck_adapter import SafetensorsFile
    f = SafetensorsFile(case_file)
    cfg = config if config is not None else json.loads(f.metadata["config"])
    if prefix is None:
        prefix = next(n for n in f.names() if n.endswith("mlp.gate.weight"))[: -len("gate.weight")]
    f.close()
    return {"op": "run", "id": rid, "case": os.path.basename(case_file),
            "layer": {"key": key or case_file, "file": case_file, "prefix": prefix, "config": cfg},
            "x": {"file": case_file, "tensor": "hidden_states"}, "route": route, "repeats": repeats,
            "out_dir": out_dir, "mutant": mutant}


def read_output(rep: dict, r: int = 0) -> np.ndarray:
    o = rep["outputs"][r]
    return np.fromfile(o["file"], dtype=np.dtype(o["dtype"]).newbyteorder("<")).reshape(rep["shape"])


def read_route(rep: dict):
    R = rep["route"]
    ids = np.fromfile(R["ids"], dtype="<i4").reshape(rep["shape"][0], R["slots"])
    w = np.fromfile(R["weights"], dtype="<f8").reshape(rep["shape"][0], R["slots"])
    return ids, w
