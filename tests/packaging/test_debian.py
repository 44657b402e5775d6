"""The Debian packages, built, checked, installed, used and purged.

dpkg-buildpackage builds weightd, libweightd-client0, libweightd-client-dev
and python3-weightd from a copy of this tree (without the CUDA toolkit, and
without running the test suites: DEB_BUILD_OPTIONS=nocheck), lintian finds
no error in them, and apt installs them.  Then, from the installed files:
weightd --check-config accepts the shipped /etc/weightd/weightd.conf (a
conffile), weightd and weightctl print the package's version, systemd-analyze
verify accepts the units, sysusers made the user weightd, the man pages and
the bash completion are in place, a C program builds against the -dev
package through pkg-config, and the Python package loads the library.
Finally the packages are purged together with whatever apt installed for
them, the user, group and folders the test caused are removed, and the list
of installed packages is checked to be what it was before and the units'
enablement links to be gone.

Needs root (it installs packages), and a machine where none of these
packages is installed; skipped, with the reason, otherwise.  Takes about a
minute on two cores besides apt's downloads.
"""
import grp
import os
import pathlib
import pwd
import shutil
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ["weightd", "libweightd-client0", "libweightd-client-dev", "python3-weightd"]
# Debian's tools only, whatever the caller's PATH holds (a virtual
# environment's or another Python would build the Python package for the
# wrong interpreter).
ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
POLICY_RC_D = pathlib.Path("/usr/sbin/policy-rc.d")


def run(cmd, check=True, timeout=600, **kw):
    kw.setdefault("env", dict(ENV, HOME=os.environ.get("HOME", "/root")))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n"
                    f"--- stderr\n{r.stderr[-6000:]}")
    return r


def installed_packages():
    r = run(["dpkg-query", "-W", "-f", "${binary:Package} ${db:Status-Abbrev}\\n"])
    return {line.split()[0] for line in r.stdout.splitlines() if len(line.split()) > 1 and line.split()[1][1] in "iFHWt"}


def why_not():
    if os.geteuid() != 0:
        return "needs root: it installs and purges Debian packages"
    for tool in ("dpkg-buildpackage", "apt-get", "dpkg-query"):
        if not shutil.which(tool, path=ENV["PATH"]):
            return f"{tool} is not installed (not a Debian system?)"
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        return "needs a git checkout of weightd to copy the tree from"
    r = subprocess.run(["dpkg-query", "-W", "-f", "${binary:Package} ${db:Status-Abbrev}\\n", *PACKAGES],
                       capture_output=True, text=True)
    present = [line.split()[0] for line in r.stdout.splitlines() if len(line.split()) > 1 and line.split()[1][1] != "n"]
    if present:
        return f"{', '.join(present)} already installed here: the test would replace and then purge them"
    return None


pytestmark = pytest.mark.skipif(why_not() is not None, reason=why_not() or "")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tree as it is (tracked and untracked files, not the ignored ones
    such as build directories) copied and built into .deb files."""
    top = tmp_path_factory.mktemp("deb")
    src = top / "weightd"
    files = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in sorted(set(files.split("\0"))):
        if not name or not (ROOT / name).is_file():
            continue
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest, follow_symlinks=False)
    jobs = max(1, len(os.sched_getaffinity(0)))
    env = dict(ENV, HOME=str(top), DEB_BUILD_OPTIONS=f"nocheck parallel={jobs}")
    start = time.monotonic()
    r = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env, check=False, timeout=1200)
    seconds = time.monotonic() - start
    (top / "build.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        pytest.fail(f"dpkg-buildpackage exited {r.returncode} (log: {top}/build.log)\n{(r.stdout + r.stderr)[-8000:]}")
    version = run(["dpkg-parsechangelog", "-S", "Version"], cwd=src).stdout.strip()
    debs = {}
    for p in PACKAGES:
        found = sorted(top.glob(f"{p}_{version}_*.deb"))
        assert len(found) == 1, f"{p}_{version}_*.deb: found {found}"
        debs[p] = found[0]
    print(f"dpkg-buildpackage: {seconds:.0f} s")
    return {"dir": top, "debs": debs, "version": version,
            "changes": next(top.glob(f"weightd_{version}_*.changes")), "seconds": seconds}


@pytest.fixture(scope="module")
def installed(built):
    """The packages installed with apt (and what they depend on), purged
    again afterwards with everything apt added for them."""
    before = installed_packages()
    had_user = _exists(pwd.getpwnam, "weightd")
    had_group = _exists(grp.getgrnam, "weightd")
    # Made by the packages: the configuration folder, /run/weightd
    # (tmpfiles.d, in postinst) and the units' enablement links.
    leftovers = [pathlib.Path("/etc/weightd"), pathlib.Path("/run/weightd")]
    had = {p for p in leftovers if p.exists()}
    # No service starts from the packages' maintainer scripts where systemd
    # runs: deb-systemd-invoke asks policy-rc.d (101: not now).
    own_policy = not POLICY_RC_D.exists()
    if own_policy:
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
             *[str(d) for d in built["debs"].values()]], timeout=900)
        yield built
    finally:
        after = installed_packages()
        added = sorted((after - before) | {p for p in PACKAGES if p in after})
        errors = []
        if added:
            r = run(["apt-get", "purge", "-y", "-q", *added], check=False, timeout=600)
            if r.returncode != 0:
                errors.append(f"apt-get purge exited {r.returncode}: {r.stderr[-2000:]}")
        if own_policy:
            POLICY_RC_D.unlink(missing_ok=True)
        if not had_user and _exists(pwd.getpwnam, "weightd"):
            run(["userdel", "weightd"], check=False)
        if not had_group and _exists(grp.getgrnam, "weightd"):
            run(["groupdel", "weightd"], check=False)
        for p in leftovers:
            if p not in had and p.exists():
                shutil.rmtree(p, ignore_errors=True)
        left = installed_packages() ^ before
        if left:
            errors.append(f"packages not as found: {sorted(left)}")
        links = [str(p) for d in ("/etc/systemd/system", "/var/lib/systemd/deb-systemd-helper-enabled")
                 for p in pathlib.Path(d).rglob("weightd.*")]
        if links:
            errors.append(f"the purge left the units' links: {links}")
        if errors:
            pytest.fail("; ".join(errors))


def _exists(lookup, name):
    try:
        lookup(name)
        return True
    except KeyError:
        return False


def deb_files(deb):
    """The paths in a .deb (a symbolic link's own path, not its target)."""
    lines = run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines()
    return {line.split(None, 5)[5].split(" -> ")[0].lstrip(".") for line in lines}


def test_build_time_and_packages(built):
    assert set(built["debs"]) == set(PACKAGES)
    assert built["seconds"] < 600, f"dpkg-buildpackage took {built['seconds']:.0f} s"


def test_lintian_reports_no_errors(built):
    if not shutil.which("lintian", path=ENV["PATH"]):
        pytest.skip("lintian is not installed (scripts/install-deps installs it)")
    r = run(["lintian", "--fail-on", "error", str(built["changes"])], check=False, timeout=600)
    errors = [line for line in r.stdout.splitlines() if line.startswith("E:")]
    assert r.returncode == 0 and not errors, r.stdout + r.stderr


def test_package_contents(built):
    d = built["debs"]
    daemon = deb_files(d["weightd"])
    for path in ("/usr/bin/weightd", "/usr/bin/weightctl", "/etc/weightd/weightd.conf",
                 "/lib/systemd/system/weightd.service", "/lib/systemd/system/weightd.socket",
                 "/usr/lib/sysusers.d/weightd.conf", "/usr/lib/tmpfiles.d/weightd.conf",
                 "/usr/share/man/man8/weightd.8.gz", "/usr/share/man/man1/weightctl.1.gz",
                 "/usr/share/man/man5/weightd.conf.5.gz",
                 "/usr/share/bash-completion/completions/weightctl"):
        assert path in daemon, f"weightd lacks {path}"
    lib = deb_files(d["libweightd-client0"])
    assert any(p.startswith("/usr/lib/") and "/libweightd-client.so.0" in p for p in lib), lib
    dev = deb_files(d["libweightd-client-dev"])
    for end in ("/usr/include/weightd/client.h", "/pkgconfig/libweightd-client.pc",
                "/usr/share/man/man3/libweightd-client.3.gz", "/libweightd-client.so"):
        assert any(p.endswith(end) for p in dev), f"libweightd-client-dev lacks {end}"
    py = deb_files(d["python3-weightd"])
    assert "/usr/lib/python3/dist-packages/weightd/__init__.py" in py, py


def test_config_is_a_conffile_and_valid(installed):
    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", "weightd"]).stdout
    assert "/etc/weightd/weightd.conf" in conffiles
    r = run(["/usr/bin/weightd", "--check-config", "--config", "/etc/weightd/weightd.conf"])
    assert "configuration is valid" in r.stderr


def test_versions(installed):
    v = installed["version"].split("-")[0]
    assert run(["/usr/bin/weightd", "--version"]).stdout.strip() == f"weightd {v}"
    out = run(["/usr/bin/weightctl", "--version"]).stdout
    assert out.startswith(f"weightctl {v} "), out


def test_systemd_units_verify(installed):
    if not shutil.which("systemd-analyze", path=ENV["PATH"]):
        pytest.skip("systemd-analyze is not installed")
    r = run(["systemd-analyze", "verify", "/lib/systemd/system/weightd.service",
             "/lib/systemd/system/weightd.socket"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    mine = [line for line in (r.stdout + r.stderr).splitlines() if "weightd" in line]
    assert not mine, "\n".join(mine)


def test_sysusers_made_the_user(installed):
    user = pwd.getpwnam("weightd")
    assert grp.getgrgid(user.pw_gid).gr_name == "weightd"


def test_man_pages(installed):
    for page in ("man8/weightd.8.gz", "man1/weightctl.1.gz", "man5/weightd.conf.5.gz",
                 "man3/libweightd-client.3.gz"):
        path = pathlib.Path("/usr/share/man") / page
        assert path.exists(), path
        text = run(["zcat", str(path)]).stdout
        assert text.count(".TH ") == 1 and ".SH NAME" in text, page


def test_bash_completion(installed):
    script = ("source /usr/share/bash-completion/completions/weightctl; "
              "COMP_WORDS=(weightctl pre); COMP_CWORD=1; _weightctl; echo \"${COMPREPLY[*]}\"")
    assert run(["bash", "-c", script]).stdout.strip() == "prefetch"


def test_library_builds_through_pkg_config(installed, tmp_path):
    if not shutil.which("cc", path=ENV["PATH"]) or not shutil.which("pkg-config", path=ENV["PATH"]):
        pytest.skip("cc or pkg-config is not installed")
    src = tmp_path / "v.c"
    src.write_text('#include <stdio.h>\n#include <weightd/client.h>\n'
                   'int main(void) { puts(wd_version()); return 0; }\n')
    flags = run(["pkg-config", "--cflags", "--libs", "libweightd-client"]).stdout.split()
    run(["cc", "-o", str(tmp_path / "v"), str(src), *flags])
    assert run([str(tmp_path / "v")]).stdout.strip() == installed["version"].split("-")[0]


def test_python_package_loads_the_library(installed):
    r = run(["/usr/bin/python3", "-c", "import weightd; print(weightd.__file__); print(weightd.library_version())"],
            cwd="/")
    path, version = r.stdout.split()
    assert path.startswith("/usr/lib/python3/dist-packages/weightd/"), path
    assert version == installed["version"].split("-")[0]
