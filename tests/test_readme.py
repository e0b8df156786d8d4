"""The README's Python tour runs as written, on sample_data built where the README says."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_tour_runs(tmp_path, monkeypatch):
    from mmdata.build import BuildConfig, build_dataset

    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    build_dataset(ROOT / "sample_data", tmp_path / "runs/demo/data",
                  BuildConfig.from_dict({"split_by": "speaker", "test_groups": ["george"], "val": 0.15}),
                  progress=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tour.py").write_text(code)
    env = runpy.run_path(str(tmp_path / "tour.py"))
    assert env["state"]["epoch"] == 2 and env["state"]["batches"] == 0  # both epochs consumed
