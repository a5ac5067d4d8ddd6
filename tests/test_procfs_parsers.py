"""Table-driven tests for the pure procfs parsers (probes/procfs/*): normal, empty, truncated and
malformed input, taken from real hosts where possible."""
from __future__ import annotations

import pytest

from asbuilt.probes.procfs import fd as fdmod
from asbuilt.probes.procfs.cgroup import Derived, CgroupEntry, cgroup_path, derive, parse_cgroup
from asbuilt.probes.procfs.cmdline import parse_cmdline
from asbuilt.probes.procfs.environ import parse_environ
from asbuilt.probes.procfs.limits import Limit, parse_limits
from asbuilt.probes.procfs.links import Link, parse_link, parse_ns_inode
from asbuilt.probes.procfs.maps import is_shared_library, mapped_files, parse_maps
from asbuilt.probes.procfs.pids import parse_pids
from asbuilt.probes.procfs.stat import PF_KTHREAD, parse_stat
from asbuilt.probes.procfs.status import parse_status

H = "0123456789abcdef" * 4  # a 64-hex container id
H2 = "fedcba9876543210" * 4

# ------------------------------------------------------------------------------------ pids


@pytest.mark.parametrize("names, expected", [
    (["1", "22", "self", "thread-self", "sys", "acpi", "3"], [1, 3, 22]),
    ([], []),
    (["12a", "-1", "", " 1", "²"], []),
])
def test_parse_pids(names, expected):
    assert parse_pids(names) == expected


# ------------------------------------------------------------------------------------ stat
TAIL = ("R 10578 10578 2413 0 -1 4194304 100 0 0 0 7 3 0 0 20 0 4 0 56250 3133440 406 "
        "18446744073709551615 94471721066496 94471721086377 140722178358624 0 0 0 0 0 0 0 0 0 17 1 0 0 "
        "0 0 0 94471721102384 94471721104000 94471823273984 140722178361884 140722178361904 "
        "140722178361904 140722178363371 0\n")
KTHREAD = ("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 24 0 0 18446744073709551615 0 0 0 "
           "0 0 0 0 2147483647 0 1 0 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n")


@pytest.mark.parametrize("comm", ["cat", "tmux: server", "a) b (c", "x)", ")", "(", "", "Web Content",
                                  "kworker/0:1-events", "a ) R 1 2 3"])
def test_parse_stat_comm(comm):
    st = parse_stat(f"10580 ({comm}) {TAIL}")
    assert st.comm == comm
    assert (st.pid, st.state, st.ppid, st.pgrp, st.session) == (10580, "R", 10578, 10578, 2413)
    assert (st.utime_ticks, st.stime_ticks, st.num_threads) == (7, 3, 4)
    assert (st.starttime_ticks, st.vsize_bytes, st.rss_pages) == (56250, 3133440, 406)
    assert st.flags == 4194304 and not st.kernel_thread


def test_parse_stat_kernel_thread():
    st = parse_stat(KTHREAD)
    assert st.comm == "kthreadd" and st.kernel_thread and st.flags & PF_KTHREAD
    assert st.starttime_ticks == 24 and st.rss_pages == 0


@pytest.mark.parametrize("text", [
    "",  # empty
    "10580 (cat) R 10578 10578 2413 0 -1 4194304 100",  # truncated
    "10580 (cat",  # truncated inside comm
    "10580 cat R " + TAIL,  # no parentheses
    "abc (cat) " + TAIL,  # non-numeric pid
    "10580 (cat) R x 10578 2413 0 -1 4194304 100 0 0 0 7 3 0 0 20 0 4 0 56250 3133440 406",  # bad ppid
])
def test_parse_stat_malformed(text):
    with pytest.raises(ValueError):
        parse_stat(text)


# ---------------------------------------------------------------------------------- status
STATUS = """Name:\tcat
Umask:\t0022
State:\tR (running)
Tgid:\t10582
Pid:\t10582
PPid:\t10578
TracerPid:\t0
Uid:\t1000\t1001\t1002\t1003
Gid:\t100\t101\t102\t103
Groups:\t 
NStgid:\t10582\t7
NSpid:\t10582\t7
VmRSS:\t    1756 kB
Threads:\t3
"""


@pytest.mark.parametrize("text, expected", [
    (STATUS, dict(name="cat", pid=10582, ppid=10578, uid=1000, euid=1001, gid=100, egid=101, threads=3,
                  rss_bytes=1756 * 1024, nspid=[10582, 7])),
    ("", dict(name="", pid=0, ppid=0, uid=-1, euid=-1, gid=-1, egid=-1, threads=0, rss_bytes=None, nspid=[])),
    # kernel thread: no Vm* lines; a name with spaces (and trailing space) is kept
    ("Name:\tkworker/u4:1 x \nPid:\t9\nPPid:\t2\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nThreads:\t1\nNSpid:\t9\n",
     dict(name="kworker/u4:1 x ", pid=9, ppid=2, uid=0, euid=0, gid=0, egid=0, threads=1, rss_bytes=None,
          nspid=[9])),
    # truncated mid-file: what was read is kept
    ("Name:\tcat\nPid:\t5\nPPid:\t1\nUid:\t1000", dict(name="cat", pid=5, ppid=1, uid=-1, threads=0)),
    # malformed values leave defaults, garbage lines ignored
    ("Name:\tx\nPid:\tabc\ngarbage line\nUid:\t\nVmRSS:\tlots kB\nThreads:\t2\n",
     dict(name="x", pid=0, uid=-1, rss_bytes=None, threads=2)),
])
def test_parse_status(text, expected):
    st = parse_status(text)
    for key, value in expected.items():
        assert getattr(st, key) == value, key


# --------------------------------------------------------------------------- cmdline/environ
@pytest.mark.parametrize("text, expected", [
    ("/usr/sbin/nginx\0-g\0daemon off;\0", ["/usr/sbin/nginx", "-g", "daemon off;"]),
    ("", []),
    ("\0", [""]),
    ("prog\0\0x\0", ["prog", "", "x"]),  # empty argument kept
    ("postgres: checkpointer   ", ["postgres: checkpointer   "]),  # setproctitle, no NUL
    ("python3\0-c\0trunc", ["python3", "-c", "trunc"]),  # truncated: no final NUL
])
def test_parse_cmdline(text, expected):
    assert parse_cmdline(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("PATH=/usr/bin:/bin\0HOME=/root\0", {"PATH": "/usr/bin:/bin", "HOME": "/root"}),
    ("", {}),
    ("\0\0", {}),
    ("OPTS=a=b=c\0", {"OPTS": "a=b=c"}),  # value holds '='
    ("BROKEN\0X=1\0", {"BROKEN": "", "X": "1"}),  # malformed entry kept with empty value
    ("EMPTY=\0", {"EMPTY": ""}),
    ("A=1\0A=2\0", {"A": "1"}),  # first wins, as getenv
    ("A=1\0B=tru", {"A": "1", "B": "tru"}),  # truncated
    ("=x\0", {"": "x"}),
])
def test_parse_environ(text, expected):
    assert parse_environ(text) == expected


# ------------------------------------------------------------------------------------ links
@pytest.mark.parametrize("target, expected", [
    ("/usr/sbin/nginx", Link("/usr/sbin/nginx", False)),
    ("/usr/sbin/nginx (deleted)", Link("/usr/sbin/nginx", True)),
    ("/opt/my app/bin/x (deleted)", Link("/opt/my app/bin/x", True)),
    ("", Link("", False)),
    ("/", Link("/", False)),
])
def test_parse_link(target, expected):
    assert parse_link(target) == expected


@pytest.mark.parametrize("target, expected", [
    ("net:[4026531840]", 4026531840),
    ("net:[]", 0),
    ("net:[40265", 0),
    ("mnt:[4026531841]", 0),
    ("", 0),
    ("net:[abc]", 0),
])
def test_parse_ns_inode(target, expected):
    assert parse_ns_inode(target) == expected


# ------------------------------------------------------------------------------------- maps
MAPS = """565245768000-56524576a000 r--p 00000000 fe:00 260131                     /usr/bin/cat
565253192000-5652531b3000 rw-p 00000000 00:00 0                          [heap]
7f638e1a6000-7f638e1c8000 rw-p 00000000 00:00 0 
7f638e1c8000-7f638e21f000 r--p 00000000 fe:00 329635                     /usr/lib/locale/C.utf8/LC_CTYPE
7f638e22b000-7f638e251000 r--p 00000000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f638e251000-7f638e3a7000 r-xp 00026000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f638e40e000-7f638e415000 r--s 00000000 fe:00 338846                     /usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache
7f0000000000-7f0000001000 r-xp 00000000 fe:00 111                        /usr/lib/x86_64-linux-gnu/libssl.so.3 (deleted)
7f0000001000-7f0000002000 r-xp 00000000 fe:00 112                        /usr/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so
7f0000002000-7f0000003000 rw-s 00000000 00:01 2048                       /memfd:pulseaudio (deleted)
7f0000003000-7f0000004000 rw-s 00000000 00:01 2049                       /dev/zero (deleted)
7f0000004000-7f0000005000 rw-s 00000000 00:01 32768                      /SYSV00000000 (deleted)
7f0000005000-7f0000006000 rw-s 00000000 00:0f 1060                       anon_inode:[perf_event]
7f0000006000-7f0000007000 r--p 00000000 fe:00 113                        /srv/my data/file name.db
7f0000007000-7f0000008000 rw-p 00000000 00:00 0                          [anon:glibc malloc]
7f638e418000-7f638e41c000 r--p 00000000 00:00 0                          [vvar]
7f638e41c000-7f638e41e000 r-xp 00000000 00:00 0                          [vdso]
7ffd1a2b1000-7ffd1a2d2000 rw-p 00000000 00:00 0                          [stack]
7f0000008000-7f0000009000 r-xp 00000000 fe:00 114                        /lib64/ld-linux-x86-64.so.2
7f0000009000-7f000000a000 r--p 00000000 fe:00 115                        /usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_parse_maps_fields():
    entries = parse_maps(MAPS)
    assert len(entries) == 21
    first = entries[0]
    assert (first.start, first.end, first.perms, first.offset, first.dev, first.inode, first.path, first.deleted) == (
        0x565245768000, 0x56524576a000, "r--p", 0, "fe:00", 260131, "/usr/bin/cat", False)
    assert entries[2].path == "" and entries[2].inode == 0  # anonymous
    assert entries[5].offset == 0x26000
    deleted = [e for e in entries if e.deleted]
    assert [e.path for e in deleted] == ["/usr/lib/x86_64-linux-gnu/libssl.so.3", "/memfd:pulseaudio",
                                         "/dev/zero", "/SYSV00000000"]
    assert entries[13].path == "/srv/my data/file name.db"
    assert entries[-1].start == 0xffffffffff600000


def test_mapped_files_split():
    files = mapped_files(parse_maps(MAPS))
    assert files.libraries == [
        Link("/usr/lib/x86_64-linux-gnu/libc.so.6"),
        Link("/usr/lib/x86_64-linux-gnu/libssl.so.3", True),
        Link("/usr/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so"),
        Link("/lib64/ld-linux-x86-64.so.2"),
        Link("/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30"),
    ]
    assert files.files == [
        Link("/usr/bin/cat"),
        Link("/usr/lib/locale/C.utf8/LC_CTYPE"),
        Link("/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"),
        Link("/srv/my data/file name.db"),
    ]


@pytest.mark.parametrize("text, count", [
    ("", 0),
    ("\n\n", 0),
    ("565245768000-56524576a000 r--p 00000000 fe:00", 0),  # truncated line
    ("zzzz-56524576a000 r--p 00000000 fe:00 1 /x", 0),  # bad hex
    ("565245768000 r--p 00000000 fe:00 1 /x", 0),  # no range dash
    ("565245768000-56524576a000 r--p 00000000 fe:00 abc /x", 0),  # bad inode
    ("garbage\n565245768000-56524576a000 r--p 00000000 fe:00 1 /x\n1-2", 1),
    ("565245768000-56524576a000 r--p 00000000 fe:00 1                 /x/y (del", 1),  # truncated path
])
def test_parse_maps_malformed(text, count):
    assert len(parse_maps(text)) == count


@pytest.mark.parametrize("path, expected", [
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", True),
    ("/usr/lib/libfoo.so", True),
    ("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", True),
    ("/lib/ld-musl-x86_64.so.1", True),
    ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", True),
    ("/usr/bin/python3.11", False),
    ("/usr/lib/locale/locale-archive", False),
    ("/opt/app.so.d/config", False),
    ("/var/lib/x.sock", False),
])
def test_is_shared_library(path, expected):
    assert is_shared_library(path) is expected


# --------------------------------------------------------------------------------------- fd
@pytest.mark.parametrize("target, kind, path, inode, anon", [
    ("/var/log/nginx/access.log", fdmod.PATH, "/var/log/nginx/access.log", 0, ""),
    ("/dev/null", fdmod.PATH, "/dev/null", 0, ""),
    ("/tmp/x (deleted)", fdmod.DELETED, "/tmp/x", 0, ""),
    ("socket:[123456]", fdmod.SOCKET, "", 123456, ""),
    ("socket:[12", fdmod.SOCKET, "", 0, ""),  # truncated
    ("pipe:[98765]", fdmod.PIPE, "", 98765, ""),
    ("anon_inode:[eventpoll]", fdmod.ANON_INODE, "", 0, "eventpoll"),
    ("anon_inode:bpf-map", fdmod.ANON_INODE, "", 0, "bpf-map"),
    ("anon_inode:inotify", fdmod.ANON_INODE, "", 0, "inotify"),
    ("/memfd:wayland-shm (deleted)", fdmod.MEMFD, "wayland-shm", 0, ""),
    ("net:[4026531840]", fdmod.OTHER, "", 0, ""),
    ("", fdmod.OTHER, "", 0, ""),
])
def test_classify(target, kind, path, inode, anon):
    entry = fdmod.classify(7, target)
    assert (entry.fd, entry.target, entry.kind, entry.path, entry.inode, entry.anon) == (
        7, target, kind, path, inode, anon)


@pytest.mark.parametrize("text, pos, flags, mnt_id, ino", [
    ("pos:\t0\nflags:\t0100000\nmnt_id:\t24\nino:\t3\n", 0, 0o100000, 24, 3),
    ("pos:\t4096\nflags:\t02102001\nmnt_id:\t30\n", 4096, 0o2102001, 30, 0),
    ("", 0, 0, 0, 0),
    ("pos:\t12\nflags:\t01", 12, 0o1, 0, 0),  # truncated
    ("pos:\tx\nflags:\t9\nmnt_id:\t\ngarbage\n", 0, 0, 0, 0),  # malformed: 9 is not octal
    ("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\neventfd-count:\t0\neventfd-id: 1\n", 0, 0o2, 15, 1057),
])
def test_parse_fdinfo(text, pos, flags, mnt_id, ino):
    info = fdmod.parse_fdinfo(text)
    assert (info.pos, info.flags, info.mnt_id, info.ino) == (pos, flags, mnt_id, ino)


@pytest.mark.parametrize("flags, read, write, append, create, mode", [
    (0o100000, True, False, False, False, "r"),  # O_RDONLY|O_LARGEFILE
    (0o100001, False, True, False, False, "w"),
    (0o100002, True, True, False, False, "rw"),
    (0o102001, False, True, True, False, "wa"),  # O_WRONLY|O_APPEND
    (0o2102002, True, True, True, False, "rwa"),  # + O_CLOEXEC
    (0o101, False, True, False, True, "wc"),  # O_WRONLY|O_CREAT (from tracing openat)
])
def test_flag_helpers(flags, read, write, append, create, mode):
    assert fdmod.can_read(flags) is read
    assert fdmod.can_write(flags) is write
    assert fdmod.is_append(flags) is append
    assert fdmod.is_create(flags) is create
    assert fdmod.mode(flags) == mode


# ----------------------------------------------------------------------------------- cgroup
V1 = """12:pids:/system.slice/nginx.service
11:memory:/system.slice/nginx.service
4:cpu,cpuacct:/system.slice/nginx.service
1:name=systemd:/system.slice/nginx.service
0::/system.slice/nginx.service
"""


@pytest.mark.parametrize("text, entries, path", [
    ("0::/system.slice/sshd.service\n", [CgroupEntry(0, [], "/system.slice/sshd.service")],
     "/system.slice/sshd.service"),
    (V1, None, "/system.slice/nginx.service"),
    ("", [], ""),
    ("0::/\n", [CgroupEntry(0, [], "/")], "/"),
    # hybrid host: unified and systemd trees at the root, a v1 controller carries the placement
    ("9:name=systemd:/\n4:memory:/process_api/1cab40\n0::/\n", None, "/process_api/1cab40"),
    # systemd v1 line wins over other controllers
    ("4:memory:/a\n1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n", None,
     "/user.slice/user-1000.slice/session-3.scope"),
    # path containing ':' (containerd without delegation)
    ("0::/system.slice/containerd.service/kubepods-pod1.slice:cri-containerd:" + H + "\n", None,
     "/system.slice/containerd.service/kubepods-pod1.slice:cri-containerd:" + H),
    # truncated / malformed lines skipped
    ("garbage\nx:cpu:/a\n0::/system.sl", [CgroupEntry(0, [], "/system.sl")], "/system.sl"),
    ("4:memory", [], ""),
])
def test_parse_cgroup(text, entries, path):
    parsed = parse_cgroup(text)
    if entries is not None:
        assert parsed == entries
    assert cgroup_path(parsed) == path


POD = "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"
POD_ = POD.replace("-", "_")
ECS_TASK = "1e0f4d6c3e7a4e0b9a0f0e6a3b2c1d0e"


@pytest.mark.parametrize("path, expected", [
    # systemd units
    ("/system.slice/nginx.service", Derived("nginx.service")),
    ("/init.scope", Derived("init.scope")),
    ("/user.slice/user-1000.slice/session-3.scope", Derived("session-3.scope")),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/dbus.service", Derived("dbus.service")),
    ("/user.slice/user-1000.slice/user@1000.service/init.scope", Derived("init.scope")),
    ("/system.slice/system-getty.slice/getty@tty1.service", Derived("getty@tty1.service")),
    ("/system.slice/docker.service", Derived("docker.service")),
    ("/system.slice/containerd.service", Derived("containerd.service")),
    ("/system.slice/dev-hugepages.mount", Derived("dev-hugepages.mount")),
    ("/", Derived()),
    ("", Derived()),
    ("/system.slice", Derived()),
    ("/process_api/1cab40288f85c50c3cc8a0f4405e5e8c", Derived()),
    # docker
    ("/system.slice/docker-" + H + ".scope", Derived("", H, "docker")),
    ("/docker/" + H, Derived("", H, "docker")),
    ("/docker/" + H + "/system.slice/nginx.service", Derived("nginx.service", H, "docker")),
    ("/system.slice/docker-" + H + ".scope/init.scope", Derived("init.scope", H, "docker")),
    ("/docker/" + H + "/docker/" + H2, Derived("", H, "docker")),  # docker in docker: the outer one
    ("/moby/" + H, Derived("", H, "docker")),
    ("/actions_job/" + H, Derived("", H, "docker")),
    ("/docker/not-an-id", Derived()),
    ("/system.slice/docker-" + H[:12] + ".scope", Derived("docker-" + H[:12] + ".scope")),  # short id: no
    # containerd / CRI
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + POD_ + ".slice/cri-containerd-" + H
     + ".scope", Derived("", H, "containerd", POD)),
    ("/system.slice/containerd.service/kubepods-besteffort-pod" + POD_ + ".slice:cri-containerd:" + H,
     Derived("", H, "containerd", POD)),
    ("/k8s.io/" + H, Derived("", H, "containerd")),
    ("/default/" + H, Derived("", H, "containerd")),
    ("/system.slice/nerdctl-" + H + ".scope", Derived("", H, "containerd")),
    # cri-o
    ("/kubepods.slice/kubepods-pod" + POD_ + ".slice/crio-" + H + ".scope", Derived("", H, "crio", POD)),
    ("/kubepods.slice/kubepods-pod" + POD_ + ".slice/crio-conmon-" + H + ".scope",
     Derived("crio-conmon-" + H + ".scope")),  # conmon is not the container
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + POD_ + ".slice/crio-" + H
     + ".scope/container", Derived("", H, "crio", POD)),
    # kubernetes, cgroupfs driver (runtime unknown from the path)
    ("/kubepods/burstable/pod" + POD + "/" + H, Derived("", H, "kubepods", POD)),
    ("/kubepods/pod" + POD + "/" + H, Derived("", H, "kubepods", POD)),
    ("/kubepods/besteffort/pod" + POD, Derived()),  # pod cgroup itself, no container
    ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + POD_ + ".slice/docker-" + H
     + ".scope", Derived("", H, "docker", POD)),
    # podman
    ("/machine.slice/libpod-" + H + ".scope", Derived("", H, "podman")),
    ("/machine.slice/libpod-" + H + ".scope/container", Derived("", H, "podman")),
    ("/machine.slice/libpod-conmon-" + H + ".scope", Derived("libpod-conmon-" + H + ".scope")),
    ("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-" + H + ".scope",
     Derived("", H, "podman")),
    ("/libpod_parent/libpod-" + H, Derived("", H, "podman")),
    # lxc / lxd
    ("/lxc/web01", Derived("", "web01", "lxc")),
    ("/lxc/web01/system.slice/cron.service", Derived("cron.service", "web01", "lxc")),
    ("/lxc.payload.web01", Derived("", "web01", "lxc")),
    ("/lxc.payload.web01/system.slice/ssh.service", Derived("ssh.service", "web01", "lxc")),
    ("/lxc.monitor.web01", Derived()),
    ("/lxc.payload.", Derived()),
    # amazon ECS (EC2: docker ids; Fargate: <task>-<n>)
    ("/ecs/" + ECS_TASK + "/" + H, Derived("", H, "ecs", ECS_TASK)),
    ("/ecs/" + ECS_TASK + "/" + ECS_TASK + "-3574397394", Derived("", ECS_TASK + "-3574397394", "ecs", ECS_TASK)),
    ("/ecs/" + ECS_TASK, Derived()),
])
def test_derive(path, expected):
    assert derive(path) == expected


# ----------------------------------------------------------------------------------- limits
LIMITS = """Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max stack size            8388608              unlimited            bytes     
Max processes             96365                96365                processes 
Max open files            20000                20000                files     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
"""


def test_parse_limits():
    assert parse_limits(LIMITS) == [
        Limit("Max cpu time", "unlimited", "unlimited", "seconds"),
        Limit("Max stack size", "8388608", "unlimited", "bytes"),
        Limit("Max processes", "96365", "96365", "processes"),
        Limit("Max open files", "20000", "20000", "files"),
        Limit("Max nice priority", "0", "0", ""),
        Limit("Max realtime priority", "0", "0", ""),
        Limit("Max realtime timeout", "unlimited", "unlimited", "us"),
    ]


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("Limit                     Soft Limit           Hard Limit           Units     \n", []),
    ("Max cpu time              unlim", []),  # truncated row
    ("Max open files            1024                 4096", [Limit("Max open files", "1024", "4096", "")]),
    ("garbage\nMax open files 1024 4096 files\n", []),  # not column-aligned
])
def test_parse_limits_edge(text, expected):
    assert parse_limits(text) == expected


@pytest.mark.parametrize("text", [
    MAPS, "", "garbage\n", MAPS[: len(MAPS) // 2], MAPS.replace("/usr/bin/cat", "/usr/bin/c at (deleted)"),
    "7f00-7f01 r-xp 00000000 fe:00 1 /opt/app/lib/libx.so.1 (deleted)\n7f01-7f02 r--p 0 00:00 0 [heap]\n",
    "7f00-7f01 r-xp 00000000 fe:00 1 /memfd:jit (deleted)\n7f01-7f02 r--p 0 fe:00 2 /dev/zero (deleted)\n",
    "zzzz-56524576a000 r--p 00000000 fe:00 1 /x",  # bad hex
    "565245768000-56524576a000 r--p 00000000 fe:00 abc /x",  # bad inode
    "565245768000-56524576a000 r--p 00000000 fe:00",  # truncated line
    "garbage\n565245768000-56524576a000 r--p 00000000 fe:00 1 /x\n1-2",
])
def test_parse_mapped_files_equals_the_full_parse(text):
    """The fast path gives exactly what mapped_files(parse_maps(...)) gives, on good and bad input."""
    from asbuilt.probes.procfs.maps import mapped_files, parse_mapped_files, parse_maps

    assert parse_mapped_files(text) == mapped_files(parse_maps(text))
