"""The README's work-queue example  runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import readme_section

ROOT = Path(__file__).resolve().parents[2]
DOC_TEXT = readme_section("Work queue")


def test_spec_example_runs_as_written(nats_server: NatsServer, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC_TEXT, re.S)
    example = next(b for b in blocks if "asyncio.run(main())" in b)
    script = tmp_path / "example.py"
    script.write_text(example)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "NATS_URL": nats_server.url, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True {'story': 'Build login page', 'status': 'built'}"
