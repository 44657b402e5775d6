#!/usr/bin/env python3
"""The man pages against what they describe, as TAP.

  test-man-in-step.py WEIGHTD WEIGHTCTL WEIGHTD_CONF CLIENT_H PAGE.scd...

Checks, each in both directions (nothing missing, nothing stale):
  - weightd --help's options and the OPTIONS of weightd.8.scd;
  - weightctl --help's options and commands and the OPTIONS and COMMANDS of
    weightctl.1.scd;
  - the [section] keys of conf/weightd.conf and the KEYS of
    weightd.conf.5.scd, and each key's default;
  - the functions declared in weightd/client.h and those that
    libweightd-client.3.scd names.
A failure names each option, command, key or function and the file to fix.
"""
import os
import re
import subprocess
import sys

OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b")


def sections(scd):
    """The scdoc page as {'NAME': [lines], ...} by its '# ' headings."""
    out, cur = {}, None
    for line in scd.splitlines():
        if line.startswith("# "):
            cur = line[2:].strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(line)
    return out


def unescape(s):
    return s.replace("\\", "")


def page_options(lines):
    """Options of the definition terms of an OPTIONS section: unindented
    lines that start with a bold option."""
    opts = set()
    for line in lines:
        if line.startswith("*-"):
            opts.update(OPTION.findall(unescape(line)))
    return opts


def help_text(program):
    r = subprocess.run([program, "--help"], capture_output=True, text=True,
                       env=dict(os.environ, WEIGHTD_SOCKET="/run/weightd/weightd.sock"))
    if r.returncode != 0:
        raise RuntimeError(f"{program} --help exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def help_options(text):
    """Options of a --help text's option table: each entry's term, the text
    before the two blanks that start its description."""
    opts = set()
    for line in text.splitlines():
        m = re.match(r"^ {2,6}(-\S.*?)(?: {2,}|$)", line)
        if m:
            opts.update(OPTION.findall(m.group(1)))
    return opts


def help_commands(text):
    cmds, inside = set(), False
    for line in text.splitlines():
        if line.strip() == "Commands:":
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            m = re.match(r"^  ([a-z][a-z-]*)\b", line)
            if m:
                cmds.add(m.group(1))
    return cmds


def page_commands(lines):
    cmds = set()
    for line in lines:
        if line.startswith("## "):
            for part in line[3:].split(", "):
                words = part.split()
                if words:
                    cmds.add(words[0])
    return cmds


def conf_keys(text):
    """{"[section] key": default} of the shipped file's (commented) keys."""
    keys, section = {}, None
    for line in text.splitlines():
        m = re.match(r"^\[([a-z_]+)\]\s*$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#?([a-z_]+) =(.*)$", line)
        if m and section:
            keys[f"[{section}] {m.group(1)}"] = m.group(2).strip()
    return keys


def page_keys(lines):
    """{"[section] key": default} of the KEYS section's terms: *key* = _default_
    or *key* = (empty), several per line separated by commas."""
    keys, section = {}, None
    for line in lines:
        m = re.match(r"^## \[([a-z_]+)\]", line)
        if m:
            section = m.group(1)
            continue
        if line.startswith("*") and section:
            for k, v in re.findall(r"\*([a-z\\_]+)\* = (_.*?_|\(empty\))(?:,|$)", line):
                keys[f"[{section}] {unescape(k)}"] = "" if v == "(empty)" else unescape(v[1:-1])
    return keys


def header_functions(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return set(re.findall(r"^[a-z][^;{}#(]*?\b(wd_[a-z0-9_]+)\s*\(", text, flags=re.M))


def page_functions(text):
    return set(re.findall(r"\b(wd_[a-z0-9_]+)\*?\s*\(", unescape(text)))


results = []


def check(what, have, want, have_name, want_name):
    """have: what the program or file has; want: what the page documents."""
    missing = sorted(have - want)
    stale = sorted(want - have)
    diag = []
    if missing:
        diag.append(f"in {have_name} but not in {want_name}: {', '.join(missing)}")
    if stale:
        diag.append(f"in {want_name} but not in {have_name}: {', '.join(stale)}")
    if not have:
        diag.append(f"nothing found in {have_name}: has its format changed?")
    results.append((what, diag))


def main():
    if len(sys.argv) < 6:
        print("usage: test-man-in-step.py WEIGHTD WEIGHTCTL WEIGHTD_CONF CLIENT_H PAGE.scd...", file=sys.stderr)
        return 2
    weightd, weightctl, conf, header = sys.argv[1:5]
    pages = {os.path.basename(p): p for p in sys.argv[5:]}

    def page(name):
        with open(pages[name]) as f:
            return f.read()

    s = sections(page("weightd.8.scd"))
    check("weightd --help options are in weightd(8)", help_options(help_text(weightd)),
          page_options(s.get("OPTIONS", [])), "weightd --help", "man/weightd.8.scd OPTIONS")

    text = help_text(weightctl)
    s = sections(page("weightctl.1.scd"))
    check("weightctl --help options are in weightctl(1)", help_options(text),
          page_options(s.get("OPTIONS", [])), "weightctl --help", "man/weightctl.1.scd OPTIONS")
    check("weightctl --help commands are in weightctl(1)", help_commands(text),
          page_commands(s.get("COMMANDS", [])), "weightctl --help", "man/weightctl.1.scd COMMANDS")

    with open(conf) as f:
        ck = conf_keys(f.read())
    pk = page_keys(sections(page("weightd.conf.5.scd")).get("KEYS", []))
    check("conf/weightd.conf keys are in weightd.conf(5)", set(ck), set(pk),
          "conf/weightd.conf", "man/weightd.conf.5.scd KEYS")
    differ = [f"{k}: {ck[k]!r} in conf/weightd.conf, {pk[k]!r} in man/weightd.conf.5.scd"
              for k in sorted(set(ck) & set(pk)) if ck[k] != pk[k]]
    results.append(("weightd.conf(5) shows each key's default as conf/weightd.conf does", differ))

    with open(header) as f:
        hf = header_functions(f.read())
    check("weightd/client.h functions are in libweightd-client(3)", hf,
          page_functions(page("libweightd-client.3.scd")),
          "client/lib/weightd/client.h", "man/libweightd-client.3.scd")

    print(f"1..{len(results)}")
    failed = 0
    for i, (what, diag) in enumerate(results, 1):
        print(f"{'not ok' if diag else 'ok'} {i} - {what}")
        for d in diag:
            print(f"# {d}")
        failed += bool(diag)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
