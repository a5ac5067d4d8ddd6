"""Stable process identity (agent/identity.py) and file classification (agent/classify.py): pure tables."""
from __future__ import annotations

import re

import pytest

from asbuilt.agent.classify import classify, raw_target_inode, raw_target_kind, strip_deleted
from asbuilt.agent.identity import identity, image_repository, normalise_argv, normalise_unit
from asbuilt.agent.model import FILE_CLASSES

KEY = re.compile(r"^(?P<scope>.+):(?P<exe>[^:]*):(?P<hash>[0-9a-f]{8})$")

# ------------------------------------------------------------------------------------- identity
# (exe, argv, unit, container_id, image) pairs that must give the same identity
SAME = [
    # a restart: same everything (pid and start time are not inputs)
    (("/usr/sbin/nginx", ["nginx", "-g", "daemon on;"], "nginx.service", ""),
     ("/usr/sbin/nginx", ["nginx", "-g", "daemon on;"], "nginx.service", "")),
    (("/usr/bin/app", ["app", "--pid=1234"], "app.service", ""),
     ("/usr/bin/app", ["app", "--pid=98765"], "app.service", "")),
    (("/usr/bin/app", ["app", "--pid", "1234"], "", ""), ("/usr/bin/app", ["app", "--pid", "4321"], "", "")),
    (("/usr/bin/strace", ["strace", "-o", "/proc/1234/fd/1"], "", ""),
     ("/usr/bin/strace", ["strace", "-o", "/proc/999/fd/1"], "", "")),
    (("/usr/bin/app", ["app", "--run", "123e4567-e89b-12d3-a456-426614174000"], "", ""),
     ("/usr/bin/app", ["app", "--run", "00000000-1111-2222-3333-444444444444"], "", "")),
    (("/usr/bin/containerd-shim-runc-v2", ["shim", "-id", "3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a"], "", ""),
     ("/usr/bin/containerd-shim-runc-v2", ["shim", "-id", "aa11bb22cc33dd44ee55ff66aa77bb88cc99dd00ee11ff22"], "", "")),
    (("/usr/bin/python3", ["python3", "/tmp/tmp.Xy12AbCdEf/job.py"], "", ""),
     ("/usr/bin/python3", ["python3", "/tmp/tmp.Qw98ZxCvBn/job.py"], "", "")),
    (("/usr/bin/python3", ["python3", "-m", "pytest", "--basetemp=/tmp/pytest-of-root/pytest-12/x"], "", ""),
     ("/usr/bin/python3", ["python3", "-m", "pytest", "--basetemp=/tmp/pytest-of-root/pytest-13/y"], "", "")),
    (("/usr/bin/python3", ["python3", "/tmp/tmpa1b2c3d4/run.py"], "", ""),
     ("/usr/bin/python3", ["python3", "/tmp/tmpz9y8x7w6/run.py"], "", "")),
    (("/usr/bin/app", ["app", "--log=/var/log/app-2024-01-15.log"], "", ""),
     ("/usr/bin/app", ["app", "--log=/var/log/app-2024-03-02.log"], "", "")),
    (("/usr/bin/app", ["app", "--since", "2024-01-15T10:11:12Z"], "", ""),
     ("/usr/bin/app", ["app", "--since", "2024-02-01T00:00:00+01:00"], "", "")),
    (("/usr/bin/app", ["app", "--started", "1700000000"], "", ""),
     ("/usr/bin/app", ["app", "--started", "1712345678"], "", "")),
    (("/usr/bin/app", ["app", "--nonce", "abc"], "", ""), ("/usr/bin/app", ["app", "--nonce", "xyz"], "", "")),
    # an upgraded binary still running shows "(deleted)"
    (("/usr/sbin/sshd (deleted)", ["sshd", "-D"], "ssh.service", ""), ("/usr/sbin/sshd", ["sshd", "-D"], "ssh.service", "")),
    # a recreated container of the same image (new id, new tag)
    (("/usr/local/bin/redis-server", ["redis-server", "*:6379"], "docker-" + "a1" * 32 + ".scope", "a1" * 32,
      "docker.io/library/redis:7.2@sha256:" + "0f" * 32),
     ("/usr/local/bin/redis-server", ["redis-server", "*:6379"], "docker-" + "b2" * 32 + ".scope", "b2" * 32,
      "docker.io/library/redis:7.4")),
    # user sessions and transient units
    (("/usr/bin/bash", ["-bash"], "session-12.scope", ""), ("/usr/bin/bash", ["-bash"], "session-345.scope", "")),
    (("/usr/bin/app", ["app"], "run-r3f1c2a9b.service", ""), ("/usr/bin/app", ["app"], "run-u77.service", "")),
    # postgres backends: client port and state change per connection
    (("/usr/lib/postgresql/15/bin/postgres", ["postgres: 15/main: app shop 10.0.0.5(54321) idle"], "", ""),
     ("/usr/lib/postgresql/15/bin/postgres", ["postgres: 15/main: app shop 10.0.0.5(40000) SELECT"], "", "")),
    # kernel threads by comm
    (("", ["kworker/0:1-events"], "", ""), ("", ["kworker/1:2-events"], "", "")),
    # go build temp dirs
    (("/tmp/go-build123456789/b001/exe/main", ["/tmp/go-build123456789/b001/exe/main"], "", ""),
     ("/tmp/go-build123456789/b001/exe/main", ["/tmp/go-build987654321/b001/exe/main"], "", "")),
]

DIFFERENT = [
    # two redis instances on different ports ARE different
    (("/usr/bin/redis-server", ["redis-server", "127.0.0.1:6379"], "redis-server.service", ""),
     ("/usr/bin/redis-server", ["redis-server", "127.0.0.1:6380"], "redis-server@6380.service", "")),
    (("/usr/bin/redis-server", ["redis-server", "--port", "6379"], "", ""),
     ("/usr/bin/redis-server", ["redis-server", "--port", "6380"], "", "")),
    (("/usr/bin/app", ["app", "-c", "/etc/app/a.yaml"], "", ""), ("/usr/bin/app", ["app", "-c", "/etc/app/b.yaml"], "", "")),
    (("/usr/sbin/nginx", ["nginx"], "nginx.service", ""), ("/usr/sbin/nginx", ["nginx"], "nginx-alt.service", "")),
    (("/usr/bin/python3", ["python3", "a.py"], "", ""), ("/usr/bin/python3", ["python3", "b.py"], "", "")),
    (("/usr/bin/python3.11", ["python3"], "", ""), ("/usr/bin/python3.12", ["python3"], "", "")),
    (("/usr/bin/app", ["app", "--workers", "4"], "", ""), ("/usr/bin/app", ["app", "--workers", "8"], "", "")),
    (("/usr/local/bin/redis-server", ["redis-server"], "", "a1" * 32, "redis:7"),
     ("/usr/local/bin/redis-server", ["redis-server"], "", "b2" * 32, "valkey/valkey:7")),
    (("/usr/bin/app", ["app", "/tmp/redis-6379.sock"], "", ""), ("/usr/bin/app", ["app", "/tmp/redis-6380.sock"], "", "")),
    (("/usr/lib/postgresql/15/bin/postgres", ["postgres: 15/main: checkpointer"], "", ""),
     ("/usr/lib/postgresql/15/bin/postgres", ["postgres: 15/main: walwriter"], "", "")),
    (("/usr/bin/app", ["app", "--name", "deadbeef"], "", ""), ("/usr/bin/app", ["app", "--name", "cafebabe"], "", "")),
    (("/usr/bin/app", ["app", "--pid-file", "/run/a.pid"], "", ""),
     ("/usr/bin/app", ["app", "--pid-file", "/run/b.pid"], "", "")),
]


def _ident(args):
    return identity(*args)


@pytest.mark.parametrize("a,b", SAME)
def test_same_identity(a, b):
    assert _ident(a) == _ident(b)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_identity(a, b):
    assert _ident(a) != _ident(b)


def test_identity_table_size():
    assert len(SAME) + len(DIFFERENT) >= 20


def test_identity_readable_shape():
    key = identity("/usr/sbin/nginx", ["nginx", "-g", "daemon on;"], "nginx.service", "")
    m = KEY.match(key)
    assert m and m["scope"] == "nginx.service" and m["exe"] == "/usr/sbin/nginx"
    assert identity("/usr/bin/x", [], "", "").startswith("-:/usr/bin/x:")
    key = identity("/usr/local/bin/redis-server", ["redis-server"], "docker-" + "ab" * 32 + ".scope", "ab" * 32,
                   "ghcr.io/acme/cache:1.2@sha256:" + "00" * 32)
    assert key.startswith("ghcr.io/acme/cache:/usr/local/bin/redis-server:")
    assert identity("/usr/bin/x", [], "", "0123456789abcdef0123").startswith("0123456789ab:/usr/bin/x:")
    assert identity("", ["kworker/0:1-events"], "", "").startswith("-:[kworker/N:N-events]:")
    assert identity("", ["/usr/sbin/cron", "-f"], "cron.service", "").startswith("cron.service:/usr/sbin/cron:")


def test_identity_is_deterministic_and_never_raises():
    a = identity("/usr/bin/app", ["app", "x"], "u.service", "")
    assert a == identity("/usr/bin/app", ("app", "x"), "u.service", "")
    assert KEY.match(identity(None, None, None, None, None))
    assert KEY.match(identity(b"/usr/bin/\xff", [b"\xff", 3, None], "", ""))
    assert KEY.match(identity("/x", ["a" * 1_000_000], "", ""))


NORMALISE = [
    ([], []),
    (["nginx", "-g", "daemon on;"], ["nginx", "-g", "daemon on;"]),
    (["app", "--pid=1234", "--port", "8080"], ["app", "--pid=<pid>", "--port", "8080"]),
    (["app", "--ppid", "77", "-v"], ["app", "--ppid", "<pid>", "-v"]),
    (["app", "--pid", "--verbose"], ["app", "--pid", "--verbose"]),
    (["cat", "/proc/4242/status"], ["cat", "/proc/<pid>/status"]),
    (["cat", "/proc/self/status"], ["cat", "/proc/self/status"]),
    (["x", "pid=99"], ["x", "pid=<pid>"]),
    (["x", "123e4567-e89b-12d3-a456-426614174000"], ["x", "<uuid>"]),
    (["x", "--container=0123456789abcdef"], ["x", "--container=<hex>"]),
    (["x", "--name", "deadbeefcafebabe"], ["x", "--name", "deadbeefcafebabe"]),  # no digit: a word
    (["x", "/var/log/app-2024-01-15.log"], ["x", "/var/log/app-<date>.log"]),
    (["x", "--at=20240115T101112"], ["x", "--at=<time>"]),
    (["x", "/tmp/tmp.AbC123xYz9/run.py"], ["x", "/tmp/<tmp>/run.py"]),
    (["x", "/tmp/sh-thd.Ab3dE9"], ["x", "/tmp/<tmp>"]),
    (["x", "/tmp/redis-6380.sock"], ["x", "/tmp/redis-6380.sock"]),
    (["x", "/tmp/systemd-private-" + "0a" * 16 + "-nginx.service-AbCdEf/tmp/f"], ["x", "/tmp/<tmp>/tmp/f"]),
    (["x", "/etc/redis/redis-6379.conf", "--port", "6379"], ["x", "/etc/redis/redis-6379.conf", "--port", "6379"]),
    (["x", "--timeout", "30", "--workers=4"], ["x", "--timeout", "30", "--workers=4"]),
    (["x", "--seed=42", "--request-id", "r-1"], ["x", "--seed=<volatile>", "--request-id", "<volatile>"]),
    (["postgres: 15/main: app shop [local] idle"], ["postgres: 15/main: app shop [local] idle"]),
    (["postgres: 15/main: app shop 127.0.0.1(5555) idle"], ["postgres: 15/main: app shop 127.0.0.1"]),
    (["x", "<redacted>", "--password=<redacted>"], ["x", "<redacted>", "--password=<redacted>"]),
]


@pytest.mark.parametrize("argv,expected", NORMALISE)
def test_normalise_argv(argv, expected):
    assert normalise_argv(argv) == expected


@pytest.mark.parametrize("unit,expected", [
    ("nginx.service", "nginx.service"),
    ("session-42.scope", "session-N.scope"),
    ("run-r0123abcd.scope", "run-*.scope"),
    ("docker-" + "ab12" * 16 + ".scope", "docker-<hex>.scope"),
    ("redis-server@6380.service", "redis-server@6380.service"),
    ("", ""),
])
def test_normalise_unit(unit, expected):
    assert normalise_unit(unit) == expected


@pytest.mark.parametrize("image,expected", [
    ("redis", "redis"), ("redis:7", "redis"), ("docker.io/library/redis:7.2", "docker.io/library/redis"),
    ("registry:5000/team/app:1.0", "registry:5000/team/app"), ("registry:5000/team/app", "registry:5000/team/app"),
    ("app@sha256:" + "00" * 32, "app"), ("", ""),
])
def test_image_repository(image, expected):
    assert image_repository(image) == expected


# ------------------------------------------------------------------------------------- classify
CLASSIFY = [
    # (path, kwargs, expected)
    ("/etc/nginx/nginx.conf", {}, "config"),
    ("/etc/passwd", {}, "config"),
    ("/etc/ssl/certs/ca-certificates.crt", {}, "config"),
    ("/opt/app/config/settings.yaml", {}, "config"),
    ("/opt/app/app.yml", {}, "config"),
    ("/srv/app/config.toml", {}, "config"),
    ("/opt/app/.env", {}, "config"),
    ("/opt/app/.env.production", {}, "config"),
    ("/usr/local/etc/app.ini", {}, "config"),
    ("/opt/tomcat/conf/server.xml", {}, "config"),
    ("/opt/app/application.properties", {}, "config"),
    ("/home/app/app.json", {}, "config"),
    ("/var/log/syslog", {}, "log"),
    ("/var/log/nginx/access.log", {"access": "a"}, "log"),
    ("/opt/app/logs/app.log", {}, "log"),
    ("/opt/app/logs/app.log.1", {}, "log"),
    ("/var/lib/docker/containers/abc/abc-json.log", {}, "log"),
    ("/opt/app/logs/app.log.3.gz", {}, "log"),
    ("/var/log/journal/0123/system.journal", {}, "log"),
    ("/opt/app/output.txt", {"access": "wa"}, "log"),
    ("/var/lib/postgresql/15/main/base/5/1259", {"access": "rw"}, "data"),
    ("/var/lib/redis/appendonly.aof", {"access": "a"}, "data"),  # append but clearly data
    ("/opt/app/state.db", {"access": "a"}, "data"),
    ("/opt/app/state.db-wal", {}, "data"),
    ("/home/app/cache.sqlite3", {}, "data"),
    ("/var/lib/mysql/shop/orders.ibd", {}, "data"),
    ("/data/redis/dump.rdb", {}, "data"),
    ("/srv/www/index.html", {}, "data"),
    ("/var/lib/app/cache.json", {}, "data"),
    ("/dev/shm/pgsql.123", {}, "data"),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", {}, "library"),
    ("/usr/lib/x86_64-linux-gnu/libssl.so.3", {}, "library"),
    ("/lib64/ld-linux-x86-64.so.2", {}, "library"),
    ("/lib/ld-musl-x86_64.so.1", {}, "library"),
    ("/opt/app/lib/native.so", {}, "library"),
    ("/usr/share/java/postgresql.jar", {}, "library"),
    ("/usr/lib/python3/dist-packages/yaml/__init__.py", {}, "library"),
    ("/opt/app/mystery", {"is_library": True}, "library"),
    ("/usr/sbin/nginx", {"is_exec": True}, "executable"),
    ("/lib64/ld-linux-x86-64.so.2", {"is_exec": True}, "executable"),
    ("/usr/bin/python3.11", {}, "executable"),
    ("/dev/null", {}, "device"),
    ("/dev/pts/0", {"access": "rw"}, "device"),
    ("/dev/log", {}, "socket"),
    ("/run/docker.sock", {}, "socket"),
    ("/run/systemd/journal/socket", {}, "other"),  # no suffix we know, not under a known root
    ("socket:[12345]", {}, "socket"),
    ("pipe:[6789]", {}, "pipe"),
    ("anon_inode:[eventfd]", {}, "anon"),
    ("anon_inode:inotify", {}, "anon"),
    ("anon_inode:bpf-map", {}, "anon"),
    ("net:[4026531840]", {}, "anon"),
    ("/memfd:jit-cache (deleted)", {}, "anon"),
    ("[heap]", {}, "anon"),
    ("/var/lib/app/old.db (deleted)", {}, "deleted"),
    ("/usr/sbin/sshd (deleted)", {"is_exec": True}, "deleted"),
    ("/proc/1/status", {}, "proc"),
    ("/proc", {}, "proc"),
    ("/sys/fs/cgroup/memory.max", {}, "proc"),
    ("/run/nginx.pid", {}, "other"),
    ("/usr/share/doc/README", {}, "other"),
    ("relative/path.txt", {}, "other"),
    ("", {}, "other"),
]


@pytest.mark.parametrize("path,kwargs,expected", CLASSIFY, ids=[c[0] or "<empty>" for c in CLASSIFY])
def test_classify(path, kwargs, expected):
    got = classify(path, **kwargs)
    assert got == expected
    assert got in FILE_CLASSES


def test_classify_table_size_and_odd_input():
    assert len(CLASSIFY) >= 40
    assert classify(None) == "other"  # type: ignore[arg-type]
    assert classify("/x" * 100000) == "other"


@pytest.mark.parametrize("target,kind,inode", [
    ("socket:[12345]", "socket", 12345),
    ("pipe:[77]", "pipe", 77),
    ("anon_inode:[eventfd]", "anon", None),
    ("anon_inode:[pidfd]", "anon", None),
    ("anon_inode:inotify", "anon", None),
    ("mnt:[4026531841]", "anon", 4026531841),
    ("/memfd:x (deleted)", "anon", None),
    ("/tmp/x (deleted)", "deleted", None),
    ("/dev/null", "device", None),
    ("/dev/shm/x", "", None),
    ("/etc/hosts", "", None),
    ("", "", None),
    ("socket:[", "socket", None),  # truncated
    ("weird", "", None),
])
def test_raw_target(target, kind, inode):
    assert raw_target_kind(target) == kind
    assert raw_target_inode(target) == inode


def test_strip_deleted():
    assert strip_deleted("/usr/bin/x (deleted)") == "/usr/bin/x"
    assert strip_deleted("/usr/bin/x") == "/usr/bin/x"
