"""The profile model and its files: round trips, rejection of bad input, atomic owner-only writes."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import msgpack
import pytest

from asbuilt.agent.errors import ProfileError, WriteError
from asbuilt.agent.model import (SCHEMA_VERSION, FileRef, Host, Peer, Process, Profile, Socket,
                                 profile_from_dict, to_dict)
from asbuilt.agent.store import load_profile, parse_profile
from asbuilt.exporters.files import atomic_write, encode_profile, write_profile
from conftest import ECHO_SERVER


def sample() -> Profile:
    return Profile(host=Host(hostname="h1"), processes=[Process(
        pid=10, ppid=1, name="nginx", exe="/usr/sbin/nginx", cmdline=["nginx", "-g", "daemon off;"],
        files=[FileRef(path="/etc/nginx/nginx.conf", kind="config", mode="r", package="nginx-common",
                       owned=True, modified=False)],
        sockets=[Socket(proto="tcp", family="inet", state="LISTEN", local_address="0.0.0.0", local_port=80)],
        peers=[Peer(address="10.0.0.5", port=5432, proto="tcp", names=["db.internal"], connections=3,
                    bytes_sent=None, bytes_received=1200)],
        syscalls={"read": 10, "epoll_wait": 3})])


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_round_trip(fmt):
    p = sample()
    assert parse_profile(encode_profile(p, fmt)) == p


def test_json_and_msgpack_are_the_same_model():
    p = sample()
    assert json.loads(encode_profile(p, "json")) == msgpack.unpackb(encode_profile(p, "msgpack"))


def test_compact_leaves_out_defaults():
    d = to_dict(Process(pid=3))
    assert d == {"pid": 3}


BAD = [
    (b"", "empty file"),
    (b"hello world", "truncated or not a profile"),
    (b"{\"a\": 1", "truncated or not a profile"),
    (b"[1, 2, 3]", "not an asbuilt profile"),
    (json.dumps({"kind": "other"}).encode(), "not an asbuilt profile"),
    (json.dumps({"kind": "asbuilt-profile", "schema_version": 99}).encode(), "schema version 99"),
    (json.dumps({"kind": "asbuilt-profile"}).encode(), "schema version None"),
    (json.dumps({"kind": "asbuilt-profile", "schema_version": SCHEMA_VERSION,
                 "processes": {"a": 1}}).encode(), "processes: expected a list"),
    (json.dumps({"kind": "asbuilt-profile", "schema_version": SCHEMA_VERSION,
                 "processes": [{"pid": "1"}]}).encode(), "pid: expected an integer"),
    (json.dumps({"kind": "asbuilt-profile", "schema_version": SCHEMA_VERSION,
                 "host": {"nics": [{"mtu": True}]}}).encode(), "mtu: expected an integer"),
    (json.dumps({"kind": "asbuilt-profile", "schema_version": SCHEMA_VERSION,
                 "processes": [{"syscalls": {"read": "x"}}]}).encode(), "expected an integer"),
    (encode_profile(sample(), "msgpack")[:-7], "truncated or not a profile"),
    (b"\xc1\xc1\xc1", "truncated or not a profile"),
]


@pytest.mark.parametrize("raw,message", BAD)
def test_bad_input_is_one_line_profile_error(raw, message):
    with pytest.raises(ProfileError) as info:
        parse_profile(raw, "f")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keys_are_ignored():
    d = to_dict(sample())
    d["future_field"] = {"x": 1}
    d["processes"][0]["also_new"] = 1
    assert profile_from_dict(d) == sample()


def test_write_is_owner_only_and_atomic(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_profile(sample(), str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_profile(str(path)) == sample()
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temp left behind


def test_write_failure_is_a_write_error_and_keeps_old_file(tmp_path):
    target = tmp_path / "ro" / "p.msgpack"
    target.parent.mkdir()
    target.write_bytes(encode_profile(sample(), "msgpack"))
    with pytest.raises(WriteError):
        atomic_write(str(tmp_path / "missing-dir" / "x"), b"data")
    assert load_profile(str(target)) == sample()


def test_full_disk_keeps_old_file_and_leaves_no_temp(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        old = mnt / "p.msgpack"
        write_profile(sample(), str(old))
        with pytest.raises(WriteError) as info:
            atomic_write(str(old), b"x" * (1 << 20))
        assert "No space left" in str(info.value)
        assert load_profile(str(old)) == sample()
        assert sorted(f.name for f in mnt.iterdir()) == ["p.msgpack"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("raw", [b"", b"garbage", b'{"kind": "asbuilt-profile", "schema_version": 7}'])
def test_cli_show_bad_file_one_line_exit_2(tmp_path, raw):
    f = tmp_path / "bad.json"
    f.write_bytes(raw)
    r = subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", "show", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("asbuilt: ") and r.stderr.count("\n") == 1, r.stderr


def test_cli_show_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", "show", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "No such file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_undecodable_path_bytes_round_trip(fmt):
    odd = b"/srv/caf\xe9.conf".decode("utf-8", "surrogateescape")  # as procfs readers decode
    p = Profile(processes=[Process(pid=1, files=[FileRef(path=odd, kind="config")])])
    assert parse_profile(encode_profile(p, fmt)).processes[0].files[0].path == odd


def _packed_via_to_dict(p: Profile) -> bytes:
    return msgpack.packb(to_dict(p), use_bin_type=True, unicode_errors="surrogateescape")


def test_msgpack_encoder_is_byte_identical_to_to_dict_on_a_real_scan():
    """encode_profile's generated per-class encoders (msgpack default hook) write exactly the bytes
    of to_dict + packb: on the sample, on odd values and on a real scan of this host."""
    from asbuilt.agent.scan import scan
    from asbuilt.probes.base import Context, Roots

    odd = b"/srv/caf\xe9.conf".decode("utf-8", "surrogateescape")
    edge = Profile(processes=[Process(pid=1, files=[FileRef(path=odd, kind="config")], env={"LANG": "C"},
                                      peers=[Peer(address="::1", port=0, bytes_sent=0, names=[])])])
    ctx = Context(roots=Roots(proc="/proc", sys="/sys", rootfs="/"))
    ctx.options.update(packages=True, verify=False, cache_dir="")
    # A CI container may run only a handful of processes: start a listener and a few sleepers of our
    # own so the real scan carries sockets, libraries and files whatever the host runs.
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, "127.0.0.1"], stdout=subprocess.PIPE, text=True)
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    try:
        server.stdout.readline()
        real = scan(ctx)
    finally:
        for p in (server, *sleepers):
            p.kill()
            p.wait()
    assert {server.pid, *(p.pid for p in sleepers)} <= {p.pid for p in real.processes}
    mine = next(p for p in real.processes if p.pid == server.pid)
    assert mine.sockets and mine.libraries
    for p in (sample(), edge, real, Profile()):
        assert encode_profile(p, "msgpack") == _packed_via_to_dict(p)


def test_msgpack_encoder_refuses_what_is_not_a_model_object():
    p = Profile(processes=[Process(pid=1, env={"X": object()})])
    with pytest.raises(TypeError):
        encode_profile(p, "msgpack")
