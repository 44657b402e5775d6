#!/usr/bin/env python3
"""Count test cases in a meson test log or a JUnit XML report.

Prints "PASSED FAILED SKIPPED [what failed]" on one line for tests/run.
A meson test that speaks TAP counts each of its cases; any other counts as
one.  Exit status 77 is a skip, as meson reports it.
"""
import json
import sys
import xml.etree.ElementTree as ET


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
            elif result in ("OK", "EXPECTEDFAIL"):
                passed += 1
            else:
                failed += 1
                failures.append(t["name"])
    return passed, failed, skipped, failures


def count_junit(path):
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            failures.append(case.get("name"))
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
