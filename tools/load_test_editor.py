"""The web editor (``app.py``) under load and hostile input, on localhost: a report of what it answered.

    python tools/load_test_editor.py --out runs/editor-load.json        # 30 clients, 200 edits, the shipped model

Starts ``app.py`` in a subprocess on a free local port, compiles its two edits (one plain IP2P, one FoI) with one
request each, notes the server's memory, then:

1. **load**: ``--clients`` clients (``gradio_client``, one thread each) submit edits at once, alternately plain
   IP2P and two-instruction FoI, until ``--edits`` have been submitted in all; each edit's latency is timed from
   its submission to its result;
2. **burst**: ``--burst`` requests join the queue at once through the HTTP API (past the queue's ``--queue-size``):
   those beyond it must be answered "queue full" at once, and the others must complete;
3. **disconnect**: a client submits an edit and closes its connection while it waits, twice;
4. **malformed**: requests with wrong types, missing fields, a 1 MB instruction, non-image bytes, a picture over
   the pixel limit whose file is small (a decompression bomb), an upload over the byte limit, too many instructions
   and a path of the server's own disk instead of an upload: each must be refused with a message;

and last checks that a plain edit still succeeds. The report (printed, and written as JSON to ``--out``): edits
completed, answers by kind, latency percentiles, the server's memory before and after (and their difference
against ``--memory-bound-mb``), the tracebacks in the server's log, and whether the server stayed up throughout.
The exit status is 1 if the server went down, an edit of the load failed, a malformed request was not refused,
or memory grew beyond the bound. ``tests/test_app_load.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes.png"
PLAIN = "make the circle blue"
FOI = "make the circle blue | circle\nremove the square | square"
START_TIMEOUT_S = 600  # loading the model
EDIT_TIMEOUT_S = 900  # the first edits compile
SLOW_STEPS = 20  # the burst's and the disconnecting clients' edits: slow enough that the queue fills


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=30, help="clients submitting at once (default: 30)")
    parser.add_argument("--edits", type=int, default=200, help="edits of the load phase in all (default: 200)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of each edit (default: 2)")
    parser.add_argument("--queue-size", type=int, default=32, help="the server's --queue-size (default: 32)")
    parser.add_argument("--burst", type=int, default=48, help="requests joining at once in the burst (default: 48)")
    parser.add_argument("--memory-bound-mb", type=float, default=200.0, help="allowed growth (default: 200 MB)")
    parser.add_argument("--model", default=None, help="app.py's --model (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.edits < args.clients:
        parser.error("give --clients >= 1 and --edits >= --clients")
    if args.burst <= args.queue_size:
        parser.error("--burst must be above --queue-size, so that the queue's limit is reached")
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``app.py`` in a subprocess, its log in a file; ``rss_mb`` reads its resident memory."""

    def __init__(self, args, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, str(ROOT / "app.py"), "--port", str(self.port)]
        command += ["--queue-size", str(args.queue_size)] + (["--model", args.model] if args.model else [])
        self.process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_until_up(self) -> None:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"app.py exited ({self.process.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"app.py did not answer within {START_TIMEOUT_S} s")

    def up(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def tracebacks(self) -> int:
        return self.log_path.read_text().count("Traceback (most recent call last)")

    def errors(self) -> dict[str, int]:
        """The log's errors, counted: each traceback's exception line, and the editor's one-line refusals."""
        found, in_traceback = [], False
        for line in self.log_path.read_text().splitlines():
            if line.startswith("Traceback (most recent call last)"):
                in_traceback = True
            elif in_traceback and line and not line[0].isspace():
                found.append(line[:100])
                in_traceback = False
            elif line.startswith("app.py: edit refused"):
                found.append("app.py: edit refused: ...")
        return dict(collections.Counter(found))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def edit_arguments(instructions: str, steps: int, upload=None) -> list:
    """The ``/edit`` endpoint's inputs in order: upload, instructions, brush, steps, s_T, s_I, seed, strength."""
    from gradio_client import handle_file

    upload = handle_file(str(EXAMPLE)) if upload is None else upload
    return [upload, instructions, None, steps, 7.5, 1.5, 0, 0.8]


def outcome_of(result) -> str:
    """An answer's kind: ``ok`` for an edit, else ``refused: <the status line's first words>``."""
    status = result[3] if isinstance(result, list | tuple) and len(result) == 4 else ""
    if isinstance(status, str) and status.startswith("**Not edited:**"):
        return "refused: " + " ".join(status.removeprefix("**Not edited:**").split()[:4])
    return "ok" if result[0] else "empty answer"


def load_phase(server: Server, args, workdir: Path) -> dict:
    """``args.clients`` gradio_client clients submitting ``args.edits`` edits in all; latencies in seconds. Each edit
    sends its own picture (the example with one corner pixel changed), as different users do: Gradio writes each
    output picture to a cache path named by its content, rewriting the file for an equal picture while another
    request may still be downloading it (``processing_utils.save_pil_to_cache``), which the first 200-edit run of
    identical requests met once."""
    from gradio_client import Client, handle_file
    from PIL import Image

    remaining, lock = [args.edits], threading.Lock()
    latencies, outcomes = [], collections.Counter()

    def client_loop(index: int) -> None:
        client = Client(server.url, verbose=False)
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
                number = remaining[0]
            instructions = PLAIN if number % 2 else FOI
            picture = workdir / f"picture-{number}.png"
            with Image.open(EXAMPLE) as example:
                example = example.convert("RGB")
                example.putpixel((0, 0), (number % 256, number // 256 % 256, 0))
                example.save(picture)
            started = time.perf_counter()
            try:
                upload = handle_file(str(picture))
                result = client.predict(*edit_arguments(instructions, args.steps, upload), api_name="/edit")
                kind = outcome_of(result)
            except Exception as error:  # noqa: BLE001  # every failure is counted by kind, none stops the phase
                kind = f"error: {type(error).__name__}: {str(error)[:80]}"
            with lock:
                outcomes[kind] += 1
                if kind == "ok":
                    latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client_loop, range(args.clients)))
    wall = time.perf_counter() - started
    return {
        "clients": args.clients,
        "edits": args.edits,
        "completed": outcomes["ok"],
        "answers": dict(outcomes),
        "wall_s": round(wall, 1),
        "edits_per_s": round(outcomes["ok"] / wall, 2),
        "latency_s": percentiles(latencies),
    }


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {}
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 90, 99)} | {"max": round(max(values), 2)}


def call(server: Server, data: list, timeout: float = EDIT_TIMEOUT_S) -> tuple[str, float]:
    """One request through the HTTP API (``/gradio_api/call/edit``, then its event stream): its kind of answer
    (``ok``, ``refused: ...``, ``queue full``, ``error: ...``, ``http <status>``) and the seconds it took."""
    import httpx

    started = time.perf_counter()
    try:
        joined = httpx.post(f"{server.url}/gradio_api/call/edit", json={"data": data}, timeout=timeout)
        if joined.status_code == 503 and "queue is full" in joined.text.lower():
            return "queue full", time.perf_counter() - started
        if joined.status_code != 200:
            return f"http {joined.status_code}", time.perf_counter() - started
        event_id = joined.json()["event_id"]
        with httpx.stream("GET", f"{server.url}/gradio_api/call/edit/{event_id}", timeout=timeout) as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line.split(":", 1)[1])
                    return answer_kind(event, payload), time.perf_counter() - started
    except httpx.HTTPError as error:
        return f"error: {type(error).__name__}", time.perf_counter() - started
    return "no answer", time.perf_counter() - started


def answer_kind(event: str, payload) -> str:
    if event == "complete":
        return outcome_of(payload)
    message = str(payload)
    if "queue is full" in message.lower():
        return "queue full"
    if payload in (None, {"error": None}):  # Gradio refused it before the handler ran, with no message shown
        return "error without a message"
    return f"error: {message[:100]}"


def burst_phase(server: Server, args, upload: dict) -> dict:
    """``args.burst`` requests joining at once (each a slower FoI edit, so that the queue fills): counts by kind,
    and how long the "queue full" answers took."""
    data = [upload, FOI, None, SLOW_STEPS, 7.5, 1.5, 0, 0.8]
    with ThreadPoolExecutor(args.burst) as pool:
        answers = list(pool.map(lambda _: call(server, data), range(args.burst)))
    full = [seconds for kind, seconds in answers if kind == "queue full"]
    return {
        "requests": args.burst,
        "queue_size": args.queue_size,
        "answers": dict(collections.Counter(kind for kind, _ in answers)),
        "queue_full_answer_s": percentiles(full),
    }


def disconnect_phase(server: Server, args, upload: dict) -> dict:
    """Clients that submit an edit, read the first event of its stream and close the connection mid-edit."""
    import httpx

    closed = 0
    for _ in range(2):
        data = [upload, FOI, None, SLOW_STEPS, 7.5, 1.5, 0, 0.8]
        event_id = httpx.post(f"{server.url}/gradio_api/call/edit", json={"data": data}, timeout=60).json()["event_id"]
        with httpx.stream("GET", f"{server.url}/gradio_api/call/edit/{event_id}", timeout=60) as stream:
            next(stream.iter_lines(), None)  # then the connection closes while the edit runs or waits
        closed += 1
    return {"clients_closed_mid_edit": closed}


def malformed_phase(server: Server, args, upload: dict, workdir: Path) -> dict:
    """Hostile and broken requests; each must be refused with a message (never an edit, never a hang)."""
    import httpx
    from PIL import Image

    def uploaded(path: Path) -> dict | str:
        with path.open("rb") as file:
            answer = httpx.post(f"{server.url}/gradio_api/upload", files={"files": (path.name, file)}, timeout=120)
        if answer.status_code != 200:
            return f"http {answer.status_code}"
        return {"path": answer.json()[0], "meta": {"_type": "gradio.FileData"}}

    (workdir / "notes.png").write_bytes(b"these bytes are not a picture")
    Image.new("1", (20_000, 20_000)).save(workdir / "bomb.png", optimize=True)  # 400 Mpx in a small file
    (workdir / "huge.png").write_bytes(b"\0" * int(21 * 2**20))  # over the 20 MB default
    good = [upload, PLAIN, None, args.steps, 7.5, 1.5, 0, 0.8]
    cases = {
        "steps as text": good[:3] + ["many"] + good[4:],
        "seed missing (None)": good[:6] + [None] + good[7:],
        "instructions not text": [upload, 12345] + good[2:],
        "upload not a file record": ["/etc/hostname"] + good[1:],
        "fields missing": good[:3],
        "1 MB instruction": [upload, "make it red " * 90_000] + good[2:],
        "too many instructions": [upload, "\n".join(["make it red"] * 50)] + good[2:],
        "non-image bytes": [uploaded(workdir / "notes.png")] + good[1:],
        "decompression bomb": [uploaded(workdir / "bomb.png")] + good[1:],
        "a path of the server's disk": [{"path": str(EXAMPLE), "meta": {"_type": "gradio.FileData"}}] + good[1:],
    }
    answers = {}
    for name, data in cases.items():
        answers[name] = call(server, data, timeout=120)[0] if isinstance(data[0], dict | str | None) else data[0]
    answers["upload over the byte limit"] = uploaded(workdir / "huge.png")
    return answers


def run(args) -> dict:
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        server = Server(args, workdir / "server.log")
        try:
            server.wait_until_up()
            client = Client(server.url, verbose=False)
            for instructions, steps in ((PLAIN, args.steps), (FOI, args.steps), (FOI, SLOW_STEPS)):  # compiles all
                client.predict(*edit_arguments(instructions, steps), api_name="/edit")
            upload = upload_record(server)
            memory_before, tracebacks_before = server.rss_mb(), server.tracebacks()
            report = {"load": load_phase(server, args, workdir), "up_after_load": server.up()}
            report["burst"] = burst_phase(server, args, upload)
            report["disconnect"] = disconnect_phase(server, args, upload)
            report["malformed"] = malformed_phase(server, args, upload, workdir)
            report["final_edit"] = call(server, [upload, PLAIN, None, args.steps, 7.5, 1.5, 0, 0.8])[0]
            memory_after = server.rss_mb()
            report["memory_mb"] = {
                "before": round(memory_before),
                "after": round(memory_after),
                "growth": round(memory_after - memory_before),
                "bound": args.memory_bound_mb,
            }
            report["server_tracebacks"] = server.tracebacks() - tracebacks_before
            report["server_errors"] = server.errors()
            report["server_up"] = server.up()
        finally:
            server.stop()
    report["problems"] = problems(report, args)
    return report


def upload_record(server: Server) -> dict:
    """The example picture uploaded once, as the file record the page sends."""
    import httpx

    with EXAMPLE.open("rb") as file:
        answer = httpx.post(f"{server.url}/gradio_api/upload", files={"files": (EXAMPLE.name, file)}, timeout=60)
    answer.raise_for_status()
    return {"path": answer.json()[0], "meta": {"_type": "gradio.FileData"}}


def problems(report: dict, args) -> list[str]:
    """What the report shows to be wrong (empty: the editor held)."""
    found = []
    if not (report["server_up"] and report["up_after_load"]):
        found.append("the server went down")
    if report["load"]["completed"] != args.edits:
        found.append(f"load: {report['load']['completed']} of {args.edits} edits completed")
    burst = report["burst"]["answers"]
    if not burst.get("queue full") or burst.get("ok", 0) + burst.get("queue full", 0) != args.burst:
        found.append(f"burst: expected edits and 'queue full' answers only, got {burst}")
    for name, kind in report["malformed"].items():
        if kind == "ok" or kind == "no answer" or kind.startswith("error: Read"):
            found.append(f"malformed request '{name}' was answered {kind!r}")
    if report["final_edit"] != "ok":
        found.append(f"the final edit was answered {report['final_edit']!r}")
    if report["memory_mb"]["growth"] > args.memory_bound_mb:
        found.append(f"memory grew by {report['memory_mb']['growth']} MB")
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    for problem in report["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
