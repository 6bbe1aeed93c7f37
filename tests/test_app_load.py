"""A short run of ``tools/load_test_editor.py``: the web editor under concurrent clients, a full queue, clients
that disconnect and malformed requests, served by ``app.py`` in its own process on localhost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_editor_holds_under_load_and_hostile_requests(tmp_path):
    out = tmp_path / "report.json"
    command = [sys.executable, "tools/load_test_editor.py", "--clients", "4", "--edits", "8"]
    command += ["--queue-size", "4", "--burst", "8", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server_up"] and report["problems"] == []
    assert report["load"]["completed"] == 8 and report["load"]["answers"] == {"ok": 8}
    burst = report["burst"]["answers"]
    assert burst["queue full"] >= 8 - 4 - 1 and burst["ok"] + burst["queue full"] == 8  # one may be running
    assert report["burst"]["queue_full_answer_s"]["max"] < 10  # "busy" at once, not after a wait
    malformed = report["malformed"]
    for name in ("steps as text", "seed missing (None)", "instructions not text", "1 MB instruction"):
        assert malformed[name].startswith("refused: "), (name, malformed[name])
    assert malformed["non-image bytes"] == "refused: the upload (notes.png) is"
    assert malformed["decompression bomb"] == "refused: the upload (bomb.png) declares"
    assert malformed["too many instructions"] == "refused: 50 instructions; this editor"
    assert malformed["upload over the byte limit"] == "http 413"
    for name in ("upload not a file record", "fields missing", "a path of the server's disk"):
        assert malformed[name] == "error without a message"  # Gradio's own checks, before the handler
    assert report["final_edit"] == "ok"
    # Each of the editor's refusals is one line in the server's log; the only tracebacks are Gradio's three.
    assert report["server_errors"]["app.py: edit refused: ..."] == 7 and report["server_tracebacks"] == 3
