"""The port-capture probe: which application protocol a process speaks, and to whom.

Streaming probe over :class:`sniffer.Sniffer` (AF_PACKET, a libpcap-compiled kernel filter built
from the process's own ports, first packets of each flow only, bounded memory; a port leaves the
filter once its protocol is known, the socket turns inbound-only when nothing but DNS is left and
closes when nothing is) and
:mod:`protocols` (identification from the first payload bytes). Volumes are not reported: packet
and byte counts per peer come from the kernel's socket counters, not from what was captured.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional

from ..base import Context, Probe
from ..features import check_af_packet, check_libpcap
from .sniffer import CaptureLimits, CaptureObservations, NameObservation, PeerObservation, Port, Sniffer

__all__ = ["CaptureProbe", "CaptureLimits", "CaptureObservations", "PeerObservation", "NameObservation"]

log = logging.getLogger(__name__)


class CaptureProbe(Probe):
    """``start(ctx, ports, pcap_path=None, listening=None)``, ``set_ports(ports)``, ``drain()``, ``stop()``;
    ``rearm()`` to learn identified ports again, ``summary`` for coverage."""

    name = "capture"
    description = "application protocol per peer (HTTP, TLS SNI, PostgreSQL, Redis, DNS …) from the " \
                  "first packets of each flow on the process's ports (AF_PACKET + libpcap filter)"
    default = False
    needs = ("root", "af_packet", "libpcap")
    cost = "medium"

    def __init__(self, limits: Optional[CaptureLimits] = None) -> None:
        self.limits = limits or CaptureLimits()
        self.sniffer: Optional[Sniffer] = None

    def check(self, ctx: Context) -> Optional[str]:
        if not ctx.privileged:
            return "needs root (CAP_NET_RAW for AF_PACKET)"
        for feature in (check_af_packet(), check_libpcap()):
            if not feature.ok:
                return feature.detail
        try:
            import scapy.arch.common  # noqa: F401  optional import
        except (ImportError, OSError) as err:
            return f"scapy not importable: {err}"
        return None

    def start(self, ctx: Context, ports: Iterable[Port], pcap_path: Optional[str] = None,
              listening: Optional[Iterable[Port]] = None) -> None:
        """Begin capturing on ``ports`` ((proto, port) pairs). ``listening``: the process's listeners
        (decides inbound vs outbound; without it a port in ``ports`` whose peer's port is not counts as
        ours). Raises ProbeUnavailable, WriteError (pcap), ValueError (bad ports)."""
        self.sniffer = Sniffer(self.limits, listening=listening, pcap_path=pcap_path)
        self.sniffer.start(ports)
        log.info("probe=capture ports=%d filter_instructions=%d pcap=%s", len(self.sniffer.ports),
                 self.sniffer.stats["filter_instructions"], bool(pcap_path))

    def set_ports(self, ports: Iterable[Port], listening: Optional[Iterable[Port]] = None) -> None:
        """Watch ``ports`` from now on (same socket, new filter); optionally update the listeners."""
        if self.sniffer is None:
            raise RuntimeError("capture probe not started")
        if listening is not None:
            from .sniffer import normalise_ports
            self.sniffer.listening = normalise_ports(listening)
        self.sniffer.set_ports(ports)

    def rearm(self, ports: Optional[Iterable[Port]] = None) -> None:
        """Watch ``ports`` (all when None) again although their protocol is known, e.g. on a daemon rescan."""
        if self.sniffer is not None:
            self.sniffer.rearm(ports)

    @property
    def mode(self) -> str:
        """``full`` (both directions), ``inbound`` (DNS, ports idle past ``full_tap_seconds``) or ``closed``."""
        return self.sniffer.mode if self.sniffer is not None else "closed"

    @property
    def summary(self) -> str:
        """What was identified and when the socket narrowed or closed: the coverage line's reason."""
        return self.sniffer.summary() if self.sniffer is not None else ""

    def drain(self) -> CaptureObservations:
        """Peers and DNS names new or changed since the previous drain."""
        if self.sniffer is None:
            return CaptureObservations()
        return self.sniffer.drain()

    def stop(self) -> None:
        if self.sniffer is not None:
            self.sniffer.stop()

    @property
    def lost_events(self) -> int:
        return self.sniffer.lost_events if self.sniffer is not None else 0

    @property
    def stats(self) -> Dict[str, int]:
        return dict(self.sniffer.stats) if self.sniffer is not None else {}

    @property
    def error(self) -> Optional[str]:
        return self.sniffer.error if self.sniffer is not None else None
