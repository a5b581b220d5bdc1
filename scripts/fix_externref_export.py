#!/usr/bin/env python3
"""Points wasm-bindgen's `__wbindgen_externrefs` table export back at the externref table.

Debian's binaryen (wasm-opt 108) writes every table export with index 0 when a module has a
funcref table and wasm-bindgen's externref table, so the page would hand JS objects to the
function table and fail at start ("WebAssembly.Table.set(): Argument 1 is invalid"). This
rewrites that one index in place and refuses to guess: any unexpected layout is an error.
    fix_externref_export.py FILE.wasm
"""
import sys

EXPORT_NAME = b"__wbindgen_externrefs"
EXTERNREF, TABLE_KIND = 0x6F, 0x01


def leb(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def sections(data):
    if data[:4] != b"\0asm":
        sys.exit("not a wasm module")
    i = 8
    while i < len(data):
        sid = data[i]
        size, body = leb(data, i + 1)
        yield sid, body, body + size
        i = body + size


def table_types(data, start):
    count, i = leb(data, start)
    types = []
    for _ in range(count):
        types.append(data[i])
        flags = data[i + 1]
        _, i = leb(data, i + 2)
        if flags & 1:
            _, i = leb(data, i)
    return types


def main(path):
    data = bytearray(open(path, "rb").read())
    imported_tables = 0
    types = None
    export_at = None
    for sid, start, end in sections(data):
        if sid == 2:  # imports: tables imported come first in the index space
            count, i = leb(data, start)
            for _ in range(count):
                for _ in range(2):
                    n, i = leb(data, i)
                    i += n
                kind = data[i]
                i += 1
                if kind == 0:
                    _, i = leb(data, i)
                elif kind == 1:
                    imported_tables += 1
                    flags = data[i + 1]
                    _, i = leb(data, i + 2)
                    if flags & 1:
                        _, i = leb(data, i)
                elif kind == 2:
                    flags = data[i]
                    _, i = leb(data, i + 1)
                    if flags & 1:
                        _, i = leb(data, i)
                elif kind == 3:
                    i += 2
                else:
                    sys.exit(f"unknown import kind {kind}")
        elif sid == 4:
            types = table_types(data, start)
        elif sid == 7:
            count, i = leb(data, start)
            for _ in range(count):
                n, i = leb(data, i)
                name = bytes(data[i : i + n])
                i += n
                kind = data[i]
                if name == EXPORT_NAME and kind == TABLE_KIND:
                    export_at = i + 1
                _, i = leb(data, i + 1)
    if export_at is None:
        return  # no externref table (nothing to fix)
    if imported_tables or types is None or types.count(EXTERNREF) != 1:
        sys.exit(f"{path}: unexpected tables {types} (imported {imported_tables})")
    target = types.index(EXTERNREF)
    if data[export_at] >= 0x80 or target >= 0x80:
        sys.exit(f"{path}: table index does not fit one byte")
    data[export_at] = target
    open(path, "wb").write(data)


if __name__ == "__main__":
    main(sys.argv[1])
