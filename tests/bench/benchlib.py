"""What the storage benchmarks share: sizes, the page cache, a model's files,
fio job files and runs, the hugetlb pool, and a description of the machine.

Imported by tests/bench/core-vs-fio and tests/bench/compare; only the Python
standard library is used.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROG = os.path.basename(sys.argv[0])
ALIGN = 4096
HUGE_PAGE = 2 << 20  # the slabs' hugetlb page size (MFD_HUGE_2MB)


def die(msg, code=2):
    print(f"{PROG}: {msg}", file=sys.stderr)
    sys.exit(code)


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = s.strip().upper()
    for suffix in ("IB", "B"):
        if len(t) > len(suffix) and t.endswith(suffix) and t[-len(suffix) - 1] in units:
            t = t[:-len(suffix)]
            break
    mult = units.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if t[-1:] in units else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {s}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {s}")
    return n


def fmt_size(n):
    for unit, v in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % v == 0:
            return f"{n // v}{unit}"
    return str(n)


def page_cache_bytes():
    """(Cached - Shmem) from /proc/meminfo, in bytes: the page cache without shared memory."""
    vals = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("Cached", "Shmem"):
                vals[k] = int(rest.split()[0]) * 1024
    return vals["Cached"] - vals["Shmem"]


def drop_caches(settle=0.0):
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    if settle > 0:
        time.sleep(settle)


def model_files(model):
    """The files wd-load reads for MODEL, as (path, size), in a stable order."""
    if os.path.isfile(model):
        paths = [model]
    else:
        idx = None
        for name in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
            if os.path.isfile(os.path.join(model, name)):
                idx = os.path.join(model, name)
                break
        if idx:
            with open(idx) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            paths = [os.path.join(model, s) for s in shards]
        elif os.path.isfile(os.path.join(model, "model.safetensors")):
            paths = [os.path.join(model, "model.safetensors")]
        else:
            # A diffusers pipeline or similar: every safetensors file below.
            paths = []
            for root, dirs, files in os.walk(model):
                dirs.sort()
                paths += [os.path.join(root, n) for n in sorted(files) if n.endswith(".safetensors")]
    if not paths:
        die(f"{model}: no safetensors files found")
    return [(p, os.stat(p).st_size) for p in paths]


def fio_escape(path):
    return path.replace("\\", "\\\\").replace(":", "\\:")


def fio_jobfile(files, chunk, qd, buffered, hugetlb=False):
    """A fio job file that reads every byte of every file once, and the bytes it reads.

    hugetlb: fio's buffers on 2 MiB hugetlb pages (iomem=shmhuge, SysV shared
    memory from the same pool as the slabs), the same memory the hugetlb
    configuration of weightd reads into."""
    g = ["[global]", "rw=read", "thread", "invalidate=1"]
    if hugetlb:
        g += ["iomem=shmhuge", "hugepage-size=2m"]
    if buffered:
        g += ["ioengine=psync", "direct=0"]
    else:
        g += ["ioengine=io_uring", "direct=1"]
    lines = g + [""]
    expected = 0
    main = [p for p, s in files if s >= chunk]
    if main:
        lines += ["[main]", "filename=" + ":".join(fio_escape(p) for p in main),
                  "file_service_type=sequential", f"bs={chunk}", f"iodepth={qd}", ""]
        expected += sum(s // chunk * chunk for p, s in files if s >= chunk)
    for i, (p, s) in enumerate(files):
        start = s // chunk * chunk
        tail = s - start
        if not tail:
            continue
        aligned = tail // ALIGN * ALIGN if not buffered else tail
        if aligned:
            lines += [f"[tail{i}]", "stonewall", f"filename={fio_escape(p)}", f"offset={start}",
                      f"size={aligned}", f"bs={aligned}", "iodepth=1", ""]
        rest = tail - aligned
        if rest:
            lines += [f"[rest{i}]", "stonewall", f"filename={fio_escape(p)}", "ioengine=psync", "direct=0",
                      f"offset={start + aligned}", f"size={rest}", f"bs={rest}", "iodepth=1", ""]
        expected += tail
    return "\n".join(lines), expected


def run_fio(fio, jobfile, expected):
    # Growth around the whole fio process: it includes loading fio and its
    # libraries (tens of MiB after the cache drop), so it is only kept in --json.
    pc0 = page_cache_bytes()
    p = subprocess.run([fio, "--output-format=json", jobfile], capture_output=True, text=True)
    pc1 = page_cache_bytes()
    if p.returncode != 0:
        die(f"fio failed (exit {p.returncode}):\n{p.stderr.strip()}")
    out = p.stdout
    # fio may print notes before the JSON object.
    out = out[out.index("{"):]
    j = json.loads(out)
    nbytes, ms = 0, 0
    for job in j["jobs"]:
        if job.get("error"):
            die(f"fio job {job['jobname']} failed: error {job['error']}")
        nbytes += job["read"]["io_bytes"]
        ms += job["read"]["runtime"]
    if nbytes != expected:
        die(f"fio read {nbytes} bytes, expected {expected}: the job file does not cover the files")
    secs = ms / 1000.0
    return {"bytes": nbytes, "seconds": secs, "gbps": nbytes / secs / 1e9 if secs else 0.0,
            "pagecache_growth_bytes": pc1 - pc0}


def proc_read_bytes(pid="self"):
    """What process PID has read from storage (read_bytes of /proc/PID/io); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def meminfo():
    vals = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            vals[k] = int(rest.split()[0])
    return vals


class HugePool:
    """The 2 MiB hugetlb pool: reserve enough for the model, give it back at exit."""

    SYSFS = "/sys/kernel/mm/hugepages/hugepages-2048kB"

    def __init__(self):
        # vm.nr_hugepages and HugePages_* are the default size's pool; the
        # slabs ask for 2 MiB pages explicitly, which is the same pool on
        # x86-64 and most arm64, and otherwise has its own sysfs directory.
        self.proc = meminfo().get("Hugepagesize") == HUGE_PAGE >> 10
        self.nr_path = "/proc/sys/vm/nr_hugepages" if self.proc else os.path.join(self.SYSFS, "nr_hugepages")
        self.original = None  # nr_hugepages before we changed it; None: untouched
        self.added = 0  # pages we added: restore() takes back just those, whatever others did meanwhile

    def available(self):
        return os.path.exists(self.nr_path)

    def counters(self):
        """(total, free, reserved) pages of the pool."""
        if self.proc:
            m = meminfo()
            return m["HugePages_Total"], m["HugePages_Free"], m["HugePages_Rsvd"]
        vals = []
        for name in ("nr_hugepages", "free_hugepages", "resv_hugepages"):
            with open(os.path.join(self.SYSFS, name)) as f:
                vals.append(int(f.read()))
        return tuple(vals)

    def nr(self):
        with open(self.nr_path) as f:
            return int(f.read())

    def set_nr(self, n):
        with open(self.nr_path, "w") as f:
            f.write(f"{n}\n")

    def unused(self):
        total, free, rsvd = self.counters()
        return free - rsvd

    def reserve(self, want):
        """Make at least WANT pages free and unreserved; returns the pages that are."""
        if self.unused() >= want:
            return self.unused()
        if self.original is None:
            self.original = self.nr()
        for attempt in range(2):
            if attempt:
                # Short: free the page cache and compact memory, then try once more.
                drop_caches()
                try:
                    with open("/proc/sys/vm/compact_memory", "w") as f:
                        f.write("1\n")
                except OSError:
                    pass
            before = self.nr()
            self.set_nr(before + want - self.unused())
            self.added += max(self.nr() - before, 0)
            if self.unused() >= want:
                break
        return self.unused()

    def restore(self):
        if self.original is None:
            return
        # Relative: other programs (a weightd with its own pool, another
        # benchmark) may have changed the pool meanwhile, and writing back
        # the absolute value we found would take their pages too.
        try:
            before = self.nr()
            self.set_nr(max(before - self.added, 0))
            now = self.nr()
            if now != self.original:
                print(f"{PROG}: note: {self.nr_path} is {now} after giving back our {self.added} pages; it was "
                      f"{self.original} before (others changed it meanwhile)", file=sys.stderr)
        except OSError as e:
            print(f"{PROG}: warning: could not give back {self.added} pages of {self.nr_path}: {e}", file=sys.stderr)
        self.original = None
        self.added = 0


def hugetlb_pages_needed(files):
    """2 MiB pages for the model's slabs: each file's size rounded up to 2 MiB."""
    return sum((max(s, 1) + HUGE_PAGE - 1) // HUGE_PAGE for _, s in files)


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine(fio):
    info = {"kernel": platform.release(), "cpus": os.cpu_count()}
    try:
        info["mem_gib"] = round(meminfo()["MemTotal"] / (1 << 20), 1)
    except (OSError, KeyError):
        pass
    info["shmem_thp"] = read_text("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    try:
        info["fio"] = subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def median(xs):
    return statistics.median(xs) if xs else float("nan")
