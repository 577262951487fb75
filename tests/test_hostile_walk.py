"""The ring's CQ walk under hostile completion callbacks, on the host kernel
in bufring mode: a callback that forks and closes the ring, the queue or
nothing in the child and then returns into the walk, which goes on in the
child.  The walk reaches a request that may post more through a borrowed
pointer and the mapped CQ through pointers read once per batch: neither may
be touched in a child that let go of them, and the parent receives on."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest
from conftest import Pattern, connect_pair

import iouzcrx
from iouzcrx.errors import WrongProcess

KIB = 1024
TIMEOUT = 30
PEERS = 4


def child_exit(pid: int) -> int:
    """The child's exit code (a negative signal number if it died of one)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def drive_until_forked(ring: iouzcrx.Ring, children: list[int]) -> int:
    """Drain until a callback has forked; the exit code the process should
    end with if it is the child: 0 once its drain said WrongProcess (the
    clear error a child that returned into the walk must get), else 10."""
    deadline = time.monotonic() + TIMEOUT
    while not children and time.monotonic() < deadline:
        try:
            ring.wait(0.01)
        except WrongProcess:
            return 0
    return 10


@pytest.mark.parametrize("incremental", [False, True], ids=["classic", "incremental"])
@pytest.mark.parametrize("what", ["ring", "queue", "queue-ring", "nothing"])
def test_a_child_forked_in_on_data_returns_into_the_walk(ring, listener, incremental, what):
    """Several connections' CQEs in one batch; the first on_data forks.  The
    child closes what ``what`` names (the ring's close there only forgets its
    copies: in-flight set cleared, rings unmapped) and returns into the walk.
    The child must not crash: its next drain says WrongProcess, and it exits
    with the code it chose.  The parent's batch and receives go on exactly."""
    queue = iouzcrx.BufRingQueue(
        ring, incremental=incremental, area_size=1 << 20, buffer_size=16 * KIB
    )
    if incremental and not queue.incremental:
        queue.close()
        pytest.skip(str(queue.incremental_refused))
    parent = os.getpid()
    pairs = [connect_pair(listener) for _ in range(PEERS)]
    got = [bytearray() for _ in pairs]
    children: list[int] = []
    closers: dict[str, Callable[[], None]] = {"ring": ring.close, "queue": queue.close}

    def receiving(i: int) -> Callable[[memoryview], None]:
        def on_data(view: memoryview) -> None:
            if os.getpid() != parent:
                return  # the child's copy of the rest of the batch
            got[i].extend(view)
            if children:
                return
            pid = os.fork()
            if pid:
                children.append(pid)
                return
            # The child: close, then return into the walk.
            for name in what.split("-"):
                if name in closers:
                    closers[name]()

        return on_data

    receivers = [
        queue.recv_multishot(conn, on_data=receiving(i)) for i, (_, conn) in enumerate(pairs)
    ]
    ring.submit()
    first = [Pattern(i).doubled[:100] for i in range(PEERS)]
    for (client, _), payload in zip(pairs, first, strict=True):
        client.sendall(payload)
    code = 10
    try:
        code = drive_until_forked(ring, children)
        if os.getpid() != parent:
            # A second drain in the child fails the same way (the ring is
            # closed there, or the parent's).
            try:
                ring.wait(0.01)
                code = 11
            except (WrongProcess, ValueError):
                pass
    finally:
        if os.getpid() != parent:  # pragma: no cover - reports through its status
            os._exit(code)
    assert children, "no on_data ran"
    assert child_exit(children[0]) == 0
    # The parent's batch and later data arrive byte-exact.
    later = [Pattern(i).doubled[100 : 40 * KIB] for i in range(PEERS)]
    for (client, _), payload in zip(pairs, later, strict=True):
        client.sendall(payload)
    deadline = time.monotonic() + TIMEOUT
    while any(len(g) < 40 * KIB for g in got) and time.monotonic() < deadline:
        ring.wait(0.01)
    assert all(bytes(got[i]) == Pattern(i).doubled[: 40 * KIB] for i in range(PEERS))
    for receiver in receivers:
        receiver.close()
    ring.wait_for(lambda: all(r.finished for r in receivers), TIMEOUT)
    assert queue.stats()["buffers_in_use"] == 0, queue.stats()
    for client, conn in pairs:
        client.close()
        conn.close()
    queue.close()


@pytest.mark.parametrize("close_ring", [False, True], ids=["keep", "close-ring"])
def test_a_child_forked_in_an_accept_callback_returns_into_the_walk(ring, close_ring):
    """A multishot accept whose Completion only the ring holds (the caller
    dropped it): its callback forks, the child forgets the ring (which
    clears the in-flight set holding that very request) and returns.  The
    child exits cleanly; the parent accepts on."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    parent = os.getpid()
    accepted: list[int] = []
    children: list[int] = []

    def on_accept(res: int, flags: int) -> None:
        if os.getpid() != parent:
            return
        if res >= 0:
            accepted.append(res)
        if children:
            return
        pid = os.fork()
        if pid:
            children.append(pid)
        elif close_ring:
            ring.close()

    ring.accept(ls, callback=on_accept)  # dropped: the ring holds it
    ring.submit()
    clients = [socket.create_connection(ls.getsockname()) for _ in range(PEERS)]
    code = 10
    try:
        code = drive_until_forked(ring, children)
    finally:
        if os.getpid() != parent:  # pragma: no cover - reports through its status
            os._exit(code)
    assert children
    assert child_exit(children[0]) == 0
    clients += [socket.create_connection(ls.getsockname()) for _ in range(PEERS)]
    ring.wait_for(lambda: len(accepted) == len(clients), TIMEOUT)
    for fd in accepted:
        os.close(fd)
    for client in clients:
        client.close()
    ls.close()


@pytest.mark.parametrize("how", ["close", "detach"])
def test_a_starved_receive_never_restarts_on_an_fd_number_its_socket_gave_up(ring, listener, how):
    """A receive starved by the views it queued waits with its fd number;
    meanwhile the program closes (or detaches) the socket and the number
    goes to another connection.  Restarting must not receive from that
    one: the receive ends with EBADF, and the other connection's data stays
    in its socket for its own reader."""
    queue = iouzcrx.BufRingQueue(ring, area_size=64 * KIB, buffer_size=16 * KIB)
    client, conn = connect_pair(listener)
    receiver = queue.recv_multishot(conn)
    ring.submit()
    client.sendall(Pattern(1).doubled[: 128 * KIB])  # twice the area
    ring.wait_for(lambda: receiver.starved, TIMEOUT)
    views = [receiver.get(0) for _ in range(receiver.queued)]
    assert sum(len(v) for v in views) <= 64 * KIB
    number = conn.fileno()
    other_client, other = connect_pair(listener)
    detached = conn.detach() if how == "detach" else -1
    conn.close()
    if detached >= 0:
        os.close(detached)
    os.dup2(other.fileno(), number)  # the number now names another connection
    try:
        other_client.sendall(b"not for the starved receive")
        for view in views:
            view.release()
        del views
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
        assert isinstance(receiver.error, OSError), receiver.error
        leaked = b"".join(bytes(receiver.get(0)) for _ in range(receiver.queued))
        assert b"not for" not in leaked
        stolen = socket.socket(fileno=os.dup(number))
        stolen.settimeout(TIMEOUT)
        try:
            assert stolen.recv(64) == b"not for the starved receive"
        finally:
            stolen.close()
    finally:
        os.close(number)
    other.close()
    other_client.close()
    client.close()
    assert queue.stats()["buffers_in_use"] == 0, queue.stats()
    queue.close()


def open_sockets() -> dict[str, str]:
    """This process's socket fds, by number."""
    links = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd
        if link.startswith("socket:"):
            links[name] = link
    return links


# The writes the transport tries fail with EBADF: a fatal write error, reported.
@pytest.mark.allow_exception_handler
@pytest.mark.parametrize("how", ["close", "detach"])
async def test_a_transport_whose_socket_the_program_gave_up_never_touches_its_fd_number(
    tmp_path, how
):
    """connection_made takes the accepted connection's socket and closes
    (or detaches and closes) it, then opens a file, which gets the freed fd
    number.  Every transport call after that (get_extra_info twice, write,
    writelines, write_eof, close, abort) must leave that file alone, and
    many such connections leave no socket fd behind."""
    loop = asyncio.get_running_loop()
    files: list[tuple[int, int]] = []
    lost: list[BaseException | None] = []
    numbers: list[int] = []

    class GivesUp(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            sock = transport.get_extra_info("socket")
            assert transport.get_extra_info("socket") is sock
            numbers.append(sock.fileno())
            if how == "detach":
                os.close(sock.detach())
            else:
                sock.close()
            fd = os.open(tmp_path / f"kept{len(files)}", os.O_RDWR | os.O_CREAT)
            files.append((fd, os.fstat(fd).st_ino))
            assert transport.get_extra_info("socket") is sock
            for call in (
                lambda: transport.write(b"x" * 100),
                lambda: transport.writelines([b"a", b"b"]),
                transport.write_eof,
                transport.close,
                transport.close,
                transport.abort,
                lambda: transport.write(b"after close"),
            ):
                try:
                    call()
                except (OSError, RuntimeError, AttributeError):
                    pass  # refusing is fine: acting on the number is not

        def data_received(self, data: bytes) -> None:
            pass

        def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
            lost.append(exc)

    server = await loop.create_zcrx_server(GivesUp, "127.0.0.1", 0, mode="bufring")
    before = open_sockets()  # the listening socket's included
    port = server.sockets[0].getsockname()[1]
    conns = 20
    for _ in range(conns):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        await asyncio.wait_for(reader.read(), TIMEOUT)  # the server end goes
        writer.close()
        await writer.wait_closed()
    deadline = loop.time() + TIMEOUT
    while len(lost) < conns and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert len(lost) == conns
    for _ in range(5):
        await asyncio.sleep(0.01)  # any late write or close would land now
    assert len(files) == conns
    for fd, inode in files:
        assert os.fstat(fd).st_ino == inode  # still open, still that file
        assert os.pread(fd, 64, 0) == b""  # nothing written to it
        os.close(fd)
    server.close()
    await server.wait_closed()
    gc.collect()
    after = open_sockets()
    assert set(after.items()) - set(before.items()) == set()


@pytest.mark.parametrize("incremental", [False, True], ids=["classic", "incremental"])
def test_on_data_that_raises_and_switches_delivery_mid_run_loses_nothing(
    ring, listener, incremental
):
    """on_data raises Exception, KeyboardInterrupt and SystemExit in turn,
    switches itself off (on_data=None: views queue) and the queue's views
    are taken and on_data set again, and hands the receive to a bytes
    protocol; views are held throughout.  Every byte arrives once, in
    order, wherever it went; the drains raise the non-Exception ones;
    once everything is let go no buffer is in use."""
    queue = iouzcrx.BufRingQueue(
        ring, incremental=incremental, area_size=1 << 20, buffer_size=16 * KIB
    )
    if incremental and not queue.incremental:
        queue.close()
        pytest.skip(str(queue.incremental_refused))
    client, conn = connect_pair(listener)
    got = bytearray()
    held: list[memoryview] = []
    failures: list[BaseException] = []
    calls = [0]
    kinds = [ValueError, KeyboardInterrupt, SystemExit]

    class Copies(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.extend(data)

    def on_data(view: memoryview) -> None:
        got.extend(view)  # taken, then maybe refused: it counts as delivered
        held.append(view)
        calls[0] += 1
        step = calls[0] % 8
        if step in (1, 2, 3):
            raise kinds[step - 1](f"on_data refuses {calls[0]}")
        if step == 5:
            receiver.on_data = None  # the next views queue
        if step == 7:
            receiver.set_protocol_delivery(Copies())

    receiver = queue.recv_multishot(conn, on_data=on_data, on_error=failures.append)
    ring.submit()
    payload = Pattern(3).doubled[: 2 << 20]
    total = len(payload)
    sender = socket.socket(fileno=os.dup(client.fileno()))
    sender.setblocking(True)
    thread = threading.Thread(target=sender.sendall, args=(payload,))
    thread.start()
    raised: list[type] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(got) < total and time.monotonic() < deadline:
            try:
                ring.wait(0.01)
            except (KeyboardInterrupt, SystemExit) as exc:
                raised.append(type(exc))
            while receiver.queued:
                view = receiver.get(0)
                got.extend(view)
                held.append(view)
            if receiver.on_data is None and receiver.delivery == "views":
                receiver.on_data = on_data
            elif receiver.delivery == "bytes" and calls[0] < 40:
                receiver.on_data = on_data
            if len(held) > 8 or receiver.starved:
                for view in held:
                    view.release()
                held.clear()
    finally:
        thread.join(TIMEOUT)
        sender.close()
    assert bytes(got) == payload, (len(got), calls, receiver, receiver.error)
    assert calls[0] >= 4, calls
    assert all(isinstance(f, ValueError) for f in failures) and failures
    # One drain raises the first of the two it caught (both may fall in one).
    assert raised and set(raised) <= {KeyboardInterrupt, SystemExit}, raised
    for view in held:
        view.release()
    held.clear()
    assert queue.stats()["buffers_in_use"] == 0, queue.stats()
    assert 0 < queue.stats()["peak_buffers_in_use"] <= queue.total_buffers
    receiver.close()
    ring.wait_for(lambda: receiver.finished, TIMEOUT)
    client.close()
    conn.close()
    queue.close()


def test_threads_asking_for_an_accepted_connections_socket_all_get_the_one_that_owns_it():
    """get_extra_info("socket") from several threads at once (AcceptedFd.
    socket()): every caller gets the same, open socket object, which owns
    the fd; none gets a closed stand-in made by the thread that lost."""
    import sys

    from iouzcrx._receive import AcceptedFd

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(200):
            a, b = socket.socketpair()
            accepted = AcceptedFd(a.family, a.type, a.proto, a.detach())
            start = threading.Barrier(4)
            got: list[socket.socket] = []

            def ask(
                accepted: AcceptedFd = accepted,
                start: threading.Barrier = start,
                got: list[socket.socket] = got,
            ) -> None:
                start.wait(TIMEOUT)
                got.append(accepted.socket())

            threads = [threading.Thread(target=ask) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
            assert len(got) == 4
            assert all(s is got[0] for s in got), got
            assert got[0].fileno() >= 0 and accepted.socket() is got[0]
            accepted.close()
            b.close()
    finally:
        sys.setswitchinterval(old)


def test_an_accepted_fd_closed_while_its_socket_is_being_made_leaves_the_number_alone(
    monkeypatch,
):
    """Another thread closes the connection while socket() makes the socket
    object, and the number goes to a new file at once: the object made for
    the old fd must never act on that number (not even close it when it is
    collected); socket() answers with a closed socket instead."""
    from iouzcrx import _receive
    from iouzcrx._receive import AcceptedFd

    made = _receive._AcceptedSocket
    a, b = socket.socketpair()
    accepted = AcceptedFd(a.family, a.type, a.proto, a.detach())
    number = accepted.fileno()
    reused: list[int] = []

    def closed_meanwhile(*args: int) -> socket.socket:
        sock = made(*args)
        if len(args) == 4:
            accepted.close()
            reused.append(os.open(os.devnull, os.O_RDONLY))
        return sock

    monkeypatch.setattr(_receive, "_AcceptedSocket", closed_meanwhile)
    try:
        sock = accepted.socket()
        assert reused == [number], "the test needs the number reused at once"
        assert sock.fileno() == -1
        assert accepted.socket() is sock
        gc.collect()
        os.fstat(number)  # still the new file's
    finally:
        for fd in reused:
            os.close(fd)
        b.close()
