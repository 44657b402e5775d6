#!/usr/bin/env bash
# The man pages as scdoc wrote them, through mandoc's checker, as TAP:
#   test-man-lint.sh PAGE...
# Any message of level WARNING or above fails, except the empty paragraph
# macros scdoc writes around headings and between blocks (mandoc drops
# them; the rendering is the same).  Skipped without mandoc.
set -uo pipefail

if ! command -v mandoc >/dev/null; then
        echo "1..0 # SKIP mandoc is not installed (Debian package mandoc; scripts/install-deps installs it)"
        exit 0
fi

echo "1..$#"
n=0 failed=0
for page in "$@"; do
        n=$((n + 1))
        out=$(mandoc -Tlint -W warning "$page" 2>&1 |
                grep -v -E 'WARNING: skipping paragraph macro: PP (empty|after (SH|SS))$')
        if [ -z "$out" ]; then
                echo "ok $n - mandoc -Tlint $(basename "$page")"
        else
                echo "not ok $n - mandoc -Tlint $(basename "$page")"
                sed 's/^/# /' <<<"$out"
                failed=1
        fi
done
exit $failed
