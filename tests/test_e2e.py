"""End to end: the real daemons as subprocesses, real TLS on loopback, certificates and
tokens from avd's own code, test sources. These are the tests that claim the system works.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from avd.certs import CertPaths
from avd.media.base import StreamKind, VideoFormat
from avd.protocol import Connection, Goodbye, GoodbyeReason, Hello, Role

from .conftest import (
    Credentials,
    Daemon,
    Launcher,
    ReceiverHandle,
    metric,
    receiver_env,
    scrape,
    sender_env,
    sender_metrics_url,
    wait_until,
)
from .procwatch import pids_with_argument

pytestmark = pytest.mark.slow


def _received(handle: ReceiverHandle, sender: str, stream: str) -> float:
    return metric(handle.metrics(), "avd_frames_received_total", sender=sender, stream=stream)


def _good_sender_streaming(launch: Launcher, handle: ReceiverHandle) -> Daemon:
    """A video-only cam1 sender, once its frames arrive: the one an attack must not disturb."""
    sender = launch.sender(handle, "good", AVD_AUDIO_SOURCE="none")
    wait_until(lambda: _received(handle, "cam1", "video") > 5)
    return sender


@contextlib.contextmanager
def _tls_to(pki: CertPaths, port: int) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to the receiver's ``port``, trusting the test CA as a sender does."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        yield tls


def _log_time(log: str, pattern: str) -> float:
    """The time (epoch seconds) of the first text-format log line matching ``pattern``."""
    for line in log.splitlines():
        if re.search(pattern, line):
            stamp = re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line)
            assert stamp, line
            return datetime.fromisoformat(stamp.group(0).replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"no log line matches {pattern!r}")


def test_streams_video_and_audio_and_stops_cleanly(creds: Credentials, launch: Launcher) -> None:
    handle = launch.receiver()
    sender = launch.sender(handle)
    sender_url = sender_metrics_url(sender)
    wait_until(
        lambda: _received(handle, "cam1", "video") > 0 and _received(handle, "cam1", "audio") > 0
    )
    time.sleep(3)
    # Stop the sender first, so that every frame it counted as sent had time to arrive.
    sent = scrape(sender_url)
    assert sender.stop() == 0
    samples = handle.metrics()
    for stream, rate in (("video", 20), ("audio", 44100 / 1024)):
        got = metric(samples, "avd_frames_received_total", sender="cam1", stream=stream)
        sent_n = metric(sent, "avd_frames_sent_total", stream=stream)
        assert sent_n >= 2.5 * rate, f"{stream}: only {sent_n} sent in >3 s"
        assert got >= 0.95 * sent_n, f"{stream}: received {got} of {sent_n}"
        latency_count = metric(samples, "avd_frame_latency_seconds_count", stream=stream)
        assert latency_count > 0, f"no latency measured for {stream}"
        assert metric(samples, "avd_bytes_received_total", sender="cam1", stream=stream) > 0
    assert metric(samples, "avd_auth_failures_total") == 0
    assert metric(samples, "avd_frames_lost_total") == 0
    assert metric(samples, "avd_frames_rejected_total") == 0
    skew = [v for (name, labels), v in samples.items() if name == "avd_av_skew_seconds"]
    assert len(skew) == 1
    assert abs(skew[0]) < 0.5, skew
    log = handle.daemon.log_text()
    assert re.search(
        r"connection opened peer=127\.0\.0\.1:\d+ sender=cam1 stream=video tls=TLSv1\.3/", log
    )
    assert re.search(r"connection opened .*sender=cam1 stream=audio", log)
    assert re.search(r"connection closed .*sender=cam1 stream=video .*reason=bye", log), log[-3000:]
    assert handle.daemon.stop() == 0
    assert creds.tokens["cam1"] not in log
    assert creds.tokens["cam1"] not in sender.log_text()


def test_wrong_tokens_and_garbage_are_refused_while_a_good_sender_streams(
    pki: CertPaths, creds: Credentials, launch: Launcher
) -> None:
    handle = launch.receiver()
    _good_sender_streaming(launch, handle)

    # Another sender's token, and a token nobody issued.
    thief = launch.sender(handle, "thief", "cam2", creds.tokens["cam1"], AVD_AUDIO_SOURCE="none")
    stranger = launch.sender(handle, "stranger", "cam1", "x" * 43, AVD_AUDIO_SOURCE="none")
    wait_until(lambda: metric(handle.metrics(), "avd_auth_failures_total") >= 2)
    thief.wait_for_log(r"token refused|refused this sender's token")
    before = _received(handle, "cam1", "video")

    # Garbage: plaintext on the TLS port, random bytes after a TLS handshake, a huge length.
    with socket.create_connection(("127.0.0.1", handle.video_port)) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        raw.settimeout(5)
        # The receiver answers with at most a TLS alert and closes: the reads end, not hang.
        received = b""
        while chunk := raw.recv(4096):
            received += chunk
        assert len(received) < 100
    for payload in (b"\x00" * 64, b"AV\x01\x01" + struct.pack(">I", 2**31)):
        with _tls_to(pki, handle.video_port) as tls:
            tls.sendall(payload)
            tls.settimeout(5)
            reply = b""
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                while chunk := tls.recv(4096):
                    reply += chunk
            # At most a goodbye (protocol error), then the receiver closes.
            assert reply == b"" or reply.startswith(b"AV\x01\x07"), reply
    wait_until(lambda: _received(handle, "cam1", "video") >= before + 40)
    samples = handle.metrics()
    assert metric(samples, "avd_handshake_failures_total", reason="tls-error") >= 1
    assert metric(samples, "avd_handshake_failures_total", reason="protocol-error") >= 2
    log = handle.daemon.log_text()
    assert re.search(r"auth(entication)? failed .*peer=127\.0\.0\.1:\d+ .*cam2", log), log[-3000:]
    # The refused senders back off (to the 10 s cap) instead of hammering the receiver:
    # counted where it matters, at the receiver.
    failures_before = metric(handle.metrics(), "avd_auth_failures_total")
    time.sleep(3)
    assert metric(handle.metrics(), "avd_auth_failures_total") - failures_before <= 2
    assert stranger.proc.poll() is None
    assert thief.proc.poll() is None
    for token in creds.tokens.values():
        assert token not in log


def test_hello_must_arrive_within_the_handshake_timeout(pki: CertPaths, launch: Launcher) -> None:
    handle = launch.receiver(AVD_HANDSHAKE_TIMEOUT_S="1")
    with _tls_to(pki, handle.audio_port) as tls:
        tls.settimeout(5)
        started = time.monotonic()
        assert tls.recv(100) == b""
        assert time.monotonic() - started < 3
    wait_until(
        lambda: (
            metric(handle.metrics(), "avd_handshake_failures_total", reason="hello-timeout") == 1
        )
    )
    # A plain TCP connection that never starts TLS is dropped as well.
    with socket.create_connection(("127.0.0.1", handle.audio_port)) as raw:
        raw.settimeout(5)
        assert raw.recv(100) == b""
    wait_until(
        lambda: metric(handle.metrics(), "avd_handshake_failures_total", reason="tls-timeout") == 1
    )


def test_a_tls12_peer_and_an_untrusted_receiver_are_refused(
    pki: CertPaths, other_pki: CertPaths, launch: Launcher
) -> None:
    handle = launch.receiver()
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", handle.video_port)) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw, server_hostname="localhost")
    # A sender that trusts another CA refuses the receiver and says why, slowly.
    sender = launch.sender(handle, "distrust", AVD_TLS_CA=str(other_pki.ca_cert))
    sender.wait_for_log(r"certificate")
    assert metric(handle.metrics(), "avd_frames_received_total") == 0


def test_mutual_tls_requires_a_client_certificate(pki: CertPaths, launch: Launcher) -> None:
    handle = launch.receiver(AVD_TLS_CLIENT_CA=str(pki.ca_cert))
    client_cert = {"AVD_TLS_CERT": str(pki.sender_cert), "AVD_TLS_KEY": str(pki.sender_key)}
    launch.sender(handle, "with-cert", "cam1", AVD_AUDIO_SOURCE="none", **client_cert)
    launch.sender(handle, "no-cert", "cam2", AVD_AUDIO_SOURCE="none")
    wait_until(lambda: _received(handle, "cam1", "video") > 10)
    wait_until(
        lambda: metric(handle.metrics(), "avd_handshake_failures_total", reason="tls-error") >= 1
    )
    assert _received(handle, "cam2", "video") == 0


def test_sender_streams_again_within_2s_of_a_receiver_restart(launch: Launcher) -> None:
    handle = launch.receiver("receiver1")
    launch.sender(handle)
    wait_until(lambda: _received(handle, "cam1", "video") > 5)
    handle.daemon.proc.send_signal(signal.SIGKILL)
    handle.daemon.kill()
    time.sleep(1.5)  # the sender notices and starts backing off
    restarted = launch.receiver_again(handle, "receiver2")
    wait_until(
        lambda: (
            _received(restarted, "cam1", "video") > 0 and _received(restarted, "cam1", "audio") > 0
        ),
        10,
    )
    # Timed by the receiver's own log clock: from listening to both streams authenticated.
    log = restarted.daemon.log_text()
    ready = _log_time(log, r"listening on")
    opened = [_log_time(log, rf"connection opened .*stream={kind}") for kind in ("video", "audio")]
    assert 0 < max(opened) - ready < 2.0, log
    # Sequence numbers run on across the reconnect: nothing is miscounted as lost.
    assert metric(restarted.metrics(), "avd_frames_lost_total") < 5


def test_two_senders_at_once(launch: Launcher) -> None:
    handle = launch.receiver()
    for sender_id in ("cam1", "cam2"):
        launch.sender(handle, sender_id, sender_id)
    wait_until(
        lambda: all(
            _received(handle, s, k) > 10 for s in ("cam1", "cam2") for k in ("video", "audio")
        )
    )
    assert metric(handle.metrics(), "avd_connections_active", stream="video") == 2


def test_streams_over_ipv6_with_addresses_written_in_brackets(launch: Launcher) -> None:
    handle = launch.receiver(AVD_BIND="::1")
    sender = launch.sender(handle, AVD_RECEIVER_HOST="::1", AVD_AUDIO_SOURCE="none")
    wait_until(lambda: _received(handle, "cam1", "video") > 5)
    port = handle.video_port
    sender.wait_for_log(rf"video stream connected to \[::1\]:{port} \(session")
    assert f"sender cam1 -> [::1]:{port}/{handle.audio_port}," in sender.log_text()
    handle.daemon.wait_for_log(r"connection opened peer=\[::1\]:\d+ sender=cam1 stream=video")
    assert sender.stop() == 0


def test_two_senders_sharing_an_id_are_named_in_the_receivers_log(launch: Launcher) -> None:
    """A sender's env file and token copied to a second camera: the two replace each other
    for ever. Each sender says it was replaced; the receiver says why it keeps happening."""
    handle = launch.receiver()
    first = launch.sender(handle, "first", AVD_AUDIO_SOURCE="none")
    wait_until(lambda: _received(handle, "cam1", "video") > 5)
    second = launch.sender(handle, "second", AVD_AUDIO_SOURCE="none")
    handle.daemon.wait_for_log(
        r"WARNING .*cam1: its video sessions replaced each other \d+ times in the last 60 s "
        r"while still streaming, all from 127\.0\.0\.1: are two senders using the id cam1 "
        r"and its token\? Give each its own AVD_SENDER_ID and token",
        timeout=30,
    )
    for sender in (first, second):
        sender.wait_for_log("another sender connected with the same id 'cam1'")
        assert sender.stop() == 0
    assert handle.daemon.log_text().count("its video sessions replaced each other") == 1
    assert "replaced each other" not in first.log_text() + second.log_text()


def test_sighup_reload_closes_a_revoked_senders_sessions(
    creds: Credentials, launch: Launcher
) -> None:
    handle = launch.receiver()
    sender = launch.sender(handle)
    wait_until(lambda: _received(handle, "cam1", "video") > 5)
    lines = creds.tokens_file.read_text().splitlines()
    creds.tokens_file.write_text(
        "\n".join(line for line in lines if not line.startswith("cam1 ")) + "\n"
    )
    handle.daemon.proc.send_signal(signal.SIGHUP)
    handle.daemon.wait_for_log(r"reason=token-revoked")
    sender.wait_for_log(r"revoked")
    wait_until(lambda: metric(handle.metrics(), "avd_connections_active") == 0)


@pytest.mark.parametrize(
    ("role", "env", "variable"),
    [
        ("receiver", {"AVD_VIDEO_PORT": "not-a-port"}, "AVD_VIDEO_PORT"),
        ("receiver", {"AVD_TOKENS_FILE": "/nonexistent/tokens"}, "AVD_TOKENS_FILE"),
        # A folder it could never record to: said at start, not when a sender first connects.
        ("receiver", {"AVD_RECORD_DIR": "/dev/null/recordings"}, "AVD_RECORD_DIR"),
        ("sender", {"AVD_FPS": "0"}, "AVD_FPS"),
        ("sender", {"AVD_TLS_CA": "/nonexistent/ca.crt"}, "AVD_TLS_CA"),
    ],
)
def test_a_bad_setting_exits_78_naming_the_variable(
    pki: CertPaths,
    creds: Credentials,
    tmp_path: Path,
    role: str,
    env: dict[str, str],
    variable: str,
) -> None:
    handle = ReceiverHandle(None, 5000, 5001, "")  # type: ignore[arg-type]
    if role == "receiver":
        base = receiver_env(pki, creds.tokens_file)
    else:
        base = sender_env(pki, handle, "cam1", creds.tokens["cam1"])
    base.update(env)
    daemon = Daemon(role, base, tmp_path / "daemon.log")
    assert daemon.proc.wait(20) == 78
    daemon.stop()
    output = daemon.log_text()
    assert variable in output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("AVD_AUDIO_PORT", "{port}", "AVD_BIND=127.0.0.1 AVD_AUDIO_PORT={port}"),
        # It exited 78 (a bad setting, never restarted) where a busy port may pass.
        (
            "AVD_METRICS_ADDR",
            "127.0.0.1:{port}",
            "AVD_METRICS_ADDR: cannot listen on 127.0.0.1:{port}",
        ),
    ],
)
def test_a_port_in_use_exits_1_naming_the_variable(
    pki: CertPaths, creds: Credentials, tmp_path: Path, variable: str, value: str, said: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = receiver_env(pki, creds.tokens_file, AVD_RECORD_DIR=str(tmp_path / "rec"))
        env[variable] = value.format(port=port)
        daemon = Daemon("receiver", env, tmp_path / "daemon.log")
        assert daemon.proc.wait(20) == 1  # not 78: restartable, the port may be freed
    daemon.stop()
    # The recording process may outlive the daemon by a moment: what it says counts too.
    wait_until(lambda: not pids_with_argument(str(tmp_path / "rec")), timeout=10)
    output = daemon.log_text()
    assert said.format(port=port) in output
    assert "Address already in use" in output
    assert "Traceback" not in output
    # Its recording process, started first, was stopped: the one line is the only line.
    assert len(output.strip().splitlines()) == 1, output


def test_hello_for_the_wrong_port_is_refused(
    pki: CertPaths, creds: Credentials, launch: Launcher
) -> None:
    handle = launch.receiver()
    conn = Connection(Role.SENDER)
    hello = Hello(
        "cam1", StreamKind.VIDEO, VideoFormat(640, 480, 20, 70), creds.tokens["cam1"].encode()
    )
    with _tls_to(pki, handle.audio_port) as tls:
        tls.sendall(conn.send(hello))
        tls.settimeout(5)
        reply = tls.recv(200)
    # The token was right: a goodbye says why, as the sender's own setting is at fault.
    conn.receive_data(reply)
    assert conn.next_event() == Goodbye(
        GoodbyeReason.PROTOCOL_ERROR,
        "video stream on the audio port (are AVD_VIDEO_PORT and AVD_AUDIO_PORT swapped?)",
    )
    # A wrong token on the wrong port: refused, and nothing about why (the token comes first).
    stranger = Hello("cam1", StreamKind.VIDEO, VideoFormat(640, 480, 20, 70), b"w" * 43)
    with _tls_to(pki, handle.audio_port) as tls:
        tls.sendall(Connection(Role.SENDER).send(stranger))
        tls.settimeout(5)
        reply = tls.recv(100)
    assert reply == b"AV\x01\x03\x00\x00\x00\x00"


def _hello_from(
    address: str, port: int, pki: CertPaths, sender_id: str, token: bytes
) -> bytes | None:
    """One TLS hello from a given loopback source address; the reply, or None if cut off."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind((address, 0))
    raw.settimeout(5)
    try:
        raw.connect(("127.0.0.1", port))
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            hello = Hello(sender_id, StreamKind.VIDEO, VideoFormat(640, 480, 20, 70), token)
            tls.sendall(Connection(Role.SENDER).send(hello))
            return tls.recv(100)
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        raw.close()


def test_swapped_ports_are_named_to_the_sender_not_called_a_refused_token(
    launch: Launcher,
) -> None:
    """Its token is right, so the receiver says what is wrong: "token refused" sent its
    operator to the tokens file, at a pace that locked its address out."""
    handle = launch.receiver()
    swapped = {"AVD_VIDEO_PORT": str(handle.audio_port), "AVD_AUDIO_PORT": str(handle.video_port)}
    sender = launch.sender(handle, **swapped)
    sender.wait_for_log(
        r"WARNING avd.sender: video stream to 127\.0\.0\.1:\d+: the receiver turned the "
        r"stream away: video stream on the audio port \(are AVD_VIDEO_PORT and AVD_AUDIO_PORT "
        r"swapped\?\); retrying in 65\.0 s"
    )
    sender.wait_for_log(r"audio stream to .*: the receiver turned the stream away: audio stream")
    samples = handle.metrics()
    assert metric(samples, "avd_auth_failures_total") == 0  # nothing toward a lockout
    assert metric(samples, "avd_handshake_failures_total", reason="bad-hello") == 2
    log = handle.daemon.log_text()
    assert "refused cam1 from 127.0.0.1:" in log
    # Its token proved who it is: the close line names it.
    assert re.search(
        r"connection closed peer=\S+ sender=cam1 stream=\w+ .*reason=protocol-error", log
    )
    assert "token refused" not in sender.log_text()


def test_frames_over_the_receivers_limit_are_skipped_and_said_not_a_crash_loop(
    launch: Launcher,
) -> None:
    """A receiver taking at most 16 KiB a frame, a sender's 24 KiB frames: each session
    ended in a traceback and a reconnect, the audio stream's with nothing wrong."""
    handle = launch.receiver(AVD_MAX_VIDEO_FRAME_KB="16")
    sender = launch.sender(handle)
    url = sender_metrics_url(sender)
    wait_until(lambda: _received(handle, "cam1", "audio") > 40)  # the audio goes on
    oversized = metric(scrape(url), "avd_frames_oversized_total", stream="video")
    assert oversized > 10
    assert sender.stop() == 0
    log = sender.log_text()
    assert "Traceback" not in log
    assert "unexpected" not in log
    assert len(re.findall(r"video: a frame of \d+ bytes is larger than the receiver takes "
                          r"\(16384, its AVD_MAX_VIDEO_FRAME_KB", log)) == 1  # fmt: skip
    assert re.search(r"video: captured=\d+ sent=0 .* oversized=\d+", log)
    assert _received(handle, "cam1", "video") == 0
    assert log.count("stream connected to") == 2  # one session each: no reconnect loop


def test_repeated_failures_lock_an_address_out_but_not_a_good_sender(
    pki: CertPaths, creds: Credentials, launch: Launcher
) -> None:
    handle = launch.receiver(AVD_AUTH_MAX_FAILURES="3", AVD_AUTH_LOCKOUT_S="60")
    _good_sender_streaming(launch, handle)
    for _ in range(3):
        reply = _hello_from("127.0.0.2", handle.video_port, pki, "cam1", b"w" * 43)
        assert reply == b"AV\x01\x03\x00\x00\x00\x00"  # refused, nothing about why
    # Locked out now: even the right token from that address is cut off before TLS.
    assert (
        _hello_from("127.0.0.2", handle.video_port, pki, "cam1", creds.tokens["cam1"].encode())
        is None
    )
    samples = handle.metrics()
    assert metric(samples, "avd_auth_lockouts_total") == 1
    assert metric(samples, "avd_auth_locked_out_connections_total") >= 1
    before = _received(handle, "cam1", "video")
    wait_until(lambda: _received(handle, "cam1", "video") >= before + 20)
    log = handle.daemon.log_text()
    assert len(re.findall(r"locking out 127\.0\.0\.2", log)) == 1


def test_a_sender_whose_receiver_stays_away_past_its_spool_logs_the_loss(
    launch: Launcher,
) -> None:
    gone = launch.receiver("gone")
    gone.daemon.kill()  # its ports refuse: every frame waits in the spool, 1 s of them
    sender = launch.sender(gone, AVD_SPOOL_SECONDS="1", AVD_AUDIO_SOURCE="none")
    sender.wait_for_log(
        r"WARNING avd.sender: video: \d+ frames? left the spool before the receiver "
        r"acknowledged (it|them): lost \(the spool keeps 1 s of frames, AVD_SPOOL_SECONDS"
    )
    time.sleep(1.0)
    # Then quiet for a minute however many more go (the metric counts each one).
    assert len(re.findall(r"left the spool", sender.log_text())) == 1
    lost = metric(scrape(sender_metrics_url(sender)), "avd_frames_lost_total", stream="video")
    assert lost > 5
