"""The log line of a finished load says where its time went.

After "loaded MODEL: N MiB in T s (G GB/s)" (which scripts parse as it is)
come the stages of the load: resolve (the request's catalog work, before the
job started), queue (until the reader issued the first read), read (first
read issued to last read completed) and seal (until the job completed).
"""
import re
import time

STAGE = r"([0-9]+\.[0-9]+ m?s)"
LOADED = re.compile(r"loaded (?P<what>.*): (?P<mib>[0-9]+\.[0-9]) MiB in (?P<total>[0-9]+\.[0-9]{2}) s "
                    r"\([0-9]+\.[0-9]{2} GB/s\); "
                    rf"resolve {STAGE}, queue {STAGE}, read {STAGE}, seal {STAGE}"
                    # where slabs went on small pages, "; 2 of 2 files on small pages (...)"
                    r"(?:; [0-9]+ of [0-9]+ files on small pages \(.*\))?$", re.M)

# What printing can lose: half of its last digit, 5 ms for the total and
# at most that for each of the four stages.
ROUNDING = 0.005 + 4 * 0.005


def seconds(text):
    value, unit = text.split()
    return float(value) / 1000 if unit == "ms" else float(value)


def test_cold_prefetch_logs_its_stages(start_daemon, make_model):
    model = make_model("64M", 2)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    d = start_daemon(roots=[model.parent], direct_io="on")

    t0 = time.monotonic()
    (result,) = d.ctl_json("prefetch", model)
    elapsed = time.monotonic() - t0
    assert not result["was_resident"]

    log = d.wait_log(f"loaded {model}")
    lines = [m for m in LOADED.finditer(log) if m["what"] == str(model)]
    assert len(lines) == 1, log
    m = lines[0]
    assert abs(float(m["mib"]) - size / (1 << 20)) <= 0.05, m[0]

    total = float(m["total"])
    resolve, queue, read, seal = (seconds(s) for s in m.groups()[3:])
    assert min(resolve, queue, read, seal) >= 0, m[0]
    assert read > 0, f"64 MiB read in no time: {m[0]}"
    # The stages after the resolve follow one another within the job's
    # total; the resolve came before it, and the whole request within
    # the client's call.
    assert queue + read + seal <= total + ROUNDING, m[0]
    assert resolve + total <= elapsed + ROUNDING, (m[0], elapsed)

    # A warm prefetch loads nothing: no second line.
    (again,) = d.ctl_json("prefetch", model)
    assert again["was_resident"]
    assert len([m for m in LOADED.finditer(d.log()) if m["what"] == str(model)]) == 1
