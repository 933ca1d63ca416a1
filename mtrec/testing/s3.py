"""A real S3 server on 127.0.0.1 for tests and benchmarks: moto's S3 behind a proxy that counts
requests and can fail, lose, hold or deny them.

    with S3Server() as s3:                      # a subprocess: its own view, like a real store
        s3.make_bucket("mtrec")
        os.environ.update(s3.env())             # credentials and endpoint, the standard way
        ...                                     # s3://mtrec/... through s3fs, boto3, MLflow
        s3.set_faults(0.05, seed=1)             # 5% of requests answer 503 SlowDown
        s3.set_faults(0.04, seed=1, lose=0.01)  # and 1% done but never answered
        s3.counts()                             # {"GET": 812, "PUT": 240, ..., "failed": 53}
        s3.requests()                           # [(time, "PUT", "/mtrec/work/..."), ...]
        s3.hold("/dt=2026-01-02/", after=3)     # the 4th request on that path and later hang
        s3.deny("/other-bucket")                # 403 AccessDenied, as a bucket policy would

The server is one process (`python -m mtrec.testing.s3`): moto's S3 (`ThreadedMotoServer`) on one
port, the proxy on another; clients talk to the proxy (`endpoint`). moto enforces S3's
conditional writes (`If-None-Match: *`, `If-Match`), has no atomic rename, and answers listings
from the objects present. The faults:

- failed (`set_faults(rate)`): answered 503 SlowDown before the request reaches moto, so it
  changed nothing: what a client sees of a throttled request, which every S3 client retries;
- lost (`set_faults(lose=...)`): moto does the request and the proxy drops the connection instead
  of answering, so the client retries a write that already happened (a conditional create then
  fails on its own object);
- `delay_s`: latency added to every request; `hold`: requests left unanswered until `release`
  (a test kills the client meanwhile); `deny`: 403 AccessDenied.

The control endpoint `/_mtrec/...` is the proxy's own and is not counted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_KEY = "mtrec-test-key"
SECRET_KEY = "mtrec-test-secret"
REGION = "us-east-1"
CONTROL = "/_mtrec/"
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)
# hop-by-hop headers: the proxy frames each message itself
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class _State:
    """What the proxy shares between its request threads."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[float, str, str]] = []  # (time.time(), method, path?query) of each request
        self.fail_rate = 0.0
        self.lose_rate = 0.0
        self.delay_s = 0.0
        self.rng = random.Random(0)
        self.hold: tuple[str, int] | None = None  # (path substring, matching requests still let through)
        self.released = threading.Event()
        self.denied: list[str] = []  # path substrings answered 403 AccessDenied, as a bucket policy would

    def held(self, path: str) -> bool:
        """Whether this request is to be held (not answered until released): the test kills its
        client meanwhile, e.g. a job between two objects of a publish."""
        with self.lock:
            if self.hold is None or self.hold[0] not in path:
                return False
            if self.hold[1] > 0:
                self.hold = (self.hold[0], self.hold[1] - 1)
                return False
            self.counts["held"] += 1
        return True

    def admit(self, method: str, path: str) -> str:
        """Count a request and decide its fate: "fail" (503 before the store sees it), "lose" (the
        store does it, the answer is lost: the connection drops) or "pass"."""
        with self.lock:
            self.counts[method] += 1
            self.log.append((time.time(), method, path))
            draw = self.rng.random()
            if draw < self.fail_rate:
                self.counts["failed"] += 1
                return "fail"
            if draw < self.fail_rate + self.lose_rate:
                self.counts["lost"] += 1
                return "lose"
            return "pass"


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read counts(), not a log
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            """Send a response; to a HEAD without a body (and with the upstream's length, if any)."""
            head = self.command == "HEAD"
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            upstream = {k.lower(): v for k, v in headers}.get("content-length")
            self.send_header("Content-Length", upstream if head and upstream else str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _control(self) -> None:
            what = self.path[len(CONTROL) :].split("?")[0]
            body = json.loads(self._body() or b"{}")
            with state.lock:
                if what == "faults":
                    state.fail_rate = float(body.get("rate", 0.0))
                    state.lose_rate = float(body.get("lose", 0.0))
                    state.rng = random.Random(int(body.get("seed", 0)))
                    state.delay_s = float(body.get("delay_s", state.delay_s))
                elif what == "reset":
                    state.counts.clear()
                    state.log.clear()
                elif what == "hold":
                    state.hold = (body["pattern"], int(body.get("after", 0)))
                    state.released.clear()
                elif what == "release":
                    state.hold = None
                    state.released.set()
                elif what == "deny":
                    state.denied = list(body.get("patterns", []))
                out = json.dumps(state.log if what == "requests" else dict(state.counts)).encode()
            self._reply(200, [("Content-Type", "application/json")], out)

        def _forward(self) -> None:
            if self.path.startswith(CONTROL):
                return self._control()
            body = self._body()
            if state.held(urllib.parse.unquote(self.path)):  # keys arrive quoted: dt%3D2026-01-02
                state.released.wait()
            if state.delay_s:
                time.sleep(state.delay_s)
            fate = state.admit(self.command, self.path)
            if fate == "fail":
                return self._reply(503, [("Content-Type", "application/xml"), ("Retry-After", "0")], SLOW_DOWN)
            if any(p in urllib.parse.unquote(self.path) for p in state.denied):
                return self._reply(403, [("Content-Type", "application/xml")], ACCESS_DENIED)
            conn = http.client.HTTPConnection(*state.upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                r = conn.getresponse()
                data = r.read()
                if fate == "lose":  # done by the store, never answered: the client sees the connection drop
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                self._reply(r.status, r.getheaders(), data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int) -> None:
    """The server process: moto's S3 on a free port, the proxy on `port`, until killed."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    moto.start()
    proxy = ThreadingHTTPServer(("127.0.0.1", port), _handler(_State(moto.get_host_and_port())))
    proxy.daemon_threads = True
    print("ready", flush=True)
    proxy.serve_forever()


class S3Server:
    """moto's S3 in a subprocess on 127.0.0.1, behind the counting, fault-injecting proxy."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mtrec.testing.s3", "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self._proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the S3 test server did not start (said {line!r})")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _control(self, what: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(
            f"{self.endpoint}{CONTROL}{what}", data=json.dumps(body or {}).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def counts(self) -> dict[str, int]:
        """Requests by HTTP method since the last `reset_counts`, and `failed`: those injected to fail."""
        return self._control("counts")

    def requests(self) -> list[tuple[float, str, str]]:
        """Every request since the last `reset_counts`: (time.time() on arrival, HTTP method, path
        with its query, as sent: keys quoted), injected failures included."""
        return [tuple(r) for r in self._control("requests")]

    def reset_counts(self) -> None:
        self._control("reset")

    def set_faults(self, rate: float, seed: int = 0, delay_s: float = 0.0, lose: float = 0.0) -> None:
        """From now on (seeded): fail `rate` of the requests before the store sees them (503
        SlowDown), and let the store do `lose` of them but drop the connection instead of
        answering (the client cannot tell whether it happened); delay each by `delay_s`."""
        self._control("faults", {"rate": rate, "seed": seed, "delay_s": delay_s, "lose": lose})

    def hold(self, pattern: str, after: int = 0) -> None:
        """From now on, let `after` requests whose path holds `pattern` through, then hold every
        later one unanswered (counted as `held`) until `release`."""
        self._control("hold", {"pattern": pattern, "after": after})

    def release(self) -> None:
        self._control("release")

    def deny(self, *patterns: str) -> None:
        """Answer every request whose path holds one of `patterns` with 403 AccessDenied (as a
        bucket policy that does not grant these credentials would); none: deny nothing."""
        self._control("deny", {"patterns": list(patterns)})

    def env(self) -> dict[str, str]:
        """The standard AWS environment of a client of this server: credentials, region, endpoint
        (read by botocore, so by s3fs, boto3 and MLflow alike)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def storage_options(self) -> dict[str, str]:
        """s3fs's options for this server (endpoint and keys): `job.storage_options: {s3: ...}`, or
        `s3fs.S3FileSystem(**options)`."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}

    def client(self):
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name`; returns its URL `s3://name`."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    serve(p.parse_args().port)


if __name__ == "__main__":
    main()
