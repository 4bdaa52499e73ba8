"""Who may migrate into a destination: pre-shared-key authentication, limits, stray connections,
and a migration between two network namespaces. Every refusal happens before a VM exists."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import wait_until
from vfmig import _core, auth
from vfmig import vm as vm_module
from vfmig.auth import Authenticator
from vfmig.errors import ConfigError, MigrationError
from vfmig.migration import MigrationOptions, migrate
from vfmig.migration.destination import Incoming, Limits, Listener
from vfmig.migration.wire import ControlChannel, encode_channel
from vfmig.testing import serve_destination
from vfmig.vm import MicroVM


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "psk"
    p.write_bytes(os.urandom(32).hex().encode())
    p.chmod(0o600)
    return p


@pytest.fixture
def vm_builds(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every VM the destination builds (none may be built for a refused source)."""
    built: list[object] = []
    real = vm_module.MicroVM.from_config.__func__  # type: ignore[attr-defined]

    def spy(cls: type, config: object) -> object:
        built.append(config)
        return real(cls, config)

    monkeypatch.setattr(vm_module.MicroVM, "from_config", classmethod(spy))
    return built


def running_vm() -> MicroVM:
    vm = MicroVM(memory="64M", rate_pps=20_000)
    vm.start()
    wait_until(lambda: vm.touches() > 0, "the guest to run")
    return vm


# the exchange on its own ------------------------------------------------------------------------
def test_psk_exchange_round_trip_and_rejects() -> None:
    key = os.urandom(32)
    src, dst = Authenticator(key), Authenticator(key)
    init, ns = src.client_init()
    challenge, ns_d, nd = dst.server_challenge(init)
    assert ns_d == ns
    response, s_session = src.client_finish(challenge, ns)
    d_session = dst.server_verify(response, ns, nd)
    # Both sides derive the same per-channel tokens; HELLO carries none; one channel's token
    # does not open another.
    assert [s_session.channel_token(i) for i in range(4)] == [d_session.channel_token(i) for i in range(4)]
    assert len({s_session.channel_token(i) for i in range(4)}) == 4
    assert len(s_session.channel_token(0)) == _core.TOKEN_LEN
    assert s_session.hello_token == bytes(_core.TOKEN_LEN)
    assert d_session.with_hello_token(bytes(_core.TOKEN_LEN)).channel_matches(2, s_session.channel_token(2))
    assert not d_session.channel_matches(3, s_session.channel_token(2))
    with pytest.raises(auth.AuthError, match="carries a session token"):
        d_session.with_hello_token(os.urandom(_core.TOKEN_LEN))
    # A wrong key on either side is caught, each by the side that checks.
    with pytest.raises(auth.AuthError, match="destination failed to prove"):
        Authenticator(os.urandom(32)).client_finish(challenge, ns)
    with pytest.raises(auth.AuthError, match="source failed to prove"):
        dst.server_verify(bytes(auth.MAC_LEN), ns, nd)
    # A response is bound to its nonces: replaying it against a fresh challenge fails.
    _, ns2, nd2 = dst.server_challenge(src.client_init()[0])
    with pytest.raises(auth.AuthError, match="source failed to prove"):
        dst.server_verify(response, ns2, nd2)
    with pytest.raises(auth.AuthError, match="bad length"):
        dst.server_challenge(init[:-1])
    with pytest.raises(auth.AuthError, match="reserved"):
        dst.server_challenge(init[:2] + b"\x01\x00" + init[4:])


def test_key_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"x" * 32)
    p.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.read_key(str(p))
    p.chmod(0o600)
    p.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16"):
        auth.read_key(str(p))
    with pytest.raises(ConfigError, match="cannot read key file"):
        auth.read_key(str(tmp_path / "missing"))


def test_non_loopback_listener_needs_a_key_or_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        Listener("tcp://0.0.0.0:0")
    res = run_cli("receive", "--listen", "tcp://0.0.0.0:0", "--timeout", "1")
    assert res.returncode == 2 and "--psk-file" in res.stderr, res.stderr
    Listener("tcp://0.0.0.0:0", Authenticator(None, allow_open=True)).close()


# over real migrations -----------------------------------------------------------------------------
@pytest.mark.usefixtures("kvm")
def test_psk_migration_completes_verified(key_file: Path) -> None:
    listener = Listener("tcp://127.0.0.1:0", Authenticator(auth.read_key(str(key_file))))
    with running_vm() as vm, serve_destination(listener) as dst:
        r = migrate(vm, dst.address, MigrationOptions(verify=True, channels=2, psk_file=str(key_file)))
        assert isinstance(dst.wait(), Incoming)
    assert r.status == "completed" and r.verification.memory_match is True


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize(
    ("source_key", "match"),
    [
        (None, "this destination requires a pre-shared key; the source offered none"),
        ("other", "the destination failed to prove it holds the pre-shared key"),
    ],
)
def test_source_without_the_key_is_refused_before_any_vm_exists(
    key_file: Path, tmp_path: Path, vm_builds: list[object], source_key: str | None, match: str
) -> None:
    psk_file = None
    if source_key:
        other = tmp_path / "other"
        other.write_bytes(os.urandom(32).hex().encode())
        other.chmod(0o600)
        psk_file = str(other)
    listener = Listener("tcp://127.0.0.1:0", Authenticator(auth.read_key(str(key_file))))
    with running_vm() as vm, serve_destination(listener, accept_timeout=3) as dst:
        threads = _core_threads()
        with pytest.raises(MigrationError, match=match):
            migrate(vm, dst.address, MigrationOptions(psk_file=psk_file))
        assert not vm.paused
        # The destination turned the source away and went on waiting; nothing was built.
        assert isinstance(dst.wait(), MigrationError)
        assert listener.auth_failures, "the refusal must be recorded"
        assert vm_builds == []
        assert _core_threads() <= threads


def _core_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_raw_client_with_a_bad_proof_is_refused(key_file: Path, vm_builds: list[object]) -> None:
    key = auth.read_key(str(key_file))
    with Listener("tcp://127.0.0.1:0", Authenticator(key)) as lst, serve_destination(lst, accept_timeout=5) as dst:
        s = socket.create_connection(("127.0.0.1", dst.port))
        ctrl = ControlChannel(s, "destination")
        ctrl.send("AUTH_INIT", auth.encode_init(auth.MODE_PSK, os.urandom(auth.NONCE_LEN)))
        ctrl.expect("AUTH_CHALLENGE", 5)
        ctrl.send("AUTH_RESPONSE", os.urandom(auth.MAC_LEN))
        with pytest.raises(MigrationError, match="source failed to prove it holds the pre-shared key"):
            ctrl.recv(5)
        ctrl.close()
        assert isinstance(dst.wait(), MigrationError)
    assert vm_builds == []
    assert any("failed to prove" in r for r in lst.refused)


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (Limits(max_memory=32 << 20), r"refused: the VM has 64.0 MiB of RAM, .* at most 32.0 MiB \(--max-memory\)"),
        (Limits(max_vcpus=0), r"refused: the VM has 1 vCPUs, this destination accepts 1..0"),
    ],
)
def test_limits_refuse_before_allocating(vm_builds: list[object], limits: Limits, match: str) -> None:
    listener = Listener("tcp://127.0.0.1:0", limits=limits)
    with running_vm() as vm, serve_destination(listener) as dst:
        with pytest.raises(MigrationError, match=match):
            migrate(vm, dst.address)
        assert isinstance(dst.wait(), MigrationError)
        assert not vm.paused
    assert vm_builds == []


@pytest.mark.usefixtures("kvm")
def test_stray_and_second_connections_do_not_disturb_a_migration() -> None:
    answers: dict[str, str] = {}

    def knock(name: str, opening: bytes) -> None:
        s = socket.create_connection(("127.0.0.1", dst.port), timeout=10)
        s.sendall(opening)
        try:
            ControlChannel(s, "destination").recv(10)
            answers[name] = "accepted?!"
        except MigrationError as e:
            answers[name] = str(e)
        finally:
            s.close()

    def strays(event: str, data: dict[str, object]) -> None:
        if event == "iteration" and data["index"] == 1:
            rec = _core.encode_record
            init = auth.encode_init(auth.MODE_OPEN, os.urandom(auth.NONCE_LEN))
            knock("second source", rec(_core.REC["AUTH_INIT"], init))
            knock("forged channel", rec(_core.REC["CHANNEL"], encode_channel(os.urandom(16), 0)))
            knock("garbage", b"GET / HTTP/1.0\r\n\r\n")

    with MicroVM(memory="128M", rate_pps=50_000) as vm, serve_destination() as dst:
        vm.start()
        wait_until(lambda: vm.touches() > 0, "the guest to run")
        r = migrate(vm, dst.address, MigrationOptions(verify=True, channels=2), progress=strays)
        assert isinstance(dst.wait(), Incoming)
        refused = dst.listener.refused
    assert r.status == "completed" and r.verification.memory_match is True
    assert "busy: a migration into this destination is already in progress" in answers["second source"]
    assert "unexpected page channel" in answers["forged channel"]
    assert "bad opening record" in answers["garbage"]
    assert len(refused) == 3, refused


# two hosts --------------------------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts(root: None) -> Iterator[tuple[str, str, str, str]]:
    """Two network namespaces joined by a veth pair: (source ns, source addr, dest ns, dest addr)."""
    if shutil.which("ip") is None:
        pytest.skip("no ip(8) on this host (iproute2)")
    tag = f"{os.getpid() % 10000}"
    a, b = f"vfmig-src-{tag}", f"vfmig-dst-{tag}"
    addr_a, addr_b = "10.251.0.1", "10.251.0.2"  # inside our own namespaces only
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", f"vfa{tag}", "netns", a, "type", "veth", "peer", "name", f"vfb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"vfa{tag}", addr_a), (b, f"vfb{tag}", addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {e.stderr.strip()}")
    try:
        yield a, addr_a, b, addr_b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in_ns(ns: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "vfmig", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.usefixtures("kvm")
def test_migration_between_two_network_namespaces(two_hosts: tuple[str, str, str, str], key_file: Path) -> None:
    src_ns, _, dst_ns, dst_addr = two_hosts
    sock = f"/tmp/vfmig-netns-{os.getpid()}.sock"
    procs: list[subprocess.Popen[str]] = []
    try:
        # Without a key, a destination on a real interface refuses to start at all.
        open_dst = _in_ns(dst_ns, "receive", "--listen", f"tcp://{dst_addr}:0", "--timeout", "5")
        procs.append(open_dst)
        _, err = open_dst.communicate(timeout=60)
        assert open_dst.returncode == 2 and "not a loopback address" in err, err

        dst = _in_ns(
            dst_ns,
            "receive",
            "--listen",
            f"tcp://{dst_addr}:0",
            "--psk-file",
            str(key_file),
            "--timeout",
            "60",
            "--run-seconds",
            "0.3",
        )
        procs.append(dst)
        assert dst.stdout is not None
        line = dst.stdout.readline()
        assert "listening on" in line, line + (dst.stderr.read() if dst.stderr else "")
        to = line.rsplit(" ", 1)[1].strip()
        src = _in_ns(src_ns, "vm", "run", "--memory", "128M", "--rate", "20000", "--control", sock, "--seconds", "0")
        procs.append(src)
        assert src.stdout is not None and "control socket" in src.stdout.readline()

        # A source without the key: refused, the VM keeps running where it is.
        res = run_cli("migrate", "--control", sock, "--to", to)
        assert res.returncode != 0 and "requires a pre-shared key" in res.stderr, res.stderr
        # With the key: a verified migration across the veth pair.
        res = run_cli("migrate", "--control", sock, "--to", to, "--psk-file", str(key_file), "--verify", "--json", "-")
        assert res.returncode == 0, res.stderr
        assert '"memory_match": true' in res.stdout
        _, err = dst.communicate(timeout=60)
        assert dst.returncode == 0, err
        assert "refused a connection" in err  # the keyless attempt, reported by the destination
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


# holding the door ---------------------------------------------------------------------------------
def _authenticated_raw(port: int, key: bytes) -> ControlChannel:
    """A control connection that has passed the key exchange, driven by hand."""
    ctrl = ControlChannel(socket.create_connection(("127.0.0.1", port)), "destination")
    a = Authenticator(key)
    init, ns = a.client_init()
    ctrl.send("AUTH_INIT", init)
    response, _ = a.client_finish(ctrl.expect("AUTH_CHALLENGE", 5), ns)
    ctrl.send("AUTH_RESPONSE", response)
    return ctrl


def test_keyed_hello_with_a_token_is_refused(key_file: Path, vm_builds: list[object]) -> None:
    from vfmig.migration.wire import Hello

    key = auth.read_key(str(key_file))
    lst = Listener("tcp://127.0.0.1:0", Authenticator(key))
    with serve_destination(lst) as dst:
        ctrl = _authenticated_raw(dst.port, key)
        cfg = {"memory": 64 << 20, "vcpus": 1, "guest": "idle", "tracker": "bitmap"}
        ctrl.send("HELLO", Hello(_core.STREAM_VERSION, 1, 64 << 20, 1, False, os.urandom(16), cfg).encode())
        with pytest.raises(MigrationError, match="carries a session token, which a keyed session never sends"):
            ctrl.recv(5)
        ctrl.close()
        assert isinstance(dst.wait(), MigrationError)
    assert vm_builds == []


@pytest.mark.usefixtures("kvm")
def test_a_peer_that_stalls_authentication_cannot_hold_the_listener(key_file: Path) -> None:
    from vfmig.migration.destination import Timeouts

    key = auth.read_key(str(key_file))
    lst = Listener("tcp://127.0.0.1:0", Authenticator(key), timeouts=Timeouts(setup_s=1.0))
    with running_vm() as vm, serve_destination(lst) as dst:
        # Claims the listener with AUTH_INIT, then announces a huge AUTH_RESPONSE and stalls.
        ctrl = ControlChannel(socket.create_connection(("127.0.0.1", dst.port)), "destination")
        ctrl.send("AUTH_INIT", auth.encode_init(auth.MODE_PSK, os.urandom(auth.NONCE_LEN)))
        ctrl.expect("AUTH_CHALLENGE", 5)
        huge = _core.encode_record(_core.REC["AUTH_RESPONSE"], bytes(1 << 16))
        ctrl.sock.sendall(huge[: _core.REC_HEADER_LEN + 1])
        with pytest.raises(MigrationError, match="exceeds the limit of 32"):
            ctrl.recv(5)
        # And one that sends a valid header, then nothing: dropped at the deadline.
        ctrl2 = ControlChannel(socket.create_connection(("127.0.0.1", dst.port)), "destination")
        ctrl2.send("AUTH_INIT", auth.encode_init(auth.MODE_PSK, os.urandom(auth.NONCE_LEN)))
        ctrl2.expect("AUTH_CHALLENGE", 5)
        ctrl2.sock.sendall(_core.encode_record(_core.REC["AUTH_RESPONSE"], bytes(32))[: _core.REC_HEADER_LEN + 3])
        wait_until(lambda: len(lst.auth_failures) == 2, "the stalled peer to be dropped")
        assert "did not answer in time" in lst.auth_failures[-1]
        ctrl.close()
        ctrl2.close()
        r = migrate(vm, dst.address, MigrationOptions(psk_file=str(key_file)))
        assert isinstance(dst.wait(), Incoming)
    assert r.status == "completed"


@pytest.mark.usefixtures("kvm")
def test_cli_receive_names_the_refusals_when_it_gives_up(key_file: Path) -> None:
    from vfmig.demo import start_destination

    with running_vm() as vm:
        proc, addr = start_destination(run_seconds=0.3, extra=["--psk-file", str(key_file), "--timeout", "3"])
        try:
            with pytest.raises(MigrationError, match="requires a pre-shared key"):
                migrate(vm, addr)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert not vm.paused
    assert proc.returncode == 2
    assert "refused a connection from 127.0.0.1" in err and "requires a pre-shared key" in err, err
    assert "no source authenticated in time; 1 connection(s) refused" in err, err


def test_cli_receive_checks_its_report_path_before_listening(tmp_path: Path) -> None:
    res = run_cli("receive", "--listen", "tcp://127.0.0.1:0", "--keep-running", "--json", str(tmp_path / "no/such/x"))
    assert res.returncode == 2 and "cannot write the report" in res.stderr, res.stderr
    assert "listening" not in res.stdout
