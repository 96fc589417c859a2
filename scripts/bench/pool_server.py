#!/usr/bin/env python3
"""The lecture's "Asynchronous multiprocessing server", kept as the baseline
that scripts/bench.sh measures udp-pool against.

The lecture's server binds one UDP socket, starts multiprocessing.Pool(4),
and for every datagram calls pool.apply_async(send_message, (socket,
address)); a pool worker sends the reply on that socket, naming its own pid.
This file keeps that design: one receiving loop in the parent, a Pool of N
workers, one apply_async per datagram, and the worker (not the parent)
replying on the shared socket.

What differs, and why:
* The lecture passes the socket itself to apply_async. Python 3 cannot
  pickle a socket ("cannot pickle 'socket' object"), so that call fails in
  the pool's task thread and the lecture's server, run as written on
  Python 3, never replies. Here the socket is created and bound *before*
  the Pool, which is started with the fork start method, and handed to each
  worker once through the pool initializer (fork passes initargs by
  inheritance, not by pickling). Each apply_async then carries only the
  datagram and the client address, pickled through the pool's task pipe:
  the same hop udp-pool's master makes to its workers.
* The lecture's worker only greets. This one speaks udp-pool's two dialects
  (docs/PROTOCOL.md) for square and hello, so loadgen can drive it and
  check every reply: JSON requests with ids, and the lecture's plain text
  (a number gets its square, other text the greeting).
* The lecture prints a line per datagram in the parent and in the worker.
  That is off unless --verbose: printing would be what gets measured.

Python 3.11 standard library only. Stops on SIGTERM or SIGINT.
"""

import argparse
import json
import multiprocessing
import os
import signal
import socket
import sys
import time

# The worker's copy of the server socket, set once by the pool initializer.
_server_socket = None
_verbose = False

MAX_SLEEP_MS = 10_000


def _init_worker(server_socket, verbose):
    """Pool initializer: keep the inherited socket (fork, not pickling)."""
    global _server_socket, _verbose
    _server_socket = server_socket
    _verbose = verbose
    # The parent handles SIGINT/SIGTERM and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _greeting(address):
    return "Hi " + address[0] + ":" + str(address[1]) + ". This is server " + str(os.getpid())


def _number(text):
    """A text number as an int (exact) or a float, or None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        x = float(text)
    except ValueError:
        return None
    # "inf" and "nan" are greetings in udp-pool's text dialect.
    return x if x == x and x not in (float("inf"), float("-inf")) else None


def _json_reply(data, address):
    pid = os.getpid()
    try:
        request = json.loads(data)
        if not isinstance(request, dict):
            raise ValueError("a request must be a JSON object")
    except ValueError as e:
        return {"ok": False, "error": "bad_request", "message": "malformed JSON request: %s" % e,
                "worker_pid": pid}
    op = request.get("op")
    if op == "square":
        n = request.get("n")
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            reply = {"ok": False, "error": "bad_request", "message": "field n must be a number"}
        else:
            reply = {"ok": True, "op": "square", "result": n * n}
    elif op == "hello":
        reply = {"ok": True, "op": "hello", "message": _greeting(address)}
        if isinstance(request.get("pid"), int):
            reply["client_pid"] = request["pid"]
    elif op == "sleep":
        ms = request.get("ms")
        if not isinstance(ms, int) or not 0 <= ms <= MAX_SLEEP_MS:
            reply = {"ok": False, "error": "out_of_range",
                     "message": "field ms must be between 0 and %d" % MAX_SLEEP_MS}
        else:
            time.sleep(ms / 1000)
            reply = {"ok": True, "op": "sleep", "slept_ms": ms}
    else:
        reply = {"ok": False, "error": "unknown_op", "message": "unknown op %r" % (op,)}
    reply["worker_pid"] = pid
    if "id" in request:
        reply["id"] = request["id"]
    return reply


def send_message(data, client_address):
    """The pool task: compute the reply and send it on the shared socket."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        message = "error: bad_request: payload is not valid UTF-8"
    else:
        stripped = text.strip()
        if stripped.startswith("{"):
            message = json.dumps(_json_reply(stripped, client_address), separators=(",", ":"))
        else:
            n = _number(stripped)
            message = _greeting(client_address) if n is None else str(n * n)
    _server_socket.sendto(str.encode(message), client_address)
    if _verbose:
        print("Sent to client: ", message)


def _report_error(e):
    print("pool_server: task failed: %r" % (e,), file=sys.stderr)


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=10001, help="UDP port (default 10001)")
    parser.add_argument("--workers", type=int, default=4, help="pool processes (default 4)")
    parser.add_argument("--verbose", action="store_true", help="print every datagram, as the lecture does")
    args = parser.parse_args()

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    server_socket = socket.socket(family, socket.SOCK_DGRAM)
    server_socket.bind((args.host, args.port))

    # Fork, so the workers inherit the bound socket through the initializer.
    context = multiprocessing.get_context("fork")
    pool = context.Pool(args.workers, initializer=_init_worker, initargs=(server_socket, args.verbose))

    buffer_size = 65535
    print("Server up and running at {}:{}".format(args.host, args.port), flush=True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while True:
            data, address = server_socket.recvfrom(buffer_size)
            if not data:
                continue  # an empty datagram gets no reply, as in udp-pool
            if args.verbose:
                print("Received message '{}' at {}:{}".format(data.decode(errors="replace"), address[0], address[1]))
            pool.apply_async(send_message, args=(data, address), error_callback=_report_error)
    except _Stop:
        pass
    finally:
        pool.terminate()
        pool.join()
        server_socket.close()


if __name__ == "__main__":
    main()
