"""Code that runs inside a real kernel and attacks the server through the kernel's own channels.

A kernel knows its connection key and holds its end of every connection the server made to it,
so it can send anything: through ipykernel's own sockets and session (signed, real libzmq), or
raw ZMTP bytes written straight to the file descriptor of a connection (any frames, any size,
on any channel, with or without a parent). `ATTACKS` defines the attacks; a test runs it
followed by one call, e.g. `ATTACKS + "raw('shell', huge_frames())"`. Used by tests/test_channels.py
and tests/test_starve.py.
"""

ATTACKS = r'''
import json, os, select, socket, struct, time
from ipykernel.kernelapp import IPKernelApp

_app = IPKernelApp.instance()
_k = _app.kernel
MiB = 1 << 20


def connection(channel):
    """The file descriptor of this kernel's end of the server's connection to `channel`, or None:
    a unix socket named as the channel's socket (accepted ones carry the listener's name) whose
    peer is another process (ipykernel's debugger connects to its own shell)."""
    path = f"{_app.ip}-{getattr(_app, channel + '_port')}"
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:["):
                continue
            with socket.socket(fileno=os.dup(int(name))) as s:
                if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM or s.getsockname() != path:
                    continue
                pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            continue
        if pid not in (0, os.getpid()):  # 0: a listening socket has no peer
            return int(name)
    return None


def frame(size, more=True):
    return struct.pack(">BQ", (1 if more else 0) | 2, size)


def signed(msg_type, content, parent=None, key=None):
    """The frames of a signed Jupyter message, as ipykernel's session makes them."""
    msg = _k.session.msg(msg_type, content, parent=parent if parent is not None else {})
    frames = _k.session.serialize(msg)
    if key is not None:
        frames[1] = b"0" * len(frames[1])
    return frames


def signed_raw(msg_type, content, parent=None):
    """`signed` with the content given as JSON bytes: a big one costs the kernel no serialising."""
    msg = _k.session.msg(msg_type, {}, parent=parent if parent is not None else {})
    parts = [_k.session.pack(msg["header"]), _k.session.pack(msg["parent_header"]), _k.session.pack({}), content]
    return [b"<IDS|MSG>", _k.session.sign(parts), *parts]


def display_bytes(n):
    """The JSON of a display_data content with `n` bytes of text."""
    return b'{"data": {"text/plain": "' + b"x" * n + b'"}, "metadata": {}}'


def encode(frames):
    return b"".join(frame(len(f), i < len(frames) - 1) + f for i, f in enumerate(frames))


def raw(channel, pieces):
    """Write `pieces` (bytes, an iterable of them) to the connection of `channel`, waiting while it
    is full; 'no connection' when the server has none to that channel."""
    fd = connection(channel)
    if fd is None:
        return "no connection"
    time.sleep(0.3)  # ipykernel's own messages for this cell are out first
    for piece in ([pieces] if isinstance(pieces, bytes) else pieces):
        view = memoryview(piece)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                select.select([], [fd], [], 5)
            except OSError as exc:
                return f"closed: {exc}"
    return "sent"


def head_then_body(head_frames, size, chunk=None):
    """A message whose last frame is `size` bytes, all of one reused buffer: what it costs the
    kernel is one chunk, whatever `size` is."""
    chunk = chunk or bytes(MiB)
    yield b"".join(frame(len(f)) + f for f in head_frames)
    yield frame(size, more=False)
    left = size
    while left > 0:
        piece = chunk if left >= len(chunk) else chunk[:left]
        yield piece
        left -= len(piece)


def huge(channel, size):
    """One signed-looking message whose content is `size` bytes, raw on `channel`."""
    frames = signed("stream", {"name": "stdout", "text": ""}, parent=_k.get_parent())
    return raw(channel, head_then_body(frames[:5], size))


def many_frames(channel, n):
    frames = signed("stream", {"name": "stdout", "text": "x"}, parent=_k.get_parent())
    def pieces():
        yield b"".join(frame(len(f)) + f for f in frames)
        empty = frame(0) * 4096
        for _ in range(n // 4096):
            yield empty
        yield frame(0, more=False)
    return raw(channel, pieces())


def fresh(channel, times, content=b'{"name": "stdout", "text": "x"}', msg_type="stream", parent=None):
    """`times` messages, each signed anew (a new msg_id) over the same content bytes, raw on `channel`."""
    return raw(channel, (encode(signed_raw(msg_type, content, parent)) for _ in range(times)))


def repeated(channel, frames, times):
    """The same signed message, written `times` times from one buffer."""
    data = encode(frames)
    return raw(channel, (data for _ in range(times)))


def iopub_send(frames, times):
    """Through ipykernel's own IOPub socket (libzmq), zero-copy: one buffer, `times` sends."""
    for _ in range(times):
        _k.iopub_socket.send_multipart(frames, copy=False)
    time.sleep(5)
    return "sent"
'''
