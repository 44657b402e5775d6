#!/usr/bin/env python3
"""Count test cases in a meson test log or a JUnit XML report.

Prints "PASSED FAILED SKIPPED [what failed]" on one line for tests/run.
Where $COUNT_RESULTS_DETAILS names a file, each failure's message (the
first lines of the assertion, or the end of a meson test's output) is
appended to it, for the end of the run.
A meson test that speaks TAP counts each of its cases; any other counts as
one.  Exit status 77 is a skip, as meson reports it.
"""
import json
import os
import sys
import xml.etree.ElementTree as ET


DETAIL_LINES = 40


def detail(name, text):
    """Append a failure's text (its first DETAIL_LINES lines) to the details file."""
    out = os.environ.get("COUNT_RESULTS_DETAILS")
    if not out:
        return
    lines = (text or "").strip().splitlines()
    cut = lines[:DETAIL_LINES] + ([f"... ({len(lines) - DETAIL_LINES} more lines)"] if len(lines) > DETAIL_LINES else [])
    with open(out, "a") as f:
        f.write(f"---- {name}\n" + "\n".join(cut) + "\n")


def count_meson(path):
    passed = failed = skipped = 0
    failures = []
    with open(path) as f:
        for line in f:
            t = json.loads(line)
            result = t["result"]
            cases = [l for l in (t.get("stdout") or "").splitlines()
                     if l.startswith("ok ") or l.startswith("not ok ")]
            skips = [l for l in cases if "# SKIP" in l]
            cases = [l for l in cases if "# SKIP" not in l]
            skipped += len(skips)
            if result == "SKIP":
                skipped += max(1, len(cases))
            elif cases and result in ("OK", "FAIL", "ERROR"):
                bad = [l for l in cases if l.startswith("not ok ")]
                passed += len(cases) - len(bad)
                failed += len(bad)
                if result != "OK" and not bad:
                    failed += 1  # crashed outside any case
                if bad or result != "OK":
                    failures.append(t["name"])
                    detail(t["name"], "\n".join(bad + (t.get("stderr") or "").splitlines()[-DETAIL_LINES:]))
            elif result in ("OK", "EXPECTEDFAIL"):
                passed += 1
            else:
                failed += 1
                failures.append(t["name"])
                detail(t["name"], "\n".join(((t.get("stdout") or "") + (t.get("stderr") or "")).splitlines()[-DETAIL_LINES:]))
    return passed, failed, skipped, failures


def count_junit(path):
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            failed += 1
            failures.append(case.get("name"))
            # pytest: the assertion's message, then where it was raised.
            text = (bad.text or "").splitlines()
            detail(f"{case.get('classname')}::{case.get('name')}",
                   "\n".join((bad.get("message") or "").splitlines()[:DETAIL_LINES // 2] + text[-DETAIL_LINES // 2:]))
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, failures


def main():
    kind, path = sys.argv[1], sys.argv[2]
    p, f, s, names = count_meson(path) if kind == "meson" else count_junit(path)
    print(p, f, s, " ".join(names))


if __name__ == "__main__":
    main()
