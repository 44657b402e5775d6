"""Many resident entries: Status keeps its figures as entries change instead
of counting them, and Evict, Pin and a resident Load find an entry by its
key.  Whatever happened to the entries (loads, leases, pins, evictions, a
file replaced under a lease, an eviction by the budget), Status must equal
what List shows, summed here entry by entry, and every model must still be
found."""
import json
import os
import struct

import wdwire
from harness import wait_until

N = 600  # past several doublings of the cache's hash tables (64 buckets at first)


def tiny(i):
    """A safetensors file of one U8 tensor, 1 + i % 7 bytes, its bytes from i."""
    n = 1 + i % 7
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes((i + k) % 256 for k in range(n))


def sums_from_list(conn):
    env = conn.request(wdwire.LIST)
    assert env.code == "OK", env.message
    entries = [{"model": e.str(1), "tier": e.str(3), "state": e.str(4), "bytes": e.int(5), "leases": e.int(6),
                "pinned": bool(e.int(7))} for e in env.reply.msg(12).msgs(1)]
    host = [e for e in entries if e["tier"] == "host"]
    return {
        "host_used_bytes": sum(e["bytes"] for e in host),
        "host_evictable_bytes": sum(e["bytes"] for e in host
                                    if e["state"] == "resident" and e["leases"] == 0 and not e["pinned"]),
        "entries": sum(1 for e in host if e["state"] != "detached"),
        "leases": sum(e["leases"] for e in entries),
    }, entries


def check(conn):
    want, entries = sums_from_list(conn)
    st = conn.status()
    assert {k: st[k] for k in want} == want
    return st, entries


def load(conn, model):
    env = conn.request(wdwire.LOAD, wdwire.load_body(str(model)))
    assert env.code == "OK", env.message
    for fd in conn.take_fds(len(conn.fds)):
        os.close(fd)
    return env.reply.msg(11)


def test_status_equals_the_sum_of_list(start_daemon, tmp_root):
    paths = []
    for i in range(N):
        p = tmp_root / f"d{i // 100}" / f"m{i:04d}.safetensors"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(tiny(i))
        paths.append(p)
    # Room for all of them: the budget evicts only at the end.
    d = start_daemon(roots=[tmp_root], host_budget="64M")

    with d.raw(timeout=60) as conn, d.raw(timeout=60) as holder:
        window = {}
        for i, p in enumerate(paths):
            window[conn.send(wdwire.PREFETCH, wdwire.load_body(str(p)))] = p
            while len(window) >= 32 or (i == N - 1 and window):
                env = conn.recv()
                if env.has(wdwire.REPLY):
                    assert env.code == "OK", f"{window[env.id]}: {env.message}"
                    del window[env.id]
        st, entries = check(conn)
        assert st["entries"] == N and st["host_evictable_bytes"] == st["host_used_bytes"] > 0

        # Leases (held by another connection), pins, evictions, and refusals.
        leases = {}
        for i in range(0, N, 7):
            leases[i] = load(holder, paths[i]).int(1)
        for i in range(3, N, 11):
            env = conn.request(wdwire.PIN, wdwire.ref_body(str(paths[i])))
            assert env.code == "OK", env.message
        for i in range(5, N, 13):
            env = conn.request(wdwire.EVICT, wdwire.ref_body(str(paths[i])))
            busy = i % 7 == 0 or i % 11 == 3
            assert env.code == ("BUSY" if busy else "OK"), (i, env.code, env.message)
            if i % 7 == 0:
                assert "has 1 lease" in env.message
            elif busy:
                assert "is pinned" in env.message
        check(conn)

        # A resident Load finds every model still resident, and only those.
        evicted = {i for i in range(5, N, 13) if not (i % 7 == 0 or i % 11 == 3)}
        for i in range(0, N, 3):
            result = load(conn, paths[i])
            assert bool(result.int(7)) == (i not in evicted), i  # was_resident
            env = conn.request(wdwire.RELEASE, wdwire.f_varint(1, result.int(1)))
            assert env.code == "OK", env.message
        check(conn)

        # A file replaced under a lease: the old entry is detached (still
        # charged, still listed) and the new one loads beside it.
        old = paths[0]
        new_bytes = tiny(N + 1)
        tmp = old.with_name("replacement.tmp")
        tmp.write_bytes(new_bytes)
        os.replace(tmp, old)
        result = load(conn, old)
        assert not result.int(7)
        conn.request(wdwire.RELEASE, wdwire.f_varint(1, result.int(1)))
        st, entries = check(conn)
        assert [e["state"] for e in entries if e["model"] == str(old)].count("detached") == 1

        # Unpin everything, end every lease, then a budget that holds
        # about half of them: the budget evicts the least recently used.
        for i in range(3, N, 11):
            env = conn.request(wdwire.UNPIN, wdwire.ref_body(str(paths[i])))
            assert env.code in ("OK", "NOT_FOUND"), env.message
        for lease in leases.values():
            env = holder.request(wdwire.RELEASE, wdwire.f_varint(1, lease))
            assert env.code == "OK", env.message
        st, _ = check(conn)
        assert st["leases"] == 0 and st["host_evictable_bytes"] == st["host_used_bytes"]
        before = st["evictions"]
        half = st["host_used_bytes"] // 2
        d.write_config(host_budget=str(half))
        d.hup()
        wait_until(lambda: conn.status()["host_budget_bytes"] == half, what="the reloaded budget")
        # Loads of the evicted models now evict the least recently used.
        for i in sorted(evicted):
            result = load(conn, paths[i])
            env = conn.request(wdwire.RELEASE, wdwire.f_varint(1, result.int(1)))
            assert env.code == "OK", env.message
        st, _ = check(conn)
        assert st["evictions"] > before and st["host_used_bytes"] <= half
