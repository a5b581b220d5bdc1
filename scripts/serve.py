#!/usr/bin/env python3
"""Serves the built site (dist/) on localhost with cross-origin isolation headers.

usage: scripts/serve.py [DIR] [PORT] [--mount /PREFIX=DIR ...] [--no-isolation]

--mount serves another folder under a URL prefix (the benchmark uses it for ONNX Runtime
Web's files next to the site, so both run in the same origin and browser).
--no-isolation leaves the isolation headers out, as a plain static host does (the tests
check that the page works there too).
"""
import argparse
import functools
import http.server
import os
import posixpath
import urllib.parse


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".json": "application/json",
        ".safetensors": "application/octet-stream",
        ".onnx": "application/octet-stream",
    }
    mounts = {}
    isolated = True

    def translate_path(self, path):
        clean = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        for prefix, root in self.mounts.items():
            if clean == prefix or clean.startswith(prefix + "/"):
                rest = clean[len(prefix):].lstrip("/")
                full = os.path.realpath(os.path.join(root, rest))
                if full.startswith(os.path.realpath(root)):
                    return full
                return os.path.join(root, "__outside__")
        return super().translate_path(path)

    def end_headers(self):
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        super().end_headers()

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", default="dist")
    parser.add_argument("port", nargs="?", type=int, default=8080)
    parser.add_argument("--mount", action="append", default=[])
    parser.add_argument("--no-isolation", action="store_true")
    args = parser.parse_args()
    Handler.mounts = dict(m.split("=", 1) for m in args.mount)
    Handler.isolated = not args.no_isolation
    handler = functools.partial(Handler, directory=args.root)
    with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        print(f"serving {args.root} on http://127.0.0.1:{args.port}/", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
