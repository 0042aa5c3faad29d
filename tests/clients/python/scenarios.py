#!/usr/bin/env python3
"""psycopg 3 scenarios of Ephemera's compatibility suite (tests/it/compat.rs).

Usage: scenarios.py '<json>' where the JSON is {"a": ENDPOINT, "b": ENDPOINT}
and an ENDPOINT has host, port, user, dbname, sslmode, sslrootcert and either
sslcert + sslkey (through Ephemera) or password (directly to PostgreSQL).
"a" and "b" are two different identities. Prints one JSON document: the
results of every scenario, to be compared between the two runs.
"""

import datetime
import decimal
import hashlib
import secrets
import json
import sys
import threading
import time

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb, Json

APP = "compat-psycopg"
# Long enough that only a cancel ends it early; short enough that a failed
# cancel does not stall the suite.
CANCEL_SLEEP = 8


def connect(endpoint, **extra):
    kw = dict(endpoint)
    kw.setdefault("application_name", APP)
    kw.update(extra)
    return psycopg.connect(**kw)


def show(value):
    """A JSON-able, type-revealing form of a Python value from psycopg."""
    if value is None:
        return None
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, decimal.Decimal):
        return ["decimal", str(value)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ["bytes", bytes(value).hex()]
    if isinstance(value, datetime.datetime):
        return ["datetime", value.astimezone(datetime.timezone.utc).isoformat()]
    if isinstance(value, list):
        return ["list", [show(v) for v in value]]
    if isinstance(value, (dict,)):
        return ["dict", json.dumps(value, sort_keys=True)]
    return [type(value).__name__, str(value)]


def sqlstate(error):
    return getattr(error, "sqlstate", None) or type(error).__name__


VALUES = [
    42,
    2**62 + 7,
    decimal.Decimal("-12345678901234567890.123456789"),
    "héllo wörld — 日本語 🎉 'quoted' \"double\" \\ back",
    b"\x00\x01\x02\xfe\xff binary\x00",
    True,
    datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc),
    Jsonb({"a": [1, 2.5, {"b": None}], "ü": "ñ"}),
    [1, 2, 3, None],
    ["x", "y z", None, "ünï"],
    None,
]
CASTS = ["int", "bigint", "numeric", "text", "bytea", "bool", "timestamptz",
         "jsonb", "int[]", "text[]", "text"]


def scenario_types(a):
    out = {}
    placeholders = ", ".join(f"%s::{c}" for c in CASTS)
    # Extended protocol, text and binary parameters/results.
    for binary in (False, True):
        with a.cursor(binary=binary) as cur:
            cur.execute(f"SELECT {placeholders}", VALUES)
            out[f"extended_binary={binary}"] = [show(v) for v in cur.fetchone()]
            cur.execute("SELECT %s::json, pg_typeof(%s::json)::text",
                        [Json({"k": [1, "v"]}), Json([True, None])])
            out[f"json_binary={binary}"] = [show(v) for v in cur.fetchone()]
    # Client-side binding (simple query protocol), several statements in one string.
    with psycopg.ClientCursor(a) as cur:
        cur.execute(f"SELECT {placeholders}", VALUES)
        out["client_side"] = [show(v) for v in cur.fetchone()]
        cur.execute("SELECT 1 AS one; SELECT 'two' AS two, NULL::int AS n")
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
        out["multi_statement"] = [[[show(v) for v in row] for row in rows] for rows in results]
    a.commit()
    return out


def scenario_prepared(a):
    out = []
    a.execute("CREATE TEMP TABLE prep (id int PRIMARY KEY, label text)")
    a.commit()
    for txn in range(3):
        with a.transaction():
            for i in range(3):
                a.execute("INSERT INTO prep VALUES (%s, %s)", [txn * 10 + i, f"t{txn}-{i}"], prepare=True)
            rows = a.execute("SELECT count(*), max(label) FROM prep WHERE id >= %s", [txn * 10],
                             prepare=True).fetchall()
            out.append([[show(v) for v in row] for row in rows])
    prepared = a.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
    a.commit()
    return {"per_txn": out, "server_prepared_statements": prepared}


def scenario_rollback(a):
    a.execute("CREATE TEMP TABLE rb (x int)")
    a.execute("INSERT INTO rb VALUES (1)")
    a.commit()
    a.execute("INSERT INTO rb VALUES (2), (3)")
    inside = a.execute("SELECT count(*) FROM rb").fetchone()[0]
    a.rollback()
    after = a.execute("SELECT count(*) FROM rb").fetchone()[0]
    a.commit()
    return {"inside": inside, "after_rollback": after}


def scenario_error_recovery(a):
    out = {}
    a.execute("CREATE TEMP TABLE er (x int)")
    a.commit()
    a.execute("INSERT INTO er VALUES (1)")
    try:
        a.execute("SELECT 1 / 0")
    except psycopg.Error as e:
        out["error"] = sqlstate(e)
        out["message"] = e.diag.message_primary
    try:
        a.execute("SELECT 1")
    except psycopg.Error as e:
        out["in_failed_txn"] = sqlstate(e)
    a.rollback()
    out["after"] = a.execute("SELECT count(*) FROM er").fetchone()[0]
    a.commit()
    return out


def scenario_copy(a):
    rows = 100_000
    a.execute("CREATE TEMP TABLE cp (id int, name text, amount numeric, at timestamptz)")
    with a.cursor().copy("COPY cp (id, name, amount, at) FROM STDIN") as copy:
        base = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
        for i in range(rows):
            copy.write_row((i, f"row ünï {i}\ttab", decimal.Decimal(i) / 7, base + datetime.timedelta(seconds=i)))
    a.commit()
    summary = a.execute("SELECT count(*), sum(id), md5(string_agg(cp::text, '|' ORDER BY id)) FROM cp").fetchone()
    digest = hashlib.sha256()
    size = 0
    with a.cursor().copy("COPY (SELECT * FROM cp ORDER BY id) TO STDOUT") as copy:
        for block in copy:
            digest.update(block)
            size += len(block)
    a.commit()
    return {"server": [str(v) for v in summary], "copy_out_bytes": size, "copy_out_sha256": digest.hexdigest()}


def scenario_big_bytea(a):
    blob = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    with a.cursor(binary=True) as cur:
        cur.execute("SELECT %b::bytea, length(%b::bytea), md5(%b::bytea)", [blob, blob, blob])
        back, length, md5 = cur.fetchone()
    a.commit()
    return {"length": length, "md5": md5, "same": bytes(back) == blob,
            "sha256": hashlib.sha256(bytes(back)).hexdigest()}


def scenario_listen_notify(a_endpoint, b_endpoint):
    listener = connect(a_endpoint, autocommit=True)
    notifier = connect(b_endpoint, autocommit=True)
    # A channel of our own: other runs (direct and proxied run side by side)
    # LISTEN/NOTIFY in the same database.
    channel = "compat_" + secrets.token_hex(6)
    try:
        listener.execute(f"LISTEN {channel}")
        notifier_pid = notifier.execute("SELECT pg_backend_pid()").fetchone()[0]
        who = [listener.execute("SELECT current_user").fetchone()[0],
               notifier.execute("SELECT current_user").fetchone()[0]]
        notifier.execute(f"NOTIFY {channel}, 'hello ü'")
        notifier.execute(f"SELECT pg_notify('{channel}', 'second')")
        got = []
        for n in listener.notifies(timeout=10, stop_after=2):
            got.append({"own_channel": n.channel == channel, "payload": n.payload,
                        "from_notifier": n.pid == notifier_pid})
        return {"notifications": got, "different_roles": who[0] != who[1]}
    finally:
        listener.close()
        notifier.close()


def scenario_cancel(a_endpoint, method):
    conn = connect(a_endpoint, autocommit=True)
    result = {}

    def run():
        try:
            conn.execute("SELECT pg_sleep(%s)", [CANCEL_SLEEP])
            result["outcome"] = "finished"
        except psycopg.Error as e:
            result["outcome"] = sqlstate(e)

    worker = threading.Thread(target=run)
    started = time.monotonic()
    worker.start()
    # Poll: cancel until the running query is interrupted (a cancel that
    # arrives before the query starts does nothing), with a deadline.
    while worker.is_alive() and time.monotonic() - started < 20:
        try:
            getattr(conn, method)()
        except psycopg.Error as e:
            # Recorded (and the query left to end by itself): the comparison
            # with the direct run shows the failure.
            result["cancel_failed"] = str(e).split(": ", 1)[-1].replace(str(a_endpoint["port"]), "PORT")
            break
        worker.join(0.1)
    worker.join()
    result["quick"] = time.monotonic() - started < CANCEL_SLEEP
    result["usable_after"] = conn.execute("SELECT 'still usable'").fetchone()[0]
    conn.close()
    return result


def scenario_pipeline(a):
    out = []
    with a.pipeline():
        cursors = []
        for i in range(20):
            cur = a.cursor()
            cur.execute("SELECT %s::int * 2, %s::text", [i, f"p{i}"])
            cursors.append(cur)
        results = [c.fetchone() for c in cursors]
    out.append([[show(v) for v in r] for r in results])
    # An error inside a pipeline aborts the rest of it.
    errors = []
    try:
        with a.pipeline():
            a.execute("SELECT 1")
            a.execute("SELECT 1 / 0")
            a.execute("SELECT 2")
    except psycopg.Error as e:
        errors.append(sqlstate(e))
    a.rollback()
    out.append(errors)
    out.append(a.execute("SELECT 'after pipeline'").fetchone()[0])
    a.commit()
    return out


def scenario_settings(a):
    out = {}
    a.autocommit = True
    for stmt in ["SET DateStyle = 'ISO, DMY'", "SET TIME ZONE 'Asia/Tokyo'", "SET work_mem = '7MB'",
                 "SET search_path = pg_temp, public", "SET intervalstyle = 'iso_8601'"]:
        a.execute(stmt)
    for name in ["DateStyle", "TimeZone", "work_mem", "search_path", "IntervalStyle",
                 "statement_timeout", "client_encoding", "application_name"]:
        out[name] = a.execute(sql.SQL("SHOW {}").format(sql.Identifier(name.lower()))).fetchone()[0]
    out["formatted"] = a.execute("SELECT '2024-03-01 12:00:00+00'::timestamptz::text, '1 day 2 hours'::interval::text").fetchone()
    out["reported"] = {k: a.info.parameter_status(k) for k in ["DateStyle", "TimeZone", "IntervalStyle", "application_name"]}
    a.execute("RESET ALL")
    out["after_reset"] = a.execute("SHOW work_mem").fetchone()[0]
    a.autocommit = False
    return out


def scenario_identity(a):
    row = a.execute(
        "SELECT current_user, session_user, application_name, pg_has_role(current_user, 'billing_rw', 'MEMBER')"
        " FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
    a.commit()
    return list(row)


def main():
    endpoints = json.loads(sys.argv[1])
    a_ep, b_ep = endpoints["a"], endpoints["b"]
    results = {"driver": f"psycopg {psycopg.__version__}"}
    # Startup options pass through (statement_timeout via `options`).
    a = connect(a_ep, options="-c statement_timeout=54321")
    try:
        results["identity"] = scenario_identity(a)
        results["types"] = scenario_types(a)
        results["prepared"] = scenario_prepared(a)
        results["rollback"] = scenario_rollback(a)
        results["error_recovery"] = scenario_error_recovery(a)
        results["copy"] = scenario_copy(a)
        results["big_bytea"] = scenario_big_bytea(a)
        results["pipeline"] = scenario_pipeline(a)
        results["settings"] = scenario_settings(a)
    finally:
        a.close()
    results["listen_notify"] = scenario_listen_notify(a_ep, b_ep)
    results["cancel"] = scenario_cancel(a_ep, "cancel")
    results["cancel_safe"] = scenario_cancel(a_ep, "cancel_safe")
    json.dump(results, sys.stdout, sort_keys=True, default=str, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
