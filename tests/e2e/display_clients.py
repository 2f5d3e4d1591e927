"""Minimal real clients for the display tests: RFB 3.8 with VNC authentication, and a SPICE link.

Each speaks the protocol on the wire (no library hides the handshake): ``vnc_frame`` authenticates and
asks for one framebuffer update; ``spice_link`` sends a SpiceLinkMess for the main channel, encrypts the
ticket with the server's RSA public key (OAEP, SHA-1, as spice-gtk does) and returns the link result.
"""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, modes


class Refused(Exception):
    """The server refused the credentials (the reason it gave)."""


def _recv(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _vnc_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: DES-ECB of the challenge, the key being the password (8 bytes, zero-padded) with
    each byte's bits reversed. TripleDES with the same key three times (EDE) is single DES."""
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in password.encode()[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def vnc_frame(host: str, port: int, password: str, timeout: float = 20) -> tuple[int, int, int]:
    """Authenticate with ``password`` and read one framebuffer update: (width, height, rectangles).
    :raise Refused: When the server refuses the password."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        version = _recv(conn, 12)
        assert version.startswith(b"RFB 003."), version
        conn.sendall(b"RFB 003.008\n")
        count = _recv(conn, 1)[0]
        if count == 0:
            raise Refused(_recv(conn, struct.unpack(">I", _recv(conn, 4))[0]).decode())
        types = _recv(conn, count)
        assert 2 in types, f"no VNC authentication offered: {list(types)}"
        conn.sendall(b"\x02")
        conn.sendall(_vnc_response(password, _recv(conn, 16)))
        if struct.unpack(">I", _recv(conn, 4))[0] != 0:
            raise Refused(_recv(conn, struct.unpack(">I", _recv(conn, 4))[0]).decode())
        conn.sendall(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", _recv(conn, 4))
        _recv(conn, 16)  # pixel format
        _recv(conn, struct.unpack(">I", _recv(conn, 4))[0])  # desktop name
        conn.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # FramebufferUpdateRequest, full
        while True:
            kind = _recv(conn, 1)[0]
            if kind == 0:  # FramebufferUpdate
                _recv(conn, 1)
                rectangles = struct.unpack(">H", _recv(conn, 2))[0]
                return width, height, rectangles
            if kind == 2:  # Bell
                continue
            raise AssertionError(f"unexpected server message {kind} before the framebuffer update")


SPICE_MAGIC = b"REDQ"
SPICE_MAIN = 1
PUBKEY_BYTES = 162


def spice_link(host: str, port: int, ticket: str, timeout: float = 20) -> int:
    """Link to the main channel with ``ticket``: SPICE's link result (0: OK, 7: permission denied)."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        # SpiceLinkMess: connection id, channel type and id, no capabilities (the plain ticket auth follows).
        mess = struct.pack("<IBBIII", 0, SPICE_MAIN, 0, 0, 0, 18)
        conn.sendall(SPICE_MAGIC + struct.pack("<III", 2, 2, len(mess)) + mess)
        magic, major, _minor, size = struct.unpack("<4sIII", _recv(conn, 16))
        assert magic == SPICE_MAGIC and major == 2, (magic, major)
        reply = _recv(conn, size)
        error = struct.unpack("<I", reply[:4])[0]
        assert error == 0, f"SpiceLinkReply error {error}"
        key = serialization.load_der_public_key(reply[4:4 + PUBKEY_BYTES])
        assert isinstance(key, rsa.RSAPublicKey)
        oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        conn.sendall(key.encrypt(ticket.encode() + b"\0", oaep))
        return int(struct.unpack("<I", _recv(conn, 4))[0])
