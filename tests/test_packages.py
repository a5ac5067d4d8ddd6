"""Package databases: pure parser tables, a captured dpkg tree, and the live host's dpkg (with a
real local .deb built, installed, modified and purged by the test)."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import time

import pytest

from asbuilt.agent.model import Coverage
from asbuilt.probes.base import GapRecorder, Roots
from asbuilt.probes.packages import open_index
from asbuilt.probes.packages import apt_origin, dpkg, rpm
from asbuilt.probes.packages.index import candidates, resolve_under, usrmerge_aliases

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dpkg")
ALL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def new_gaps():
    cov = Coverage()
    return cov, GapRecorder(cov)


# ============================================================================ pure parsers
STATUS_CASES = [
    ("", []),
    ("\n\n\n", []),
    ("Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\n",
     [("a", "1", "amd64", "installed", "a", {})]),
    # truncated: no trailing newline, no Version
    ("Package: b\nStatus: install ok unpacked", [("b", "", "", "unpacked", "b", {})]),
    # malformed Status (two words) -> empty state
    ("Package: c\nStatus: install ok\n", [("c", "", "", "", "c", {})]),
    # garbage lines and a paragraph without Package are skipped
    ("garbage line\nNot a field\n\nVersion: 2\n\nPackage: d\nSource: dsrc (1.0)\nStatus: hold ok installed\n",
     [("d", "", "", "installed", "dsrc", {})]),
    ("Package: e\nStatus: install ok installed\nConffiles:\n /etc/e.conf " + "a" * 32 + "\n"
     " /etc/old " + "B" * 32 + " obsolete\n /etc/new newconffile\n bad\n",
     [("e", "", "", "installed", "e", {"/etc/e.conf": "a" * 32, "/etc/old": "b" * 32, "/etc/new": ""})]),
    ("Package: f\nDescription: x\n continued\n .\n more\nStatus: deinstall ok config-files\n\n",
     [("f", "", "", "config-files", "f", {})]),
]


@pytest.mark.parametrize("text,want", STATUS_CASES)
def test_parse_status(text, want):
    got = [(e.name, e.version, e.architecture, e.state, e.source, e.conffiles)
           for e in dpkg.parse_status(text)]
    assert got == want


def _parse_deb822(text):
    """The reference deb822 reader parse_status must agree with: a Python step per line.
    Paragraphs of ``Field: value`` lines; continuation lines (leading space/tab) are joined with
    newlines. Lines that are neither are skipped."""
    paras = []
    cur = {}
    last = ""
    for line in text.split("\n"):
        if not line.strip():
            if cur:
                paras.append(cur)
            cur, last = {}, ""
            continue
        if line[0] in " \t":
            if last:
                cur[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or " " in key:
            last = ""
            continue
        last = key.strip()
        cur[last] = value.strip()
    if cur:
        paras.append(cur)
    return paras


def _status_via_deb822(text):
    """parse_status's answer built from the generic deb822 parser (the reference it must match)."""
    out = []
    for para in _parse_deb822(text):
        if not para.get("Package"):
            continue
        status = para.get("Status", "").split()
        out.append((para["Package"], para.get("Version", ""), para.get("Architecture", ""),
                    tuple(status) if len(status) == 3 else ("", "", ""),
                    para.get("Source", "").split(" ", 1)[0] or para["Package"], para.get("Multi-Arch", ""),
                    dpkg.parse_conffiles(para.get("Conffiles", ""))))
    return out


@pytest.mark.parametrize("source", ["cases", "host", "fixtures", "odd"])
def test_parse_status_agrees_with_the_deb822_parser(source):
    """parse_status reads only the fields it keeps (one regular expression per paragraph): on this
    host's real status file, the fixtures' and odd layouts it answers as the line parser does."""
    if source == "cases":
        texts = [text for text, _ in STATUS_CASES]
    elif source == "host":
        with open("/var/lib/dpkg/status", "rb") as fh:
            texts = [dpkg._decode(fh.read())]
    elif source == "fixtures":
        texts = []
        for root in (FIXTURE, os.path.join(os.path.dirname(FIXTURE), "debian12")):
            with open(os.path.join(root, "var/lib/dpkg/status"), "rb") as fh:
                texts.append(dpkg._decode(fh.read()))
    else:
        texts = ["Package: a\n \t\nVersion: 1\n  \n\n\nPackage: b\nVersion: 2\n continued\nSource: s\n",
                 "Package: a\nPackage: b\nStatus:   install ok installed  \nArchitecture:all",
                 "  leading\nPackage: x\nConffiles: /etc/inline " + "c" * 32 + "\n /etc/next " + "d" * 32,
                 "Description: x\nPackage: in-description? no\n\tPackage: indented\nMulti-Arch: same\n"]
    assert len(texts) >= 1 and any(texts)
    for text in texts:
        got = [(e.name, e.version, e.architecture, (e.want, e.flag, e.state), e.source, e.multi_arch, e.conffiles)
               for e in dpkg.parse_status(text)]
        assert got == _status_via_deb822(text)
        if source == "host":
            assert len(got) > 100


def test_status_installed_flags():
    (a, b, c) = dpkg.parse_status("Package: a\nStatus: hold ok installed\n\nPackage: b\n"
                                  "Status: install reinstreq installed\n\nPackage: c\n"
                                  "Status: install ok half-configured\n")
    assert a.installed and not b.installed and not c.installed
    assert c.status == "install ok half-configured"


LIST_CASES = [
    ("", []),
    ("/.\n/usr\n/usr/bin/ls\n", ["/", "/usr", "/usr/bin/ls"]),
    ("/usr/bin/ls", ["/usr/bin/ls"]),  # truncated: no final newline
    ("relative\n\n/a b/c d\n", ["/a b/c d"]),  # spaces kept, relative lines dropped
]


@pytest.mark.parametrize("text,want", LIST_CASES)
def test_parse_list(text, want):
    assert dpkg.parse_list(text) == want


DIVERSION_CASES = [
    ("", []),
    ("/bin/sh\n/bin/sh.distrib\ndash\n", [("/bin/sh", "/bin/sh.distrib", "dash")]),
    ("/etc/x\n/etc/x.local\n:\n", [("/etc/x", "/etc/x.local", None)]),
    ("/bin/sh\n/bin/sh.distrib\n", []),  # truncated group
    ("/a\n/a.d\np\n/b\n", [("/a", "/a.d", "p")]),
    ("junk\nmore junk\np\n", []),
]


@pytest.mark.parametrize("text,want", DIVERSION_CASES)
def test_parse_diversions(text, want):
    assert [(d.path, d.divert_to, d.package) for d in dpkg.parse_diversions(text)] == want


MD5_CASES = [
    ("", {}),
    ("d41d8cd98f00b204e9800998ecf8427e  usr/bin/x\n", {"/usr/bin/x": "d41d8cd98f00b204e9800998ecf8427e"}),
    ("D41D8CD98F00B204E9800998ECF8427E *usr/a b\n", {"/usr/a b": "d41d8cd98f00b204e9800998ecf8427e"}),
    ("nothex  usr/x\nd41d8cd98f00b204e9800998ecf8427e\n", {}),  # malformed, truncated
    ("d41d8cd98f00b204  usr/x\n", {}),  # short digest
]


@pytest.mark.parametrize("text,want", MD5_CASES)
def test_parse_md5sums(text, want):
    assert dpkg.parse_md5sums(text) == want


RELEASE_CASES = [
    ("", {}),
    ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\nCodename: bookworm\n"
     "MD5Sum:\n abc 1 main/x\n-----BEGIN PGP SIGNATURE-----\n\nxx\n",
     {"Origin": "Debian", "Codename": "bookworm", "MD5Sum": ""}),
    ("Origin: Ex\nSuite: stable", {"Origin": "Ex", "Suite": "stable"}),
    ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256", {}),  # truncated armour
]


@pytest.mark.parametrize("text,want", RELEASE_CASES)
def test_parse_release(text, want):
    assert apt_origin.parse_release(text) == want


@pytest.mark.parametrize("name,prefix,want", [
    ("deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4",
     "deb.debian.org_debian_dists_bookworm", "main"),
    ("x_dists_s_non-free_firmware_binary-all_Packages", "x_dists_s", "non-free/firmware"),
    ("x_Packages", "x", ""),
])
def test_component_of(name, prefix, want):
    assert apt_origin.component_of(name, prefix) == want


@pytest.mark.parametrize("args,want", [
    (("Debian", "bookworm", "main", "deb.debian.org"), "Debian:bookworm/main"),
    (("", "bookworm", "main", "deb.debian.org"), "deb.debian.org:bookworm/main"),
    (("", "", "", ""), "unknown"),
    (("Ex", "", "", ""), "Ex"),
])
def test_format_origin(args, want):
    assert apt_origin.format_origin(*args) == want


def test_scan_packages_across_chunk_boundaries():
    text = b"".join(b"Package: p%d\nVersion: %d.0\nArchitecture: all\n\n" % (i, i) for i in range(200))
    chunks = [text[i:i + 37] for i in range(0, len(text), 37)]  # cut everywhere, mid-line too
    wanted = {b"p3": {"3.0"}, b"p150": {"150.0", "9"}, b"p7": {"8.0"}, b"p199": {"199.0"}}
    assert sorted(apt_origin.scan_packages(iter(chunks), wanted)) == [
        ("p150", "150.0"), ("p199", "199.0"), ("p3", "3.0")]
    assert apt_origin.scan_packages(iter([]), wanted) == []
    assert apt_origin.scan_packages(iter([b"Package: p3\nVersion: 3.0"]), wanted) == [("p3", "3.0")]


RPM_QUERY_CASES = [
    ("", []),
    ("bash\t5.1.8-6.el9\tx86_64\t1700000000\tRed Hat, Inc.\tRed Hat, Inc. <http://bugzilla.redhat.com>"
     "\tbash-5.1.8-6.el9.src.rpm\n",
     [("bash", "5.1.8-6.el9", "x86_64", 1700000000.0, "Red Hat, Inc.", "bash")]),
    ("gpg-pubkey\t1:abc-def\t(none)\tx\t(none)\t(none)\t(none)\n",
     [("gpg-pubkey", "1:abc-def", "", None, "", "gpg-pubkey")]),
    ("bash\t5.1\tx86_64\t17000", []),  # truncated line
    ("package foo is not installed\n", []),
]


@pytest.mark.parametrize("text,want", RPM_QUERY_CASES)
def test_rpm_parse_query(text, want):
    got = [(p.name, p.version, p.architecture, p.install_time, p.vendor, p.source)
           for p in rpm.parse_query(text)]
    assert got == want


RPM_OWNER_CASES = [
    ("", [], {}),
    ("bash\nfile /tmp/x is not owned by any package\n", ["/bin/bash", "/tmp/x"],
     {"/bin/bash": "bash", "/tmp/x": None}),
    ("glibc\nglibc.i686\n", ["/usr/share/x"], None),  # two owners: cannot pair
    ("bash\n", ["/bin/bash", "/bin/sh"], None),  # truncated
    ("file /other is not owned by any package\n", ["/tmp/x"], None),
    ("error: file /x: No such file or directory\n", ["/x"], None),
]


@pytest.mark.parametrize("text,paths,want", RPM_OWNER_CASES)
def test_rpm_parse_owner_lines(text, paths, want):
    assert rpm.parse_owner_lines(text, paths) == want


RPM_VERIFY_CASES = [
    ("", {}),
    ("S.5....T.  c /etc/ssh/sshd_config\n", {"/etc/ssh/sshd_config": ("S.5....T.", "c", True)}),
    (".M.......    /usr/bin/x\n", {"/usr/bin/x": (".M.......", "", False)}),
    ("missing   d /usr/share/doc/x\n", {"/usr/share/doc/x": ("missing", "d", True)}),
    ("..?......    /root/secret\n", {"/root/secret": ("..?......", "", None)}),
    ("Unsatisfied dependencies for x: y\nS.5\n", {}),
]


@pytest.mark.parametrize("text,want", RPM_VERIFY_CASES)
def test_rpm_parse_verify(text, want):
    got = {p: (v.flags, v.attribute, v.modified) for p, v in rpm.parse_verify(text).items()}
    assert got == want


@pytest.mark.parametrize("srpm,want", [
    ("bash-5.1.8-6.el9.src.rpm", "bash"), ("(none)", ""), ("python3-foo-bar-1-2.src.rpm", "python3-foo-bar"),
    ("weird", "weird"),
])
def test_rpm_source_name(srpm, want):
    assert rpm.source_name(srpm) == want


@pytest.mark.parametrize("path,merged,want", [
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", ALL, ["/lib/x86_64-linux-gnu/libc.so.6"]),
    ("/lib/x86_64-linux-gnu/libc.so.6", ALL, ["/usr/lib/x86_64-linux-gnu/libc.so.6"]),
    ("/bin/ls", ALL, ["/usr/bin/ls"]),
    ("/usr/bin", ALL, ["/bin"]),
    ("/lib64/ld.so", ("bin",), []),  # not merged on this root
    ("/usr/share/x", ALL, []),
    ("/etc/x", ALL, []),
    ("relative", ALL, []),
    ("", ALL, []),
])
def test_usrmerge_aliases(path, merged, want):
    assert usrmerge_aliases(path, merged) == want


# ======================================================================== captured tree
@pytest.fixture
def fixture_index():
    cov, gaps = new_gaps()
    idx = open_index(Roots(rootfs=FIXTURE), gaps)
    assert idx is not None and idx.manager == "dpkg"
    return idx, cov


def test_resolve_under_fixture():
    assert resolve_under(FIXTURE, "/lib/x86_64-linux-gnu/libtiny.so.1") == \
        "/usr/lib/x86_64-linux-gnu/libtiny.so.1.2.3"
    assert resolve_under(FIXTURE, "/bin/../bin/tool") == "/usr/bin/tool"
    assert resolve_under(FIXTURE, "/../../etc/conf.conf") == "/etc/conf.conf"
    assert candidates(FIXTURE, "/usr/lib/x86_64-linux-gnu/libtiny.so.1", ("lib",)) == [
        "/usr/lib/x86_64-linux-gnu/libtiny.so.1", "/lib/x86_64-linux-gnu/libtiny.so.1",
        "/usr/lib/x86_64-linux-gnu/libtiny.so.1.2.3", "/lib/x86_64-linux-gnu/libtiny.so.1.2.3"]


@pytest.mark.parametrize("path,owner,modified", [
    ("/bin/tool", "divpkg", False),  # the diverting package's own file
    ("/usr/bin/tool", "divpkg", False),
    ("/usr/bin/tool.distrib", "tinyutils", False),  # tinyutils' /bin/tool, diverted
    ("/usr/bin/other", "tinyutils", True),  # content differs from md5sums
    ("/bin/other", "tinyutils", True),
    ("/usr/lib/x86_64-linux-gnu/libtiny.so.1", "libtiny1:amd64", False),  # shipped symlink
    ("/lib/x86_64-linux-gnu/libtiny.so.1.2.3", "libtiny1:amd64", False),
    ("/lib/i386-linux-gnu/libtiny.so.1.2.3", "libtiny1:i386", None),  # no md5sums, not on disk
    ("/usr/share", "tinyutils", None),  # a directory: owned, nothing to verify
    ("/etc/conf.conf", "confpkg", True),  # conffile edited by the admin
    ("/etc/local.conf", None, None),  # local diversion: the admin's file
    ("/etc/gone.conf", "gonepkg", None),  # config-files package, md5 not yet known
    ("/usr/bin/stale", None, None),  # list of a purged package
    ("/usr/bin/broken", "brokenpkg", None),
    ("/nope", None, None),
])
def test_fixture_owner_and_verify(fixture_index, path, owner, modified):
    idx, _ = fixture_index
    assert idx.owner(path) == owner
    assert idx.verify(path) is modified


def test_fixture_packages(fixture_index):
    idx, cov = fixture_index
    for p in ("/bin/tool", "/usr/bin/tool.distrib", "/lib/x86_64-linux-gnu/libtiny.so.1.2.3"):
        idx.owner(p)
    tiny = idx.package("tinyutils")
    assert (tiny.name, tiny.version, tiny.architecture, tiny.manager, tiny.source) == \
        ("tinyutils", "1.0-1", "amd64", "dpkg", "tinyutils")
    assert tiny.install_time and tiny.install_time > 0
    assert tiny.origin == "Example:tiny/main"  # found in the .gz list named by InRelease
    assert idx.package("divpkg").origin == "local"  # the list has 1.9, 2.0 is installed
    assert idx.package("divpkg").source == "divsrc"
    assert idx.package("confpkg").origin == "Example:tiny/contrib"  # plain, uncompressed list
    assert idx.package("libtiny1:amd64").version == "1.2.3-1"
    assert idx.package("libtiny1:i386").architecture == "i386"
    with pytest.raises(KeyError):
        idx.package("libtiny1")  # ambiguous: two architectures installed
    with pytest.raises(KeyError):
        idx.package("neverpkg")  # purged
    assert not [g for g in cov.gaps if g.subject == "package brokenpkg"]
    assert idx.package("brokenpkg").version == "3.1"
    idx.package("brokenpkg")
    assert [(g.kind, g.subject) for g in cov.gaps] == [("truncated", "package brokenpkg")]


def test_open_index_without_database(tmp_path):
    cov, gaps = new_gaps()
    assert open_index(Roots(rootfs=str(tmp_path)), gaps) is None
    assert [(g.kind, g.subject, g.detail) for g in cov.gaps] == [
        ("absent", "packages", "no dpkg or rpm database")]


def test_open_index_unreadable_status(tmp_path):
    os.makedirs(tmp_path / "var/lib/dpkg/status")  # a directory where the file should be
    cov, gaps = new_gaps()
    assert open_index(Roots(rootfs=str(tmp_path)), gaps) is None
    assert [(g.kind, g.subject) for g in cov.gaps] == [("unreadable", "packages")]


def test_open_index_rpm_database_without_rpm_tool(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "root/var/lib/rpm")
    (tmp_path / "root/var/lib/rpm/rpmdb.sqlite").write_bytes(b"")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # a host without the rpm tool
    cov, gaps = new_gaps()
    assert open_index(Roots(rootfs=str(tmp_path / "root")), gaps) is None
    assert [(g.kind, g.subject) for g in cov.gaps] == [("absent", "packages")]
    assert "no rpm binary" in cov.gaps[0].detail


def test_lists_resolver_without_lists(tmp_path):
    cov, gaps = new_gaps()
    r = apt_origin.ListsResolver(Roots(rootfs=str(tmp_path)), gaps)
    assert r.origins({"a": ("a", "1", "all")}) == {"a": "unknown"}


def test_lists_resolver_corrupt_list(tmp_path):
    d = tmp_path / "var/lib/apt/lists"
    d.mkdir(parents=True)
    truncated = gzip.compress(b"Package: a\nVersion: 1\n")[:20]
    (d / "x_dists_s_main_binary-amd64_Packages.gz").write_bytes(truncated)
    cov, gaps = new_gaps()
    r = apt_origin.ListsResolver(Roots(rootfs=str(tmp_path)), gaps)
    assert r.origins({"a": ("a", "1", "all")}) == {"a": "unknown"}
    assert [g.kind for g in cov.gaps] == ["unreadable"]


# ============================================================================ live host
@pytest.fixture(scope="module")
def live():
    cov, gaps = new_gaps()
    idx = open_index(Roots(), gaps)
    assert idx is not None and idx.manager == "dpkg"
    return idx


def dpkg_query(field, pkg):
    return subprocess.run(["dpkg-query", "-W", "-f=${" + field + "}", pkg], check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.live
def test_live_owner(live, tmp_path):
    assert live.owner("/usr/bin/ls") == "coreutils"
    assert live.owner("/bin/ls") == "coreutils"
    assert live.owner("/usr/lib/x86_64-linux-gnu/libc.so.6") == "libc6"
    assert live.owner("/lib/x86_64-linux-gnu/libc.so.6") == "libc6"
    assert live.build_seconds < 0.5, f"index took {live.build_seconds:.3f}s"
    tmp = tmp_path / "not-packaged"
    tmp.write_text("x")
    assert live.owner(str(tmp)) is None
    assert live.verify(str(tmp)) is None
    assert live.verify("/usr/bin/ls") is False
    assert live.verify("/lib/x86_64-linux-gnu/libc.so.6") is False


@pytest.mark.live
def test_live_package_libc6(live):
    live.owner("/usr/lib/x86_64-linux-gnu/libc.so.6")
    start = time.monotonic()
    p = live.package("libc6")
    elapsed = time.monotonic() - start
    assert p.version == dpkg_query("Version", "libc6")
    assert p.architecture == dpkg_query("Architecture", "libc6")
    assert p.manager == "dpkg" and p.source == "glibc"
    assert p.install_time and p.install_time > 0
    assert p.origin and p.origin not in ("local", "unknown")
    assert elapsed < 5, f"origin took {elapsed:.2f}s"


@pytest.mark.live
def test_live_origin_fallback_matches_python_apt(live):
    """The lists scan (no python-apt) names the same archive as python-apt does."""
    names = ["libc6", "coreutils", "bash"]
    cov, gaps = new_gaps()
    plain = dpkg.DpkgIndex(Roots(), gaps, use_apt_pkg=False)
    for n in names:
        assert plain.package(n).origin == live.package(n).origin
    assert cov.gaps == []


def _build_deb(workdir):
    root = os.path.join(workdir, "pkg")
    files = {"etc/asbuilt-testpkg.conf": "setting = 1\n",
             "usr/share/asbuilt-testpkg/data": "payload\n",
             "usr/share/asbuilt-testpkg/other": "untouched\n"}
    for rel, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as fh:
            fh.write(content)
    os.makedirs(os.path.join(root, "DEBIAN"))
    with open(os.path.join(root, "DEBIAN/control"), "w") as fh:
        fh.write("Package: asbuilt-testpkg\nVersion: 1.2.3-4\nArchitecture: all\n"
                 "Maintainer: asbuilt tests <root@localhost>\nSection: misc\nPriority: optional\n"
                 "Description: asbuilt test package\n built and purged by tests/test_packages.py\n")
    with open(os.path.join(root, "DEBIAN/conffiles"), "w") as fh:
        fh.write("/etc/asbuilt-testpkg.conf\n")
    with open(os.path.join(root, "DEBIAN/md5sums"), "w") as fh:
        for rel, content in files.items():
            if not rel.startswith("etc/"):
                fh.write(f"{md5(content)}  {rel}\n")
    deb = os.path.join(workdir, "asbuilt-testpkg.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", root, deb], check=True,
                   capture_output=True)
    return deb


@pytest.mark.live
def test_live_local_package(tmp_path):
    deb = _build_deb(str(tmp_path))
    subprocess.run(["dpkg", "-i", deb], check=True, capture_output=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    try:
        cov, gaps = new_gaps()
        idx = open_index(Roots(), gaps)
        data = "/usr/share/asbuilt-testpkg/data"
        assert idx.owner(data) == "asbuilt-testpkg"
        assert idx.owner("/etc/asbuilt-testpkg.conf") == "asbuilt-testpkg"
        p = idx.package("asbuilt-testpkg")
        assert (p.version, p.architecture, p.origin) == ("1.2.3-4", "all", "local")
        assert p.install_time and abs(p.install_time - time.time()) < 300
        assert idx.verify(data) is False
        assert idx.verify("/etc/asbuilt-testpkg.conf") is False  # conffile hash from status
        with open(data, "a") as fh:
            fh.write("changed\n")
        with open("/etc/asbuilt-testpkg.conf", "w") as fh:
            fh.write("setting = 2\n")
        assert idx.verify(data) is True  # new (size, mtime): hashed again
        assert idx.verify("/etc/asbuilt-testpkg.conf") is True
        assert idx.verify("/usr/share/asbuilt-testpkg/other") is False
        plain = dpkg.DpkgIndex(Roots(), gaps, use_apt_pkg=False)
        assert plain.owner(data) == "asbuilt-testpkg"
        assert plain.package("asbuilt-testpkg").origin == "local"
        assert cov.gaps == []
    finally:
        subprocess.run(["dpkg", "--purge", "asbuilt-testpkg"], capture_output=True)
    assert not os.path.exists("/usr/share/asbuilt-testpkg/data")


# ------------------------------------------------------------------------- live rpm
RPM_SPEC = """Name: asbuilt-rpmtest
Version: 1.0
Release: 2
Summary: asbuilt test package
License: MIT
BuildArch: noarch
Vendor: asbuilt tests
%description
Built and removed by tests/test_packages.py.
%install
mkdir -p %{buildroot}/etc %{buildroot}/usr/share/asbuilt-rpmtest
echo 'setting = 1' > %{buildroot}/etc/asbuilt-rpmtest.conf
echo payload > %{buildroot}/usr/share/asbuilt-rpmtest/data
echo untouched > %{buildroot}/usr/share/asbuilt-rpmtest/other
%files
%config(noreplace) /etc/asbuilt-rpmtest.conf
/usr/share/asbuilt-rpmtest
"""


@pytest.fixture(scope="module")
def rpm_tools():
    """Debian's rpm package (rpm, rpmbuild): scripts/setup --test installs it; so does this."""
    if not (shutil.which("rpm") and shutil.which("rpmbuild")):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "rpm"]
        if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(cmd, check=True, capture_output=True, env=env)
    return shutil.which("rpm")


@pytest.mark.live
def test_live_rpm_root(rpm_tools, tmp_path):
    """A real rpm database in a root the test makes: rpmbuild a package, install it there."""
    top, root = tmp_path / "top", tmp_path / "root"
    (top / "SPECS").mkdir(parents=True)
    (top / "SPECS/t.spec").write_text(RPM_SPEC)
    subprocess.run(["rpmbuild", "--define", f"_topdir {top}", "--define", "__os_install_post %{nil}",
                    "--define", "_build_id_links none", "-bb", str(top / "SPECS/t.spec")],
                   check=True, capture_output=True)
    (rpm_file,) = (top / "RPMS/noarch").iterdir()
    rpmdb = ["--root", str(root), "--dbpath", "/var/lib/rpm"]
    subprocess.run(["rpm"] + rpmdb + ["--initdb"], check=True, capture_output=True)
    subprocess.run(["rpm"] + rpmdb + ["-i", "--nodeps", "--force-debian", str(rpm_file)],
                   check=True, capture_output=True)
    cov, gaps = new_gaps()
    idx = open_index(Roots(rootfs=str(root)), gaps)
    assert idx is not None and idx.manager == "rpm"
    data, conf = "/usr/share/asbuilt-rpmtest/data", "/etc/asbuilt-rpmtest.conf"
    assert idx.owners([data, conf, "/etc", "/nonexistent"]) == {
        data: "asbuilt-rpmtest", conf: "asbuilt-rpmtest", "/etc": None, "/nonexistent": None}
    p = idx.package("asbuilt-rpmtest")
    assert (p.name, p.version, p.architecture, p.manager, p.origin, p.source) == (
        "asbuilt-rpmtest", "1.0-2", "noarch", "rpm", "asbuilt tests", "asbuilt-rpmtest")
    assert p.install_time and abs(p.install_time - time.time()) < 300
    with pytest.raises(KeyError):
        idx.package("not-installed-here")
    assert idx.verify(data) is False
    with open(root / data.lstrip("/"), "a") as fh:
        fh.write("changed\n")
    idx2 = open_index(Roots(rootfs=str(root)), gaps)  # rpm -V results are cached per index
    assert idx2.verify(data) is True
    assert idx2.verify(conf) is False
    assert idx2.verify("/usr/share/asbuilt-rpmtest/other") is False
    assert idx2.verify("/etc") is None
    assert cov.gaps == []


def test_resolve_under_with_directory_cache_equals_realpath(tmp_path):
    from asbuilt.probes.packages.index import resolve_under

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "f").write_text("x")
    os.symlink(str(real), str(tmp_path / "dirlink"))
    os.symlink("sub/f", str(real / "filelink"))
    os.symlink("../real/sub", str(tmp_path / "rel"))
    dirs = {}
    paths = [f"{tmp_path}/dirlink/sub/f", f"{tmp_path}/dirlink/filelink", f"{tmp_path}/rel/f",
             f"{tmp_path}/rel/missing", f"{tmp_path}/nowhere/x", f"{tmp_path}/dirlink/sub/f", "/", "/etc"]
    for p in paths:
        assert resolve_under("/", p, dirs=dirs) == os.path.realpath(p), p
    assert dirs  # the directories were kept


# ============================================================= the agent's cache of dpkg's answers
from asbuilt.probes.packages import cache as cachemod  # noqa: E402

CACHE_PATHS = ("/bin/tool", "/usr/bin/tool", "/usr/bin/tool.distrib", "/usr/bin/other", "/bin/other",
               "/usr/lib/x86_64-linux-gnu/libtiny.so.1", "/lib/x86_64-linux-gnu/libtiny.so.1.2.3",
               "/lib/i386-linux-gnu/libtiny.so.1.2.3", "/usr/share", "/etc/conf.conf", "/etc/local.conf",
               "/etc/gone.conf", "/usr/bin/stale", "/usr/bin/broken", "/nope", "/srv/app/new.log")


def _answers(rootfs, cache_file=""):
    """Everything a scan asks an index, the gaps it recorded, and the index."""
    cov, gaps = new_gaps()
    idx = dpkg.DpkgIndex(Roots(rootfs=rootfs), gaps, cache_file=cache_file)
    owners = idx.owners(CACHE_PATHS)
    idx.prefetch_hashes([p for p in CACHE_PATHS if owners[p]])
    verified = {p: idx.verify(p) for p in CACHE_PATHS if owners[p]}
    pkgs = {}
    for name in sorted({o for o in owners.values() if o}):
        p = idx.package(name)
        pkgs[name] = (p.version, p.install_time, p.origin, p.source)
    return (owners, verified, pkgs, [(g.kind, g.subject, g.detail) for g in cov.gaps]), idx


def _copy_fixture(tmp_path):
    root = str(tmp_path / "root")
    shutil.copytree(FIXTURE, root, symlinks=True)
    return root


def _cached_run(tmp_path, monkeypatch, write=True):
    """A copy of the fixture database, one run of every question with a cache file beside it, and
    (``write``) that run's cache written: (root, cache file, the run's answers, its index)."""
    monkeypatch.setattr(cachemod, "SETTLE_SECONDS", -1.0)  # the copied files are brand new
    root, cf = _copy_fixture(tmp_path), str(tmp_path / "dpkg-index.msgpack")
    answers, idx = _answers(root, cf)
    if write:
        with open(cf, "wb") as fh:
            fh.write(idx.cache_update())
    return root, cf, answers, idx


def test_cache_answers_like_the_database(tmp_path, monkeypatch):
    root, cf, cold, idx = _cached_run(tmp_path, monkeypatch, write=False)
    plain, _ = _answers(root)
    assert cold == plain
    data = idx.cache_update()
    assert data
    with open(cf, "wb") as fh:
        fh.write(data)
    warm, idx2 = _answers(root, cf)
    assert warm == plain
    assert idx2.build_seconds == 0.0, "no list file was scanned"
    assert not idx2._hashing, "no file was hashed"
    assert idx2._resolver is None, "no apt list was read"
    assert idx2.cache_update() is None, "nothing new: nothing to write"


def test_cache_is_dropped_when_dpkg_or_a_file_changes(tmp_path, monkeypatch):
    root, cf, _, _ = _cached_run(tmp_path, monkeypatch)
    time.sleep(0.05)  # past the timestamp tick of the copy: a change shows in the mtimes
    # a package now lists /usr/bin/stale (dpkg writes list files by a rename into info/)
    info = os.path.join(root, "var/lib/dpkg/info")
    with open(os.path.join(info, "confpkg.list")) as fh:
        listed = fh.read()
    with open(os.path.join(info, "confpkg.list.new"), "w") as fh:
        fh.write(listed.rstrip("\n") + "\n/usr/bin/stale\n")
    os.rename(os.path.join(info, "confpkg.list.new"), os.path.join(info, "confpkg.list"))
    # and a verified file is rewritten with its old mtime put back
    other = os.path.join(root, "usr/bin/tool.distrib")
    st = os.stat(other)
    with open(other, "ab") as fh:
        fh.write(b"changed")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh, _ = _answers(root)
    assert fresh[0]["/usr/bin/stale"] == "confpkg" and fresh[1]["/usr/bin/tool.distrib"] is True
    cached, _ = _answers(root, cf)
    assert cached == fresh


@pytest.mark.parametrize("content", [
    b"", b"garbage", b"\x81\xa7version\x01",  # empty, not msgpack, a map missing every part
    b"\xde\x00",  # truncated
    None,  # a well-formed cache of another version
    "wrong-types",  # a cache whose parts have the wrong types
    "wrong-dirs",  # a directory list that is not a bytes blob
    "foreign-owner",  # valid stamps but an owner this database does not have
])
def test_corrupt_or_foreign_cache_is_harmless(tmp_path, monkeypatch, content):
    import msgpack

    root, cf, plain, idx = _cached_run(tmp_path, monkeypatch, write=False)
    good = msgpack.unpackb(idx.cache_update(), raw=False)
    if content is None:
        content = msgpack.packb(dict(good, version=cachemod.VERSION + 1))
    elif content == "wrong-types":
        content = msgpack.packb(dict(good, owners={"/bin/tool": 3}, hashes=[1, 2]))
    elif content == "wrong-dirs":
        content = msgpack.packb(dict(good, dirs=["/usr/bin"]))
    elif content == "foreign-owner":
        content = msgpack.packb(dict(good, owners={"/nope": ["evilpkg"]}))
    with open(cf, "wb") as fh:
        fh.write(content)
    os.chmod(cf, 0o600)
    got, idx2 = _answers(root, cf)
    assert got == plain
    assert idx2.cache_update(), "the bad cache is replaced"


def test_cache_file_writable_by_others_is_not_read(tmp_path, monkeypatch):
    root, cf, _, _ = _cached_run(tmp_path, monkeypatch)
    os.chmod(cf, 0o666)
    _, idx2 = _answers(root, cf)
    assert idx2.build_seconds > 0.0, "the lists were scanned again"


def test_fixture_roots_scan_writes_no_cache(tmp_path):
    from asbuilt.agent.scan import PackageProbe
    from asbuilt.probes.base import Context

    ctx = Context(roots=Roots(proc=str(tmp_path), sys=str(tmp_path), rootfs=FIXTURE))
    ctx.options["cache_dir"] = str(tmp_path / "cache")
    PackageProbe([]).collect(ctx)
    assert not os.path.exists(tmp_path / "cache")


def test_cache_keeps_only_this_scans_paths_past_its_bound(tmp_path, monkeypatch):
    import msgpack

    _, _, _, idx = _cached_run(tmp_path, monkeypatch, write=False)
    idx.cache.owners.update({f"/tmp/gone{i}.log": () for i in range(50)})  # files of earlier scans
    monkeypatch.setattr(cachemod, "MAX_ENTRIES", 40)
    kept = msgpack.unpackb(idx.cache_update(), raw=False)["owners"]
    assert not [p for p in kept if p.startswith("/tmp/gone")]
    assert "/usr/bin/other" in kept


def test_new_paths_outside_listed_directories_need_no_pass_and_no_cache_write(tmp_path, monkeypatch):
    """With the cache's directory set, a path whose directory no list names (a temp file, a new log)
    is unowned at once: no list is read and the cache stays as it is. A new path in a listed
    directory is still looked up (and kept)."""
    root, cf, _, idx = _cached_run(tmp_path, monkeypatch)
    assert idx._dirs and b"/usr/bin" in idx._dirs and b"/srv/app" not in idx._dirs

    warm = dpkg.DpkgIndex(Roots(rootfs=root), new_gaps()[1], cache_file=cf)
    fresh = ["/tmp/tool-8f3a/stdout", "/srv/app/2026-11-23.log", "/var/tmp/x/y"]
    assert warm.owners(fresh) == {p: None for p in fresh}
    assert warm.build_seconds == 0.0 and warm.cache_update() is None

    plain = dpkg.DpkgIndex(Roots(rootfs=root), new_gaps()[1])  # no cache: the lists decide
    asked = ["/usr/bin/brand-new", "/usr/bin/other"]
    assert plain.owners(asked) == warm.owners(asked) == {"/usr/bin/brand-new": None, "/usr/bin/other": "tinyutils"}
    assert warm.build_seconds > 0.0 and warm.cache_update() is not None  # a listed directory: looked up


def test_directory_set_is_not_kept_when_a_list_is_unreadable(tmp_path):
    """A pass in which a list could not be read (here: a directory where the file should be, which
    root cannot read either) gives no directory set: it would miss that package's directories."""
    root = _copy_fixture(tmp_path)
    listed = os.path.join(root, "var/lib/dpkg/info/confpkg.list")
    os.unlink(listed)
    os.mkdir(listed)
    cov, gaps = new_gaps()
    idx = dpkg.DpkgIndex(Roots(rootfs=root), gaps, cache_file=str(tmp_path / "c.msgpack"))
    idx.owners(["/usr/bin/tool"])
    assert any(g.kind == "unreadable" and "confpkg" in g.subject for g in cov.gaps)
    assert idx._dirs is None and idx.cache.dirs is None
