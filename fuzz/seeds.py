#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/seed-*): a few valid inputs per target, built
from examples/schema.json5, so the fuzzers start from the shapes the real paths accept.
Run from anywhere: python3 fuzz/seeds.py"""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))
NOW = 1_795_694_400_000  # the cloud_apply_push target's clock


def hlc(wall, counter=0, node=0x1234):
    return f"{wall:012x}-{counter:08x}-{node:016x}"


def env(msg):
    return json.dumps({"v": 1, "schema": "1.0.0", "msg": msg}, separators=(",", ":")).encode()


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# schema_parse: the example schema, and a minimal one.
with open(os.path.join(HERE, "..", "examples", "schema.json5"), "rb") as f:
    write("schema_parse", "example", f.read())
write("schema_parse", "minimal", b"""{format: 'onetable:1.1.0', version: '1',
  indexes: {primary: {hash: 'pk', sort: 'sk'}},
  process: {A: {sync: 'both'}},
  models: {A: {pk: {type: 'string', value: 'a#${id}'}, sk: {type: 'string', value: 'a#'},
    id: {type: 'string', required: true}, n: {type: 'number', validate: '/^[0-9]+$/'}}}}""")

fault = {"model": "Fault", "key": ["device#d1", "fault#01J0000000000000000000000A"], "op": "put",
         "item": {"pk": "device#d1", "sk": "fault#01J0000000000000000000000A",
                  "id": "01J0000000000000000000000A", "deviceId": "d1", "severity": "warn",
                  "message": "hot", "gs1pk": "fault#warn",
                  "gs1sk": "fault#d1#01J0000000000000000000000A",
                  "expires": "2026-12-01T00:00:00.000Z", "_type": "Fault"},
         "version": hlc(NOW - 1000, 1)}
setting = {"model": "Setting", "key": ["device#d1", "setting#mode"], "op": "put",
           "item": {"pk": "device#d1", "sk": "setting#mode", "deviceId": "d1", "name": "mode",
                    "value": "eco", "_type": "Setting"},
           "version": hlc(NOW - 500, 0), "base": hlc(NOW - 9000, 3, 7)}
delete = {"model": "Setting", "key": ["device#d1", "setting#old"], "op": "delete",
          "version": hlc(NOW - 100, 2)}
reading = {"model": "Reading", "key": ["device#d1", "reading#01J0000000000000000000000B"],
           "op": "put", "item": {"pk": "device#d1", "sk": "reading#01J0000000000000000000000B",
                                 "id": "01J0000000000000000000000B", "deviceId": "d1",
                                 "name": "temp", "value": -21.5, "status": "ok",
                                 "_type": "Reading"},
           "version": hlc(NOW, 0)}
push = {"type": "push", "batch": 7, "changes": [fault, setting, delete]}

for target in ("wire_decode", "cloud_apply_push"):
    write(target, "push", env(push))
    write(target, "push-reading", env({"type": "push", "batch": 8, "changes": [reading]}))
write("wire_decode", "hello", env({"type": "hello", "session": 1, "cursor": 42, "pending": 3}))
write("wire_decode", "snapshot-ack", env({"type": "snapshot_ack", "resync": 2,
                                          "pos": ["Setting", "device#d1", "setting#mode"],
                                          "done": False}))
write("wire_decode", "welcome", env({"type": "welcome", "session": 1, "now_ms": NOW,
                                     "max_drift_ms": 60000}))
write("wire_decode", "push-ack", env({"type": "push_ack", "batch": 7, "results": [
    {"model": "Setting", "key": ["device#d1", "setting#mode"], "version": hlc(NOW), "status": "applied"},
    {"model": "Fault", "key": ["device#d1", "fault#x"], "version": hlc(NOW),
     "status": {"stale": {"winner": hlc(NOW + 1)}}},
    {"model": "Nope", "key": ["a", "b"], "version": hlc(NOW),
     "status": {"rejected": {"reason": "unknown_model"}}}]}))
write("wire_decode", "feed", env({"type": "feed", "from": 4, "to": 6, "changes": [setting, delete]}))
write("wire_decode", "snapshot", env({"type": "snapshot", "resync": 2, "session": 1,
                                      "last": ["Setting", "device#d1", "setting#mode"],
                                      "items": [setting], "done": True, "cursor": 9}))


# db_codec: first byte = key length, key `pk \0 sk`, then the stored item (see crates/db/src/codec.rs).
def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def s(x):
    b = x.encode()
    return varint(len(b)) + b


def item(fields):
    return varint(len(fields)) + b"".join(s(k) + v for k, v in fields)


NULL, FALSE, TRUE, UINT, NEGINT, FLOAT, STRING, ARRAY, OBJECT, KEY_PK, KEY_SK, DATE = range(12)


def codec_seed(name, pk, sk, fields):
    key = pk.encode() + b"\0" + sk.encode()
    write("db_codec", name, bytes([len(key)]) + key + item(fields))


codec_seed("setting", "device#d1", "setting#mode", [
    ("_type", bytes([STRING]) + s("Setting")), ("deviceId", bytes([STRING]) + s("d1")),
    ("name", bytes([STRING]) + s("mode")), ("pk", bytes([KEY_PK])), ("sk", bytes([KEY_SK])),
    ("value", bytes([STRING]) + s("eco"))])
codec_seed("all-tags", "p", "s", [
    ("a", bytes([ARRAY]) + varint(4) + bytes([NULL, FALSE, TRUE, UINT]) + varint(300)),
    ("d", bytes([DATE]) + varint((NOW << 1))), ("f", bytes([FLOAT]) + struct.pack("<d", -21.5)),
    ("n", bytes([NEGINT]) + varint(4)),
    ("o", bytes([OBJECT]) + item([("x", bytes([STRING]) + s("é"))])),
    ("pk", bytes([KEY_PK])), ("sk", bytes([KEY_SK]))])
