"""REST serving under load: ``mlflow models serve`` of an exported model, loopback only.

Starts one server process (``mlflow models serve -m MODEL --env-manager local``, one worker) on a
free loopback port, then:

1. load: ``--clients`` threads post one base64 PNG each (a ``--image-px`` chest-like image) for
   ``--duration`` seconds, at most ``--max-requests`` requests in all, each with a ``--timeout``;
   prints requests/s, p50/p99 latency, failed requests and the server's peak resident memory
   (its process and children, sampled from /proc every 0.1 s);
2. bad requests, one at a time: not an image, a truncated PNG, a DICOM without pixels, a 50 MB
   body, a wrong column name; each must get a 4xx JSON answer with a ``message``, and a good
   request right after each must still get 200.

Without ``--model`` it exports a randomly initialised ``--arch`` at ``--size`` px first (the
server's cost is the same as a trained one's). Exit status 1 when a request failed or a bad one was
not refused as above.

    python benchmarks/serve.py                      # 16 clients for 60 s (the figure README quotes)
    python benchmarks/serve.py --clients 4 --duration 10
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def untrained_model(root: Path, arch: str, size: int) -> Path:
    """Export a randomly initialised ``arch`` as an MLflow model folder."""
    import torch

    from cxrflow.cli import main
    from cxrflow.data.labels import NIH14
    from cxrflow.modelling.models import create_model

    run = root / "run"
    run.mkdir()
    names = list(NIH14.names)
    config = {"model": arch, "size": size, "pixel_mean": 0.5, "pixel_std": 0.25}
    state = create_model(arch, len(names), pretrained="none").state_dict()
    torch.save(
        {"model": state, "config": config, "label_names": names, "stage": "finetune", "epoch": 1},
        run / "best_finetune.pt",
    )
    if main(["export", "--run", str(run), "--format", "mlflow", "--out", str(root / "model")]) != 0:
        raise SystemExit("export failed")
    return root / "model"


def png(side: int, truncate: int | None = None) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] / side
    img = (120 + 80 * np.exp(-((x - 0.5) ** 2 + (y - 0.55) ** 2) / 0.08)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(img, "L").save(buffer, format="PNG")
    data = buffer.getvalue()
    return data if truncate is None else data[:truncate]


def dicom_without_pixels(root: Path) -> bytes:
    from cxrflow.testing.synthformats import write_dicom

    return write_dicom(root / "empty.dcm", np.zeros((8, 8), np.uint16), with_pixels=False).read_bytes()


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, server: subprocess.Popen, log: Path, limit: float = 180) -> None:
    import requests

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server stopped: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /ping within {limit:.0f} s")


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def load_test(url: str, body: bytes, clients: int, duration: float, max_requests: int, timeout: float) -> dict:
    import requests

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    budget = [max_requests]
    deadline = time.monotonic() + duration

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                start = time.perf_counter()
                try:
                    r = session.post(
                        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=timeout
                    )
                    ok = r.status_code == 200 and r.json()["predictions"][0]["error"] is None
                    why = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except requests.RequestException as exc:
                    why = f"{type(exc).__name__}: {exc}"[:200]
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if why:
                        failures.append(why)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds, "failed": len(failures),
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "first_failures": failures[:3]}  # fmt: skip


def bad_requests(url: str, root: Path, good: bytes) -> list[tuple[str, int, str, int]]:
    """(what, status, message, status of the good request after it) for each bad request."""
    import requests

    def records(image: bytes, column: str = "image") -> bytes:
        return json.dumps({"dataframe_records": [{column: base64.b64encode(image).decode()}]}).encode()

    cases = [
        ("not an image", records(b"this is a text file, not an image")),
        ("a truncated PNG", records(png(256, truncate=100))),
        ("a DICOM without pixels", records(dicom_without_pixels(root))),
        ("a 50 MB body", records(os.urandom(50 * 2**20 * 3 // 4))),
        ("a wrong column name", records(png(64), column="picture")),
    ]
    results = []
    for what, body in cases:
        r = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=120)
        try:
            message = str(r.json().get("message", ""))
        except ValueError:
            message = f"(not JSON) {r.text[:100]}"
        after = requests.post(f"{url}/invocations", data=good, headers={"Content-Type": "application/json"}, timeout=60)
        results.append((what, r.status_code, message.split("Error:")[-1].strip()[:110], after.status_code))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="an exported MLflow model folder (default: export an untrained one)"
    )
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--image-px", type=int, default=1024, help="side of the PNG each request carries")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxrflow-bench-serve-") as tmp:
        root = Path(tmp)
        model = Path(args.model) if args.model else untrained_model(root, args.arch, args.size)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url, log = f"http://127.0.0.1:{port}", root / "server.log"
        server = start_server(model, port, log)
        peak = [0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], tree_rss(server.pid))
                time.sleep(0.1)

        try:
            wait_ready(url, server, log)
            threading.Thread(target=sample, daemon=True).start()
            good = json.dumps(
                {"dataframe_records": [{"image": base64.b64encode(png(args.image_px)).decode()}]}
            ).encode()
            stats = load_test(url, good, args.clients, args.duration, args.max_requests, args.timeout)
            refused = bad_requests(url, root, good)
        finally:
            sampling.set()
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(f"model {model if args.model else f'{args.arch} at {args.size} px (untrained)'}; one server process, "
          f"{args.clients} clients for {args.duration:g} s, {args.image_px} px PNG per request; "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"requests {stats['requests']} in {stats['seconds']:.1f} s: {stats['rps']:.2f} requests/s, "
          f"p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms, failed {stats['failed']}, "
          f"server peak memory {peak[0] / 2**20:.0f} MiB")  # fmt: skip
    for reason in stats["first_failures"]:
        print(f"  failed: {reason}")
    print("bad request              status  message                                                   good after")
    ok = stats["failed"] == 0
    for what, status, message, after in refused:
        print(f"{what:<24} {status:>6}  {message:<58}  {after}")
        ok = ok and 400 <= status < 500 and bool(message) and after == 200
    print("all good requests answered and every bad one refused with a 4xx JSON message" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
