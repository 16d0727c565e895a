"""A DNS server for tests: answers A and TXT queries from tables over UDP on 127.0.0.1 (NXDOMAIN otherwise)."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset


class StubDns:
    def __init__(self, txt: dict[str, str] | None = None, a: dict[str, str] | None = None):
        self.txt = {_key(name): value for name, value in (txt or {}).items()}
        self.a = {_key(name): value for name, value in (a or {}).items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.sock.sendto(self._answer(dns.message.from_wire(wire)).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        name = _key(question.name.to_text())
        if question.rdtype == dns.rdatatype.TXT and name in self.txt:
            value = self.txt[name]
            chunks = [value[i : i + 255].encode() for i in range(0, len(value), 255)]
            rrset = response.find_rrset(response.answer, question.name, dns.rdataclass.IN, dns.rdatatype.TXT,
                                        create=True)
            rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks), 300)
        elif question.rdtype == dns.rdatatype.A and name in self.a:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", self.a[name]))
        elif name not in self.txt and name not in self.a:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


def _key(name: str) -> str:
    return name.rstrip(".").lower()
