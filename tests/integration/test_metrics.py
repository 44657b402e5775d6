"""[metrics]: the Prometheus endpoint.

promtool (Debian's prometheus package) lints what /metrics serves; a real
Prometheus server scrapes the daemon and its query API must give the values
the daemon's Status gives; hostile HTTP clients (many idle connections, a
slow request, a huge one, a body) must not stall the daemon's loop or keep
the endpoint from serving once they are gone."""
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from harness import REPO, make_dir, run, wait_until

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def metrics_port(d):
    log = d.wait_log("Metrics on http://")
    return int(re.search(r"Metrics on http://127\.0\.0\.1:(\d+)/metrics", log).group(1))


def get(port, path="/metrics", timeout=5):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def samples(text):
    """{'name{labels}': value} of the text format (labels as written)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def scrape_when(port, cond, timeout=10.0, what="metrics"):
    """The samples once cond(samples) holds (the daemon renders every second)."""
    return wait_until(lambda: (s := samples(get(port)[2])) and cond(s) and s, timeout, 0.1, what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_serves_text_format_that_promtool_accepts(start_daemon, testdata):
    if not PROMTOOL:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    d = start_daemon(listen="127.0.0.1:0")
    port = metrics_port(d)
    plain = testdata / "models" / "plain"
    d.hash(plain)           # a load: a miss, a histogram sample
    d.hash(plain)           # resident: a hit
    holder = d.hold(testdata / "models" / "sharded")
    s = scrape_when(port, lambda s: s.get("weightd_leases") == 1, what="the lease in the metrics")
    status, ctype, text = get(port)
    assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        f"promtool: {r.stdout.decode()} {r.stderr.decode()}\n{text}"

    assert s['weightd_cache_hits_total{tier="host"}'] == 1
    assert s['weightd_cache_misses_total{tier="host"}'] == 2
    assert s['weightd_load_duration_seconds_count{tier="host",outcome="ok"}'] == 2
    assert s['weightd_load_duration_seconds_bucket{tier="host",outcome="ok",le="+Inf"}'] == 2
    assert s['weightd_cache_entries{tier="host",state="resident"}'] == 2
    assert s["weightd_storage_reads_total"] >= 2
    assert s['weightd_build_info{version="%s",cuda="%s",nccl="%s",cluster="%s",systemd="%s"}'
             % tuple(re.search(r'weightd_build_info\{version="([^"]*)",cuda="(\w+)",nccl="(\w+)",cluster="(\w+)",'
                               r'systemd="(\w+)"\}', text).groups())] == 1
    assert abs(s["process_start_time_seconds"] - (time.time() - d.status()["uptime_ms"] / 1000)) < 5
    assert s["process_resident_memory_bytes"] > 0 and s["process_cpu_seconds_total"] >= 0
    assert 0 < s["process_open_fds"] <= s["process_max_fds"]

    # Only /metrics, only GET and HEAD.
    with pytest.raises(urllib.error.HTTPError) as e:
        get(port, "/")
    assert e.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x" * 100, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405
    head = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as r:
        assert r.status == 200 and r.read() == b""
    holder.kill()


def test_off_and_defaults(start_daemon, bins, tmp_path):
    d = start_daemon()  # the harness turns it off: listen =
    assert "Metrics on" not in d.log()
    conf = tmp_path / "weightd.conf"
    conf.write_text("")
    r = run([bins.weightd, "--check-config", "--config", conf])
    assert r.returncode == 0 and "\n[metrics]\nlisten = 127.0.0.1:9471\n" in r.stdout.decode()


def test_a_port_in_use_leaves_the_daemon_serving(start_daemon, testdata):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = start_daemon(listen=f"127.0.0.1:{port}")
        d.wait_log(f"[metrics] listen = 127.0.0.1:{port}: cannot bind 127.0.0.1:{port}: Address already in use; "
                   "serving without metrics.")
        d.hash(testdata / "models" / "plain")


def test_sighup_moves_the_endpoint(start_daemon):
    d = start_daemon(listen="127.0.0.1:0")
    old = metrics_port(d)
    assert get(old)[0] == 200
    new = free_port()
    start = len(d.log())
    d.write_config(listen=f"127.0.0.1:{new}")
    d.hup()
    d.wait_log(f"Metrics on http://127.0.0.1:{new}/metrics", timeout=15, start=start)
    assert get(new)[0] == 200
    with pytest.raises(OSError):
        get(old, timeout=2)
    start = len(d.log())
    d.write_config(listen="")
    d.hup()
    d.wait_log("Reloaded the configuration", timeout=15, start=start)
    with pytest.raises(OSError):
        get(new, timeout=2)


def promql(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_what_status_says(start_daemon, testdata, workdir):
    if not PROMETHEUS:
        pytest.skip("the Prometheus server is not installed (Debian: prometheus)")
    d = start_daemon(listen="127.0.0.1:0", host_budget="64M")
    port = metrics_port(d)
    # Something of every figure: two entries, one leased, bytes read.
    d.hash(testdata / "models" / "plain")
    holder = d.hold(testdata / "models" / "sharded")

    pdir = make_dir(workdir, "prometheus-")
    web = free_port()
    (pdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: weightd\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    log = open(pdir / "prometheus.log", "wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={pdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={pdir / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    d.children.append(prom)
    try:
        def ready():
            try:
                return get(web, "/-/ready", timeout=1)[0] == 200
            except OSError:
                return False
        wait_until(ready, 60, 0.2, "Prometheus to be ready")

        # Status counts its own connection; the scrapes see the holder's.
        def same():
            st = d.status()
            want = {
                'weightd_memory_budget_bytes{tier="host"}': st["host_budget_bytes"],
                'weightd_memory_used_bytes{tier="host"}': st["host_used_bytes"],
                'weightd_memory_evictable_bytes{tier="host"}': st["host_evictable_bytes"],
                "weightd_storage_read_bytes_total": st["storage_read_bytes"],
                "weightd_leases": st["leases"],
                "weightd_connections": st["connections"] - 1,
                'sum(weightd_cache_entries{tier="host",state=~"loading|resident"})': st["entries"],
                'weightd_loads_in_progress{tier="host"}': st["loading"],
                'weightd_cache_evictions_total{tier="host"}': st["evictions"],
            }
            got = {q: promql(web, q) for q in want}
            return got == want and got
        got = wait_until(same, 30, 0.5, "Prometheus's values to equal Status")
        assert got["weightd_leases"] == 1 and got['weightd_memory_used_bytes{tier="host"}'] > 0
        assert got["weightd_storage_read_bytes_total"] > 0
        assert promql(web, 'up{job="weightd"}') == 1

        # Every query of the Grafana dashboard in docs/ runs, and those of
        # gauges find samples (rates may need more scrapes; no cluster here).
        dash = json.loads((REPO / "docs" / "grafana-weightd.json").read_text())
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                q = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
                url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": q})
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.load(r)
                assert body["status"] == "success", (panel["title"], q, body)
                if "rate(" not in q and "cluster" not in q:
                    assert body["data"]["result"], (panel["title"], q)
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()
        holder.kill()


def test_hostile_clients_do_not_stall_the_loop(start_daemon, testdata):
    d = start_daemon(listen="127.0.0.1:0")
    port = metrics_port(d)
    socks = []
    try:
        # Many idle connections: past the per-address limit the endpoint
        # closes them at once.
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
        # A slow request, one header byte at a time; a huge request; a body
        # nobody asked for.
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        huge = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks += [slow, huge]
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        try:
            huge.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20) + b"\r\n\r\n")
        except OSError:
            pass  # closed under us: that is the point

        # The loop answers as ever, and serves loads, meanwhile.
        for i in range(20):
            t = time.monotonic()
            st = d.status()
            assert time.monotonic() - t < 2.0, "Status took over 2 s with hostile HTTP clients"
            try:
                slow.send(b"X"[:1])
            except OSError:
                pass
            time.sleep(0.05)
        assert st["connections"] == 1
        d.hash(testdata / "models" / "plain")

        # The huge request was refused, not buffered.
        huge.settimeout(5)
        try:
            answer = huge.recv(4096)
        except OSError:
            answer = b""
        assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d", answer), answer[:200]
        # Connections past the limits were closed by the endpoint.
        closed = 0
        for s in socks[:100]:
            s.settimeout(0.05)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
            except OSError:
                closed += 1
        assert closed >= 100 - 16, f"only {closed} of 100 idle connections were refused"
    finally:
        for s in socks:
            s.close()
    # Once they are gone (and the endpoint noticed) it serves again.
    def serves():
        try:
            return get(port)[0] == 200
        except OSError:
            return False
    wait_until(serves, 15, 0.2, "the endpoint to serve again")
