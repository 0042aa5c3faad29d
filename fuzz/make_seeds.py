#!/usr/bin/env python3
"""Write the hand-made seed inputs into corpus/<target>/ (named, so a reader
can tell what each is). libFuzzer adds its own (hash-named) inputs next to
them; `cargo fuzz cmin` keeps the set small. Run from fuzz/."""
import os
import struct

SSL, GSSENC, CANCEL = 80877103, 80877104, 80877102


def pkt(code, body=b""):
    return struct.pack(">ii", 8 + len(body), code) + body


def startup(params, minor=0, term=True):
    body = b"".join(k + b"\0" + v + b"\0" for k, v in params) + (b"\0" if term else b"")
    return pkt((3 << 16) | minor, body)


seeds = {
    "first_packet": {
        "ssl_request": pkt(SSL),
        "gssenc_request": pkt(GSSENC),
        "ssl_request_then_tls_hello": pkt(SSL) + b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        "ssl_request_too_long": pkt(SSL, b"\0\0\0\0"),
        "cancel_request": struct.pack(">iiii", 16, CANCEL, 4242, -7),
        "cancel_request_3_2_long_key": pkt(CANCEL, struct.pack(">i", 1) + b"k" * 32),
        "cancel_request_short": struct.pack(">iii", 12, CANCEL, 1),
        "startup_basic": startup([(b"user", b"billing_rw"), (b"database", b"billing")]),
        "startup_libpq": startup([(b"user", b"app_ro"), (b"database", b"app"),
                                  (b"application_name", b"psql"), (b"client_encoding", b"UTF8"),
                                  (b"options", b"-c search_path=x")]),
        "startup_3_2_pq_option": startup([(b"user", b"u"), (b"_pq_.protocol_managed_params", b"1")], minor=2),
        "startup_empty": startup([]),
        "startup_no_terminator": startup([(b"user", b"x")], term=False),
        "startup_missing_value": pkt(3 << 16, b"user\0\0"),
        "startup_unterminated_last_name": pkt(3 << 16, b"user\0"),
        "startup_empty_key": pkt(3 << 16, b"\0v\0\0"),
        "startup_trailing_after_terminator": pkt(3 << 16, b"user\0x\0\0garbage\0"),
        "startup_64_params": startup([(b"k%d" % i, b"v") for i in range(64)]),
        "startup_65_params": startup([(b"k%d" % i, b"v") for i in range(65)]),
        "startup_65th_param_without_value": pkt(3 << 16, b"".join(b"k%d\0v\0" % i for i in range(64)) + b"k64\0"),
        "startup_max_size": startup([(b"user", b"a" * (10000 - 8 - 1 - 6 - 1))]),
        "startup_non_utf8": startup([(b"user", b"\xff\xfe\x80"), (b"\xc3\x28", b"x")]),
        "startup_replication": startup([(b"user", b"u"), (b"replication", b"database")]),
        "startup_then_query": startup([(b"user", b"u")]) + b"Q\0\0\0\x0dSELECT 1\0",
        "protocol_2": pkt(2 << 16, b"user\0x\0\0"),
        "protocol_1234_5679": pkt((1234 << 16) | 5679, b"\0"),
        "len_0": b"\0\0\0\0",
        "len_7": b"\0\0\0\x07\0\x03\0",
        "len_10001": struct.pack(">I", 10001) + b"\0\x03\0\0",
        "len_max_u32": b"\xff\xff\xff\xff\0\x03\0\0",
        "len_negative": struct.pack(">i", -8) + struct.pack(">i", SSL),
        "truncated_header": b"\0\0",
        "truncated_body": struct.pack(">I", 100) + b"\0\x03\0\0user\0",
        "length_says_more_than_sent": struct.pack(">I", 9) + struct.pack(">i", SSL),
    },
    "spiffe_and_patterns": {
        "simple": b"spiffe://example.org/ns/prod/sa/billing\nspiffe://example.org/ns/prod/sa/billing",
        "star": b"spiffe://example.org/ns/*/sa/billing\nspiffe://example.org/ns/dev/sa/billing",
        "doublestar": b"spiffe://example.org/ns/**\nspiffe://example.org/ns/a/b/c",
        "doublestar_not_last": b"spiffe://example.org/**/x\nspiffe://example.org/a/x",
        "td_only": b"spiffe://example.org\nspiffe://example.org",
        "bad": b"spiffe://Example.org:443/a/../b%2F?x#y\nhttps://user@example.org//a/./",
        "no_scheme": b"example.org/*/b\nexample.org/a/b",
        "trailing_slash": b"spiffe://example.org/\nspiffe://example.org/a/",
        "long": b"spiffe://example.org/" + b"a/" * 1013 + b"b\nspiffe://e/" + b"x" * 2040,
    },
    "sql_quote": {
        "plain": b"billing_rw",
        "double_quote": b'x"; DROP ROLE postgres; --',
        "single_quote": b"it's",
        "backslash_quote": b"a\\'b",
        "backslash_end": b"abc\\",
        "nul": b"a\0b",
        "empty": b"",
        "mixed": b"\"'\\\"'\\E'",
        "utf8": "rôle ☃".encode(),
    },
    "scram_client": {
        "valid_shape": b"r={N}SERVERNONCE,s={S},i=1\nv=AAAA",
        "server_error": b"r={N}x,s={S},i=1\ne=invalid-proof",
        "wrong_nonce": b"r=abc,s={S},i=1\nv=",
        "bad_salt": b"r={N}x,s=!!!,i=1\n",
        "bad_iterations": b"r={N}x,s={S},i=4096x\n",
        "missing_attributes": b"r={N}x\nv",
    },
}

for target, files in seeds.items():
    os.makedirs(f"corpus/{target}", exist_ok=True)
    for name, data in files.items():
        with open(f"corpus/{target}/{name}", "wb") as f:
            f.write(data)
