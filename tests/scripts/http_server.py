"""`python -m http.server` with byte ranges, a request log and a way to drop connections (tests only).

    python tests/scripts/http_server.py DIR --log requests.jsonl [--drop NAME:BYTES] [--stall NAME:BYTES]
        [--drop-first NAME:BYTES]

The standard library's `http.server` (Python 3.11) ignores `Range` headers; this is its handler
with single-range requests added (206 + Content-Range), as object stores and web servers answer.
Prints the port it listens on (127.0.0.1, chosen by the OS) as its first line. Every request goes
to the log as one JSON line. `--drop NAME:BYTES`: a GET of file NAME sends its headers, then
BYTES bytes of the body, then closes the connection (a server dying mid-shard). `--stall NAME:BYTES`:
the same, but it keeps the connection open and sends nothing more (a server that hangs mid-shard).
`--drop-first NAME:BYTES`: only the first GET of NAME is dropped so (a blip: a retry gets it all).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import sys
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class RangeHandler(SimpleHTTPRequestHandler):
    log_path = ""
    drops: dict[str, int] = {}
    stalls: dict[str, int] = {}
    drop_first: dict[str, int] = {}  # emptied as each first GET is dropped

    def send_head(self):
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        start, end = 0, size - 1
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start, end = int(wanted[1]), min(size - 1, int(wanted[2] or size - 1))
            if start > end:
                f.close()
                self.send_error(416, "Range not satisfiable")
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        f.seek(start)
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        name = os.path.basename(self.path)
        stall = self.stalls.get(name)
        limit = self.drops.get(name, stall)
        if limit is None:
            limit = self.drop_first.pop(name, None)
        left = self._left if limit is None else min(self._left, limit)
        while left > 0:
            chunk = source.read(min(left, 1 << 16))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)
        if limit is not None and limit < self._left:  # die (or hang) mid-body
            outputfile.flush()
            if stall is not None:
                time.sleep(3600)  # until the test stops the server
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self.log_path:
            return
        entry = {"method": self.command, "path": self.path, "range": self.headers.get("Range")}
        with open(self.log_path, "a") as log:
            log.write(json.dumps(entry) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--log", default="")
    p.add_argument("--drop", action="append", default=[], help="NAME:BYTES")
    p.add_argument("--stall", action="append", default=[], help="NAME:BYTES")
    p.add_argument("--drop-first", action="append", default=[], help="NAME:BYTES")
    args = p.parse_args()
    RangeHandler.log_path = args.log
    RangeHandler.drops = {name: int(n) for name, n in (d.rsplit(":", 1) for d in args.drop)}
    RangeHandler.stalls = {name: int(n) for name, n in (d.rsplit(":", 1) for d in args.stall)}
    RangeHandler.drop_first = {name: int(n) for name, n in (d.rsplit(":", 1) for d in args.drop_first)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=args.root))
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
