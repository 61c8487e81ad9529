#!/usr/bin/env python3
"""A stand-in for the discord.py cog the relay talks to, for integration tests.

It speaks the same wire protocol as the real cog: the relay connects, writes
one message (a JSON object, or a pickled dict with ``--wire pickle``), shuts
down its write side, and reads the reply to EOF.  The reply is
``{'success': bool, 'message': str}`` in the same encoding.

Every message received is appended to ``--record PATH`` as one JSON line,
written and flushed *before* any reply goes out, so a test that has seen the
relay's answer can read exactly what the bot was sent:

    {"state": "...", "code": "...", "keys": [...], "raw_len": n, "wire": "json"}
    {"error": "...", "raw_len": n, "wire": "pickle"}      # undecodable message

A message that does not decode, or is not a dict with str ``state`` and
``code``, gets no reply: the connection is just closed, which is what the
real cog's handler amounts to when it raises on such a message.

Behaviours (``--behaviour``):
  approve      {'success': True,  'message': "You're registered, welcome to the tournament!"}
  refuse       {'success': False, 'message': "You're already signed up!"}
  silent       read the message, never reply, keep the connection open
  early-close  read the message, close without writing anything
  garbage      write bytes that do not decode (b"\\x80\\x04not a pickle at all" / b"not json{")
  oversize     write a well-formed reply of more than 100 KiB
  slow         sleep --delay seconds (default 10) then approve
  echo         approve with the --message text (default: a string full of HTML
               metacharacters); never echoes the state or code back
  demo         refuse when the state starts with "taken" ("You're already signed
               up!"), approve otherwise: one bot shows both pages (scripts/demo)

``--message`` overrides the reply text of any behaviour but oversize; ``--delay`` (if given)
is slept before replying in every behaviour.

Stdlib only.  Prints exactly one line ``listening on HOST:PORT`` (or
``listening on unix:PATH``) once ready; exits 0 on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import io
import json
import os
import pickle
import signal
import stat
import sys

APPROVE_MESSAGE = "You're registered, welcome to the tournament!"
REFUSE_MESSAGE = "You're already signed up!"
ECHO_DEFAULT_MESSAGE = "<b>bold</b> & \"double\" 'single' <script>alert(1)</script>"
OVERSIZE_BYTES = 100 * 1024
SLOW_DEFAULT_DELAY = 10.0

BEHAVIOURS = ("approve", "refuse", "silent", "early-close", "garbage", "oversize", "slow", "echo", "demo")


class _NoGlobalsUnpickler(pickle.Unpickler):
    """pickle.loads, minus the ability to import anything.

    The relay sends a dict of two strings, which needs no globals; refusing
    them keeps a misbehaving sender from running code in the test peer and
    shows up as a recorded decode error instead.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def pickle_loads(data):
    return _NoGlobalsUnpickler(io.BytesIO(data)).load()


class Bot:
    def __init__(self, args):
        self.wire = args.wire
        self.behaviour = args.behaviour
        self.delay = args.delay
        if self.delay is None and self.behaviour == "slow":
            self.delay = SLOW_DEFAULT_DELAY
        self.message = args.message
        self.record_file = open(args.record, "a", encoding="utf-8") if args.record else None
        self.forever = asyncio.Event()  # never set: "silent" waits on it

    # -- wire ---------------------------------------------------------------

    def decode(self, data):
        if self.wire == "pickle":
            return pickle_loads(data)
        return json.loads(data.decode("utf-8"))

    def encode(self, reply):
        if self.wire == "pickle":
            return pickle.dumps(reply)  # default protocol, like the real cog
        return json.dumps(reply).encode("utf-8")

    # -- record -------------------------------------------------------------

    def record(self, entry):
        if self.record_file is None:
            return
        self.record_file.write(json.dumps(entry) + "\n")
        self.record_file.flush()

    def check(self, msg, raw_len):
        """Returns the record line for a decoded message, or an error line."""
        base = {"raw_len": raw_len, "wire": self.wire}
        if not isinstance(msg, dict):
            return {"error": f"message is {type(msg).__name__}, not a dict", **base}
        for key in ("state", "code"):
            if key not in msg:
                return {"error": f"message has no {key!r} key", **base}
            if not isinstance(msg[key], str):
                return {"error": f"{key!r} is {type(msg[key]).__name__}, not str", **base}
        keys = sorted(k if isinstance(k, str) else repr(k) for k in msg)
        return {"state": msg["state"], "code": msg["code"], "keys": keys, **base}

    # -- replies ------------------------------------------------------------

    def reply_bytes(self, state):
        b = self.behaviour
        if b == "demo" and state.startswith("taken"):
            b = "refuse"
        if b == "garbage":
            return b"\x80\x04not a pickle at all" if self.wire == "pickle" else b"not json{"
        if b == "oversize":
            # --message is not applied: it would make the reply small again.
            return self.encode({"success": True, "message": "x" * OVERSIZE_BYTES})
        if b == "refuse":
            return self.encode({"success": False, "message": self.text(REFUSE_MESSAGE)})
        if b == "echo":
            return self.encode({"success": True, "message": self.text(ECHO_DEFAULT_MESSAGE)})
        # approve, slow
        return self.encode({"success": True, "message": self.text(APPROVE_MESSAGE)})

    def text(self, default):
        # An explicit --message "" is honoured: an empty message is a test case too.
        return default if self.message is None else self.message

    # -- connection ---------------------------------------------------------

    async def handle(self, reader, writer):
        close = True
        try:
            data = await reader.read()  # to EOF: the relay half-closes
            try:
                msg = self.decode(data)
            except Exception as exc:  # noqa: BLE001 - any decode failure is recorded
                self.record({"error": f"{type(exc).__name__}: {exc}", "raw_len": len(data), "wire": self.wire})
                log(f"undecodable message ({len(data)} bytes): {exc}")
                return
            entry = self.check(msg, len(data))
            self.record(entry)
            if "error" in entry:
                log(f"malformed message: {entry['error']}")
                return

            if self.delay:
                await asyncio.sleep(self.delay)
            if self.behaviour == "silent":
                close = False
                await self.forever.wait()
                return
            if self.behaviour == "early-close":
                return

            writer.write(self.reply_bytes(entry["state"]))
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError) as exc:
            log(f"connection error: {exc!r}")
        except asyncio.CancelledError:
            raise
        finally:
            if close:
                writer.close()
                try:
                    await writer.wait_closed()
                except (ConnectionError, OSError):
                    pass


def log(text):
    print(f"bot: {text}", file=sys.stderr, flush=True)


def format_addr(sockname):
    host, port = sockname[0], sockname[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


async def main(args):
    bot = Bot(args)
    if args.unix:
        try:
            if stat.S_ISSOCK(os.stat(args.unix).st_mode):
                os.unlink(args.unix)
        except FileNotFoundError:
            pass
        server = await asyncio.start_unix_server(bot.handle, path=args.unix, backlog=args.backlog)
        where = f"unix:{args.unix}"
    else:
        server = await asyncio.start_server(bot.handle, host=args.host, port=args.port, backlog=args.backlog)
        where = format_addr(server.sockets[0].getsockname())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    print(f"listening on {where}", flush=True)
    await stop.wait()
    server.close()
    if args.unix:
        try:
            os.unlink(args.unix)
        except OSError:
            pass
    # asyncio.run cancels the handlers still running (e.g. "silent" ones).


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wire", choices=("json", "pickle"), default="json")
    p.add_argument("--behaviour", choices=BEHAVIOURS, default="approve")
    p.add_argument("--delay", type=float, default=None, help="seconds to wait before replying")
    p.add_argument("--message", default=None, help="reply text (overrides the behaviour's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--unix", default=None, metavar="PATH", help="listen on a unix socket instead")
    p.add_argument("--record", default=None, metavar="PATH", help="append one JSON line per message")
    p.add_argument("--backlog", type=int, default=1024,
                   help="connections the kernel queues while the bot is busy (a sign-up burst needs many)")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        asyncio.run(main(parse_args()))
    except KeyboardInterrupt:
        pass
    sys.exit(0)
