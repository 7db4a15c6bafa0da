"""The receiver daemon: listens on the video and audio ports, one session per connection.

Connections are admitted against the total and per-address limits before any TLS work, then
complete the TLS handshake and the hello within ``AVD_HANDSHAKE_TIMEOUT_S``. Sessions are
kept by (sender id, stream): a reconnecting sender replaces its old session. SIGHUP reloads
the tokens file and closes the sessions of removed or changed tokens. Shutdown says goodbye
to every peer and waits for the sessions to end, within a deadline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from avd import protocol
from avd.accept import Acceptor, open_listeners, start_tls, until_readable
from avd.certs import seconds_until_expiry
from avd.clock import monotonic_us
from avd.config import ReceiverSettings, join_host_port
from avd.errors import ConfigError, ListenError
from avd.idclash import IdClashes
from avd.logs import CloseReason, LogEvent, connection_closed, log_event
from avd.logthrottle import LogThrottle, suppressed_note
from avd.media.base import MediaSink, StreamKind
from avd.metrics import ReceiverMetrics
from avd.ratelimit import AuthLockout, source_key
from avd.session import Session, SessionContext
from avd.tls import describe_tls, key_permission_problems, receiver_context
from avd.tokens import TokenStore, removed_or_changed

log = logging.getLogger("avd.receiver")


def format_peer(peername: object) -> str:
    """``ip:port`` for IPv4, ``[ip]:port`` for IPv6, from asyncio's peername."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return join_host_port(str(peername[0]), peername[1])
    return str(peername)


@dataclass
class Listening:
    video_port: int
    audio_port: int


class Receiver:
    def __init__(
        self,
        settings: ReceiverSettings,
        sink: MediaSink,
        metrics: ReceiverMetrics,
        *,
        acks_after_recording: bool = False,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.ssl_context: ssl.SSLContext = receiver_context(
            cert=settings.tls_cert,
            key=settings.tls_key,
            client_ca=settings.tls_client_ca,
            allow_tls12=settings.allow_tls12,
        )
        self._tokens = TokenStore.load(settings.tokens_file)
        self.limits = protocol.Limits(
            max_video_payload=settings.max_video_frame_kb * 1024,
            max_audio_payload=settings.max_audio_chunk_kb * 1024,
        )
        self.sessions: dict[tuple[str, StreamKind], Session] = {}
        # Where the recorder's done-reports go: kept past a sender's goodbye, until the
        # session has sent its last acknowledgement (``sessions`` forgets it earlier).
        self._ack_routes: dict[tuple[str, StreamKind], Session] = {}
        self._per_source: Tally[str] = Tally()  # admitted connections per source (source_key)
        self._handlers: set[asyncio.Task[None]] = set()
        # Handlers of connections not yet a registered session (TLS handshake, hello), with
        # their session once there is one: shutdown ends them at once, waiting for nothing.
        self._establishing: dict[asyncio.Task[Any], Session | None] = {}
        self._acceptors: list[Acceptor] = []
        self.ctx = SessionContext(
            tokens=lambda: self._tokens,
            metrics=metrics,
            sink=sink,
            limits=self.limits,
            heartbeat_s=settings.heartbeat_s,
            idle_timeout_s=settings.idle_timeout_s,
            register=self._register,
            unregister=self._unregister,
            finished=self._finished,
            auth_result=self._auth_result,
            acks_after_recording=acks_after_recording,
        )
        self._log_throttle = LogThrottle()
        self._id_clashes = IdClashes()
        self.lockout = AuthLockout(
            max_failures=settings.auth_max_failures,
            window_s=settings.auth_window_s,
            lockout_s=settings.auth_lockout_s,
        )
        for problem in key_permission_problems(settings.tls_key):
            log.warning("AVD_TLS_KEY: %s", problem)
        metrics.tls_cert_expiry.set_function(lambda: seconds_until_expiry(settings.tls_cert))

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> Listening:
        """Bind both ports (0 picks a free one) and start accepting."""
        ports = []
        for kind, port, variable in (
            (StreamKind.VIDEO, self.settings.video_port, "AVD_VIDEO_PORT"),
            (StreamKind.AUDIO, self.settings.audio_port, "AVD_AUDIO_PORT"),
        ):
            try:
                listeners = await open_listeners(self.settings.bind, port)
            except OSError as exc:
                self._stop_accepting()
                where = f"AVD_BIND={self.settings.bind} {variable}={port}"
                raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
            for listener in listeners:
                self._acceptors.append(Acceptor(listener, functools.partial(self._spawn, kind)))
            ports.append(listeners[0].getsockname()[1])
        return Listening(video_port=ports[0], audio_port=ports[1])

    def _stop_accepting(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors.clear()

    async def shutdown(self, deadline_s: float = 4.0) -> None:
        """Stop accepting, say goodbye to every session, wait for them, then cancel."""
        self._stop_accepting()
        for task, early in list(self._establishing.items()):
            if early is not None:
                early.close(CloseReason.SHUTDOWN)  # logged as such, not as an error
            task.cancel()
        for session in list(self.sessions.values()):
            session.close(CloseReason.SHUTDOWN)
        pending = set(self._handlers)
        if pending:
            _, still = await asyncio.wait(pending, timeout=deadline_s)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)

    def reload_tokens(self) -> None:
        """Re-read the tokens file (SIGHUP); close sessions whose token went away."""
        try:
            fresh = TokenStore.load(self.settings.tokens_file)
        except ConfigError as exc:
            log.error("tokens file not reloaded, keeping the previous one: %s", exc)
            return
        revoked = removed_or_changed(self._tokens, fresh)
        self._tokens = fresh
        message = f"tokens reloaded: {len(fresh)} senders, {len(revoked)} revoked"
        log_event(log, logging.INFO, LogEvent.CONFIG_RELOADED, message)
        for (sender_id, _), session in list(self.sessions.items()):
            if sender_id in revoked:
                session.close(CloseReason.TOKEN_REVOKED)

    def frames_done(self, batch: Iterable[tuple[str, StreamKind, int]]) -> None:
        """A recorder finished these frames: route them to their sessions' acks (loop only)."""
        by_session: dict[tuple[str, StreamKind], list[int]] = {}
        for sender_id, kind, seq in batch:
            by_session.setdefault((sender_id, kind), []).append(seq)
        for key, seqs in by_session.items():
            session = self._ack_routes.get(key)
            if session is not None:
                session.frames_done(seqs)

    def status_line(self) -> str:
        senders = sorted({sender for sender, _ in self.sessions})
        if not senders:
            return "listening, no senders connected"
        return f"{len(senders)} sender(s): {', '.join(senders[:8])}"

    # ---- connections -------------------------------------------------------------------

    def _register(self, session: Session) -> None:
        assert session.info is not None
        task = asyncio.current_task()  # the connection's handler: sessions run in it
        if task is not None:
            self._establishing.pop(task, None)
        key = (session.info.sender_id, session.info.kind)
        old = self.sessions.get(key)
        self.sessions[key] = session
        self._ack_routes[key] = session
        if old is not None and old is not session:
            log.info("%s reconnected: replacing its previous %s session", key[0], key[1].label)
            now_us = monotonic_us()
            clash = self._id_clashes.replaced(
                key[0],
                key[1].label,
                old_idle_s=(now_us - old.last_rx_us) / 1e6,
                old_ip=old.ip,
                new_ip=session.ip,
                now=now_us / 1e6,
            )
            if clash is not None:
                log.warning("%s", clash)
            old.close(CloseReason.REPLACED)

    def _finished(self, session: Session) -> None:
        assert session.info is not None
        key = (session.info.sender_id, session.info.kind)
        if self._ack_routes.get(key) is session:
            del self._ack_routes[key]

    def _unregister(self, session: Session) -> None:
        assert session.info is not None
        key = (session.info.sender_id, session.info.kind)
        if self.sessions.get(key) is session:
            del self.sessions[key]

    def _auth_result(self, ip: str, ok: bool) -> None:
        now = time.monotonic()
        if ok:
            self.lockout.record_success(ip, now)
        elif self.lockout.record_failure(ip, now):
            self.metrics.auth_lockouts.inc()
            log.warning(
                "locking out %s for %.0f s after %d failed authentications",
                ip,
                self.settings.auth_lockout_s,
                self.settings.auth_max_failures,
            )

    def _spawn(self, kind: StreamKind, sock: socket.socket, address: object) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(kind, sock, address))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _limit_reached(self, source: str) -> str | None:
        """The connection limit a new connection from ``source`` would exceed, as its
        setting."""
        s = self.settings
        # Admitted connections, not handlers: a burst accepted at once has a handler for
        # each before any of them is admitted, and would otherwise be refused whole.
        if self._per_source.total() >= s.max_connections:
            return f"AVD_MAX_CONNECTIONS={s.max_connections}"
        if self._per_source[source] >= s.max_connections_per_ip:
            return f"AVD_MAX_CONNECTIONS_PER_IP={s.max_connections_per_ip}"
        return None

    async def _handle(self, kind: StreamKind, sock: socket.socket, address: object) -> None:
        peer = format_peer(address)
        ip = str(address[0]) if isinstance(address, tuple) else peer
        # Per source, as the lockout counts: an IPv6 /64 is one, or a host stepping through
        # its 2^64 addresses would pass the per-address limit and flood the log line by line.
        source = source_key(ip)
        if self.lockout.is_locked(ip, time.monotonic()):
            # Refused unread and unlogged: the lockout itself was logged once.
            self.metrics.locked_out_connections.inc()
            sock.close()
            return
        if (limit := self._limit_reached(source)) is not None:
            self.metrics.handshake_failures.labels(reason="too-many-connections").inc()
            suppressed = self._log_throttle.admit("limit", source, time.monotonic())
            if suppressed is not None:
                log.warning(
                    "refused connection from %s: too many connections (%s)%s",
                    peer,
                    limit,
                    suppressed_note(suppressed),
                )
            sock.close()
            return
        self._per_source[source] += 1
        task = asyncio.current_task()
        assert task is not None  # _spawn gives each connection a task of its own
        self._establishing[task] = None
        try:
            await self._handle_admitted(kind, sock, peer, ip, task)
        finally:
            self._establishing.pop(task, None)
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    async def _handle_admitted(
        self, kind: StreamKind, sock: socket.socket, peer: str, ip: str, task: asyncio.Task[Any]
    ) -> None:
        timeout = self.settings.handshake_timeout_s
        started = monotonic_us()
        try:
            # Our own deadline fires first: asyncio's reports itself as an abort, not a timeout.
            async with asyncio.timeout(timeout):
                # No TLS state (hundreds of KiB of buffers) until the peer has sent something:
                # an idle flood then costs a socket each, not a TLS session each.
                await until_readable(sock)
                writer, incoming = await start_tls(
                    sock, self.ssl_context, handshake_timeout_s=timeout + 1
                )
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError) as exc:
            sock.close()
            self._tls_failed(kind, peer, ip, started, exc)
            return
        except Exception:
            log.exception("unexpected error in the TLS handshake of %s", peer)
            sock.close()
            return
        except BaseException:
            sock.close()  # cancelled (shutdown) mid-handshake
            raise
        try:
            version, cipher = describe_tls(writer.get_extra_info("ssl_object"))
            session = Session(
                self.ctx,
                writer,
                incoming,
                peer=peer,
                port_kind=kind,
                ip=ip,
                tls_version=version,
                tls_cipher=cipher,
            )
            if task in self._establishing:  # not yet ended by a shutdown
                self._establishing[task] = session
            await session.run(timeout - (monotonic_us() - started) / 1e6)
        except Exception:
            log.exception("unexpected error in the session of %s", peer)
            writer.transport.abort()

    def _tls_failed(
        self, kind: StreamKind, peer: str, ip: str, started_us: int, exc: BaseException
    ) -> None:
        reason = "tls-timeout" if isinstance(exc, TimeoutError) else "tls-error"
        self.metrics.handshake_failures.labels(reason=reason).inc()
        suppressed = self._log_throttle.admit(reason, source_key(ip), time.monotonic())
        if suppressed is None:
            return
        detail = getattr(exc, "reason", None) or type(exc).__name__
        log.info("TLS handshake with %s failed: %s%s", peer, detail, suppressed_note(suppressed))
        connection_closed(
            log,
            peer=peer,
            sender_id="-",
            stream=kind.label,
            duration_s=(monotonic_us() - started_us) / 1e6,
            frames_in=0,
            frames_out=0,
            bytes_in=0,
            bytes_out=0,
            reason=CloseReason.TIMEOUT if reason == "tls-timeout" else CloseReason.TLS_ERROR,
        )
