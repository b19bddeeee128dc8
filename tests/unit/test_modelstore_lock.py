"""Two `models build` runs on one store at the same time (two pytest workers, `make up` next to
`make test`): the second waits for the first and finds the model built; neither deletes the
other's work in progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from services.common.modelstore import MANIFEST
from services.common.settings import REPO_ROOT

CATALOG = """\
models:
  - id: test/tiny
    tasks: [feature-extraction]
    source: {kind: build, builder: tiny}
    inference:
      name: tiny
      runtime: sentence_embedding
      inputs: [{name: input_ids, datatype: INT64, dims: [-1]}]
      outputs: [{name: embedding, datatype: FP32, dims: [4]}]
"""

# One build process. Its builder holds the build open until the other process has either begun
# building too (no lock: both write into `test/tiny.building`) or is waiting for the store's lock
# (a "->" waiter in /proc/locks): the two builds overlap for sure, whatever the machine's speed.
BUILD = """\
import json, os, sys, time, types
from pathlib import Path
from services.models import build as modelstore
from services.models import builders
from services.common.catalog import Catalog

work, me = Path(sys.argv[1]), str(os.getpid())
(work / "pids" / me).touch()

def waits_for_a_flock(pid):
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:3] == ["->", "FLOCK"] and fields[5] == pid:
            return True
    return False

def build(entry, out, base, progress):
    (work / "builds" / me).touch()
    deadline = time.monotonic() + 60
    while not any(
        (work / "builds" / p.name).exists() or waits_for_a_flock(p.name)
        for p in (work / "pids").iterdir() if p.name != me
    ):
        if time.monotonic() > deadline:
            sys.exit("the other build neither built nor waited")
        time.sleep(0.01)
    out.mkdir(parents=True)
    for i in range(50):
        (out / f"part-{i}").write_text(str(i))
    return {"parts": 50}

builders.get = lambda name: types.SimpleNamespace(inputs=lambda: [], build=build, card=lambda e, m: "# tiny\\n")
built = modelstore.build_all(Catalog.load(work / "catalog.yaml"), work / "models")
print(json.dumps([flag for _, flag in built]))
"""


def test_two_concurrent_builds_of_one_store_both_succeed_and_build_once(tmp_path):
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    (tmp_path / "build.py").write_text(textwrap.dedent(BUILD))
    (tmp_path / "pids").mkdir()
    (tmp_path / "builds").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "build.py"), str(tmp_path)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert sorted(json.loads(out) for out, _ in results) == [[False], [True]]  # built once, then up to date
    assert len(list((tmp_path / "builds").iterdir())) == 1
    store = tmp_path / "models" / "test"
    assert sorted(p.name for p in store.iterdir()) == ["tiny"]  # no `.building` folder left over
    model = store / "tiny"
    assert sorted(p.name for p in (model / "model").iterdir()) == sorted(f"part-{i}" for i in range(50))
    assert json.loads((model / MANIFEST).read_text())["id"] == "test/tiny"
