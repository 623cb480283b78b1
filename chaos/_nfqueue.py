"""Delay packets in the kernel's own path: an NFQUEUE listener that holds each packet's verdict.

A netfilter rule ``-j NFQUEUE --queue-num N --queue-bypass`` hands matching packets to queue
``N``; this module binds that queue over a ``NETLINK_NETFILTER`` socket (copy mode "meta": only
the packet id crosses into userspace, never the payload) and accepts each packet when its
delay has passed. Unlike a proxy it delays every packet of every connection, established or
not, as a slow network would. ``--queue-bypass`` lets packets through when no process listens
(ours died), and the queue is set fail-open (a full queue accepts rather than drops).

Message layouts are from the kernel's UAPI headers ``linux/netlink.h``,
``linux/netfilter/nfnetlink.h`` and ``linux/netfilter/nfnetlink_queue.h``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Collection

LOGGER = logging.getLogger("chaos.netfault")

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET = 0
_NFQNL_MSG_VERDICT = 1
_NFQNL_MSG_CONFIG = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLMSG_ERROR = 0x2
_NFQA_PACKET_HDR = 1
_NFQA_VERDICT_HDR = 2
_NFQA_CFG_CMD = 1
_NFQA_CFG_PARAMS = 2
_NFQA_CFG_QUEUE_MAXLEN = 3
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
_NFQA_CFG_F_FAIL_OPEN = 0x1
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_CFG_CMD_UNBIND = 2
_NFQNL_COPY_META = 1
_NF_ACCEPT = 1
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (queue number, big-endian)
_NLATTR = struct.Struct("=HH")

#: Queue numbers tried by this module (a free one is taken).
QUEUE_RANGE = range(31000, 31000 + 2000)


def _attr(kind: int, payload: bytes) -> bytes:
    body = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def _message(msg_type: int, flags: int, queue: int, attrs: bytes, seq: int = 0) -> bytes:
    payload = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload),
                            (_NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0)
    return header + payload


def _attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        found[kind & 0x7FFF] = data[offset + _NLATTR.size: offset + length]
        offset += (length + 3) & ~3
    return found


class QueueError(OSError):
    """The queue could not be bound or configured."""


class PacketDelayer:
    """Holds packets of one NFQUEUE queue for ``delay`` ± ``jitter`` seconds, in order.

    :meth:`open` binds a free queue number (:attr:`queue`) and starts one daemon thread;
    :meth:`close` releases every held packet and unbinds.
    """

    def __init__(self, delay: float, jitter: float = 0.0) -> None:
        self.delay = delay
        self.jitter = jitter
        self.queue = -1
        self.packets = 0  # packets delayed so far
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self._seq = 0
        self._held: collections.deque[tuple[float, int]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="netfault-packet-delay")

    def open(self, avoid: Collection[int] = ()) -> PacketDelayer:
        """Bind a free queue number, skipping ``avoid`` (numbers that rules still name: a
        rule left by a dead process must not feed its packets to us)."""
        try:
            self._sock.bind((0, 0))
            with contextlib.suppress(OSError):  # room for bursts; root may exceed rmem_max
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 << 20)
            start = os.getpid() % len(QUEUE_RANGE)
            for offset in range(len(QUEUE_RANGE)):
                queue = QUEUE_RANGE[(start + offset) % len(QUEUE_RANGE)]
                if queue in avoid:
                    continue
                cmd = struct.pack("!BxH", _NFQNL_CFG_CMD_BIND, socket.AF_INET)
                error = self._request(queue, _attr(_NFQA_CFG_CMD, cmd))
                if error == 0:
                    self.queue = queue
                    break
                if error not in (errno.EBUSY, errno.EEXIST, errno.EPERM):
                    raise QueueError(error, f"NFQUEUE bind: {os.strerror(error)}")
            else:
                raise QueueError(errno.EBUSY, "no free NFQUEUE queue number")
            config = (_attr(_NFQA_CFG_PARAMS, struct.pack("!IB", 0, _NFQNL_COPY_META))
                      + _attr(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536))
                      + _attr(_NFQA_CFG_MASK, struct.pack("!I", _NFQA_CFG_F_FAIL_OPEN))
                      + _attr(_NFQA_CFG_FLAGS, struct.pack("!I", _NFQA_CFG_F_FAIL_OPEN)))
            error = self._request(self.queue, config)
            if error:
                raise QueueError(error, f"NFQUEUE configuration: {os.strerror(error)}")
        except BaseException:
            self._sock.close()
            raise
        self._thread.start()
        return self

    def _request(self, queue: int, attrs: bytes) -> int:
        """Send a config message and return the kernel's errno (0: done)."""
        self._seq += 1
        self._sock.send(_message(_NFQNL_MSG_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK, queue, attrs,
                                 self._seq))
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if msg_type == _NLMSG_ERROR and seq == self._seq:
                    code: int = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                    return -code
                offset += (length + 3) & ~3

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._held and self._held[0][0] <= now:
                    self._accept(self._held.popleft()[1])
                timeout = max(0.0, self._held[0][0] - now) if self._held else 0.2
                readable, _, _ = select.select([self._sock], [], [], min(timeout, 0.2))
                if readable:
                    self._receive()
        except OSError as exc:
            if not self._stop.is_set():
                LOGGER.error("packet delay on queue %d stopped: %s", self.queue, exc)

    def _receive(self) -> None:
        data = self._sock.recv(1 << 20)
        offset = 0
        last_due = self._held[-1][0] if self._held else 0.0
        while offset + _NLMSGHDR.size <= len(data):
            length, msg_type, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break
            if msg_type == (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
                start = offset + _NLMSGHDR.size + _NFGENMSG.size
                header = _attrs(data[start: offset + length]).get(_NFQA_PACKET_HDR)
                if header is not None:
                    (packet_id,) = struct.unpack_from("!I", header)
                    delay = self.delay
                    if self.jitter:
                        delay = max(0.0, delay + random.uniform(-self.jitter, self.jitter))
                    # In order: a packet is never released before the one queued before it.
                    last_due = max(last_due, time.monotonic() + delay)
                    self._held.append((last_due, packet_id))
                    self.packets += 1
            offset += (length + 3) & ~3

    def _accept(self, packet_id: int) -> None:
        verdict = _attr(_NFQA_VERDICT_HDR, struct.pack("!II", _NF_ACCEPT, packet_id))
        self._sock.send(_message(_NFQNL_MSG_VERDICT, _NLM_F_REQUEST, self.queue, verdict))

    def close(self) -> None:
        """Accept every held packet now, unbind the queue and stop the thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        with contextlib.suppress(OSError):
            # Packets still in the socket would be dropped at unbind: take and accept them.
            self._sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    self._receive()
            while self._held:
                self._accept(self._held.popleft()[1])
            cmd = struct.pack("!BxH", _NFQNL_CFG_CMD_UNBIND, socket.AF_INET)
            self._sock.send(_message(_NFQNL_MSG_CONFIG, _NLM_F_REQUEST, self.queue,
                                     _attr(_NFQA_CFG_CMD, cmd)))
        self._sock.close()
