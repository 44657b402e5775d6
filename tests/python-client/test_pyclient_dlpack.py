"""The DLPack deleter is re-entrant (review finding 15): a cyclic GC that
runs while byte_tensor() registers a new tensor, and that collects a cycle
holding the last tensor of an earlier storage, calls the deleter on the
same thread in the middle of the registration.  With a non-reentrant lock
around the registration and the deleter, that deadlocked the thread.  The
case runs in a fresh interpreter with a timeout, so a deadlock fails the
test instead of hanging the suite; the tensors' bytes are compared with the
buffer they view."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import ctypes
    import gc

    import torch
    from weightd import _dlpack

    base = _dlpack.n_live()
    first = ctypes.create_string_buffer(bytes(range(64)), 64)
    second = ctypes.create_string_buffer(bytes(range(100, 164)), 64)

    t = _dlpack.byte_tensor(ctypes.addressof(first), 64, first)
    assert t.numpy().tobytes() == first.raw and _dlpack.n_live() == base + 1
    first_key = set(_dlpack._live)
    # The earlier tensor's last reference is in a cycle only the GC frees.
    cycle = [t]
    cycle.append(cycle)
    del t, cycle

    class GcOnRegister(dict):
        """What an allocation inside the registration does when it crosses
        the GC threshold: collect, here, on this thread."""
        ran = False

        def __setitem__(self, key, value):
            if not GcOnRegister.ran:
                GcOnRegister.ran = True
                gc.collect()
            super().__setitem__(key, value)

    _dlpack._live = GcOnRegister(_dlpack._live)
    u = _dlpack.byte_tensor(ctypes.addressof(second), 64, second)
    assert GcOnRegister.ran
    assert not first_key & set(_dlpack._live), "the earlier tensor's deleter did not run"
    assert _dlpack.n_live() == base + 1
    assert u.numpy().tobytes() == second.raw and u.dtype == torch.uint8
    del u
    assert _dlpack.n_live() == base
    print("ok")
''')


def test_deleter_runs_inside_the_registration_of_another_tensor(wd):
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the DLPack deleter deadlocked: it ran inside byte_tensor() on the same thread, "
                             "which held a non-reentrant lock") from None
    assert r.returncode == 0 and r.stdout == b"ok\n", (r.returncode, r.stdout, r.stderr.decode()[-2000:])
