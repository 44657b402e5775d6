"""Logs under systemd: when stderr is the stream $JOURNAL_STREAM names, every
line goes to the journal in its native protocol with the fields MODEL=,
COMPONENT=, TIER=, CODE=, PEER_UID=, BYTES= and DURATION_USEC= where they
apply; otherwise plain lines on stderr.

The journal here is a datagram socket of the test's own, bind-mounted over
/run/systemd/journal/socket in a mount namespace of the daemon's (libsystemd
has that path built in): the test reads back what the daemon sent.  Needs
root and unshare(1)."""
import os
import shutil
import socket
import struct
import threading

import pytest

from harness import BUILD, Daemon, wait_until

JOURNAL_IN_NAMESPACE = (
    "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && touch /run/systemd/journal/socket && "
    'mount --bind "$0" /run/systemd/journal/socket && exec "$@"')


def parse_entry(data):
    """One datagram of the native protocol: {field: value} (the last of a
    field wins; ours are never repeated)."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:  # KEY\n<le64 size><value>\n
            k = line
            (n,) = struct.unpack_from("<Q", data, nl + 1)
            v = data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        out[k.decode()] = v.decode(errors="replace")
    return out


class Journal:
    """A datagram socket that collects entries on a thread."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.entries = []
        self.stopping = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.stopping:
            try:
                data, _anc, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            except socket.timeout:
                continue
            except OSError:
                return
            if data:
                self.entries.append(parse_entry(data))

    def find(self, **fields):
        return [e for e in self.entries if all(e.get(k) == v for k, v in fields.items())]

    def wait(self, text, timeout=10.0):
        return wait_until(lambda: [e for e in self.entries if text in e.get("MESSAGE", "")], timeout,
                          what=f"a journal entry with {text!r}")

    def close(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


def journal_daemon(bins, workdir, testdata, journal, **config):
    """A daemon whose stderr is 'the journal stream' and whose journal socket is journal's."""
    d = Daemon(bins, workdir, [testdata / "models"], config)
    d.log_path.touch()
    st = os.stat(d.log_path)
    d.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    if journal:
        d.wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", JOURNAL_IN_NAMESPACE, journal.path]
    return d


def built_with_libsystemd():
    try:
        return "#define HAVE_SYSTEMD 1" in (BUILD / "config.h").read_text()
    except OSError:
        return False


@pytest.fixture
def journal(workdir):
    if not built_with_libsystemd():
        pytest.skip(f"{BUILD} is built without libsystemd (-Dsystemd=disabled): no journal entries")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to put a test socket at /run/systemd/journal/socket")
    j = Journal(workdir / f"journal-{os.getpid()}-{threading.get_ident()}.sock")
    yield j
    j.close()
    os.unlink(j.path)


def test_lines_go_to_the_journal_with_fields(bins, workdir, testdata, journal):
    d = journal_daemon(bins, workdir, testdata, journal)
    try:
        d.start()
        plain = testdata / "models" / "plain"
        d.hash(plain)
        e = journal.wait(f"loaded {plain}")[0]
        assert e["MODEL"] == str(plain) and e["COMPONENT"] == "" and e["TIER"] == "host"
        assert e["PRIORITY"] == "6" and e["SYSLOG_IDENTIFIER"] == "weightd"
        size = sum(f.stat().st_size for f in plain.glob("*.safetensors"))
        assert int(e["BYTES"]) == size
        assert int(e["DURATION_USEC"]) > 0

        # A request outside the roots: refused, with the error's name and who asked.
        r = d.ctl("tensors", str(workdir))
        assert r.returncode == 1
        e = journal.wait("refused")[0]
        assert e["PEER_UID"] == "0" and e["CODE"] == "PERMISSION_DENIED" and e["MODEL"] == str(workdir), e

        # A peer that breaks the protocol: a warning with its uid.
        conn = d.raw()
        conn.sock.sendall(struct.pack("<I", 3) + b"\xff\xff\xff")
        e = journal.wait("undecodable frame")[0]
        assert e["PEER_UID"] == "0" and e["PRIORITY"] == "4"
        conn.sock.close()

        # Every line went to the journal, none to stderr.
        assert journal.find(MESSAGE=f"Listening on {d.socket}")
        assert d.log() == "", d.log()
    finally:
        d.finish()


def test_without_a_journal_socket_lines_keep_their_priority_on_stderr(bins, workdir, testdata):
    if os.path.exists("/run/systemd/journal/socket"):
        pytest.skip("a journal runs here: the daemon's lines would go to it")
    d = journal_daemon(bins, workdir, testdata, None)
    try:
        d.start()
        d.status()  # the loop runs: SIGTERM stops it cleanly
        d.wait_log(f"<6>Listening on {d.socket}")
    finally:
        d.finish()


def test_redirected_stderr_gets_plain_lines(bins, workdir, testdata, journal):
    d = journal_daemon(bins, workdir, testdata, journal)
    d.env = {"JOURNAL_STREAM": "1:2"}  # someone else's stream: stderr was redirected
    try:
        d.start()
        d.status()
        d.wait_log(f"weightd: Listening on {d.socket}")
        assert not journal.entries
    finally:
        d.finish()
