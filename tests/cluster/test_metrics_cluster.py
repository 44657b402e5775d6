"""The cluster in /metrics: each node's name and generation, its view of the
others (one state gauge set to 1), the bytes sent to and received from each,
and the storage the cluster saved, equal to what `weightctl cluster` says."""
import shutil
import subprocess

from harness import wait_until


def scrape_text(node):
    """node's /metrics, fetched inside its namespace."""
    r = subprocess.run(node.cluster.net.exec_argv(node.name) +
                       ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9471/metrics"],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def scrape(node):
    """{'name{labels}': value} of node's /metrics."""
    out = {}
    for line in scrape_text(node).splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_show_every_node_and_its_bytes(cluster, model):
    for n in "abc":
        cluster.add(n, config={"listen": "127.0.0.1:9471"})
    cluster.start()
    r = cluster.prefetch("a", model.path)
    assert r.returncode == 0, r.stderr.decode()

    for node in cluster:
        def same():
            view = node.cluster_view()
            s = scrape(node)
            for n in view["nodes"]:
                name = n["name"]
                if s.get(f'weightd_cluster_node_state{{node="{name}",state="{n["state"]}"}}') != 1:
                    return False
                if sum(v for k, v in s.items() if k.startswith(f'weightd_cluster_node_state{{node="{name}",')) != 1:
                    return False
                if s.get(f'weightd_cluster_node_sent_bytes_total{{node="{name}"}}') != n.get("sent_bytes", 0):
                    return False
                if s.get(f'weightd_cluster_node_received_bytes_total{{node="{name}"}}') != n.get("received_bytes", 0):
                    return False
            if s.get(f'weightd_cluster_info{{node="{view["node"]}",generation="{view["generation"]}"}}') != 1:
                return False
            saved = view.get("storage_saved_bytes", 0)
            return s.get("weightd_cluster_storage_saved_bytes_total") == saved and (view, s)
        view, s = wait_until(same, 15, 0.5, f"node {node.name}'s metrics to equal its cluster view")
        states = {n["name"]: n["state"] for n in view["nodes"]}
        assert states == {**{m: "up" for m in "abc"}, node.name: "self"}, states
        # Every byte a node did not read came from the others.
        received = sum(v for k, v in s.items() if k.startswith("weightd_cluster_node_received_bytes_total"))
        assert received > 0 and s["weightd_storage_read_bytes_total"] + received >= model.size

    promtool = shutil.which("promtool")
    if promtool:
        text = scrape_text(cluster["a"])
        r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout.decode() + r.stderr.decode()
