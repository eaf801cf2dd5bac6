"""Every golden fixture names where it came from and the generator that remakes it (tests/golden/generate/)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def sidecars() -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in sorted(GOLDEN.glob("*/*.source.json"))]


def test_every_fixture_has_one_sidecar_with_a_commit_or_version_and_a_generator():
    listed = [p.parent / f.rstrip("/") for p, s in sidecars() for f in s["fixtures"]]
    files = {p for kind in ("purifiers", "checkpoints") for p in (GOLDEN / kind).iterdir()
             if not p.name.endswith(".source.json")}
    assert sorted(listed) == sorted(files)  # each file in exactly one sidecar, no sidecar for a missing file
    for path, s in sidecars():
        assert re.fullmatch(r"[0-9a-f]{40}", s.get("commit", "")) or re.fullmatch(r"\d+\.\d+\.\d+", s.get("version", "")), path
        script, name = s["generator"].split()
        source = (Path(__file__).parents[1] / script).read_text()
        assert f"def {name}(write" in source and f'"{name}": {name}' in source, path


def test_generators_skip_cleanly_without_the_references():
    env = {k: v for k, v in os.environ.items() if k != "SSNI_REFERENCES"}
    for script in ("purifiers.py", "checkpoints.py"):
        out = subprocess.run([sys.executable, str(GOLDEN / "generate" / script)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("skipped: set SSNI_REFERENCES"), out.stderr
