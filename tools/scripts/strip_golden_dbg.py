#!/usr/bin/env python3
"""Copy a golden safetensors file without its `dbg/*` tensors (intermediates used only to locate a
mismatch; the golden README says they are not needed to pass a case). Every other tensor and the
`__metadata__` are kept byte-for-byte; one metadata key `stripped_dbg` lists what was dropped.
Usage: strip_golden_dbg.py SRC DST"""
import json, struct, sys

src, dst = sys.argv[1], sys.argv[2]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
meta = header.pop("__metadata__", {})
keep = sorted(k for k in header if not k.startswith("dbg/"))
dropped = sorted(k for k in header if k.startswith("dbg/"))
meta["stripped_dbg"] = json.dumps(dropped)
out_header, chunks, off = {"__metadata__": meta}, [], 0
for k in keep:
    a, b = header[k]["data_offsets"]
    chunks.append(data[a:b])
    out_header[k] = {"dtype": header[k]["dtype"], "shape": header[k]["shape"], "data_offsets": [off, off + (b - a)]}
    off += b - a
hb = json.dumps(out_header, separators=(",", ":")).encode()
hb += b" " * ((8 - len(hb) % 8) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))
