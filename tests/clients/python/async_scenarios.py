#!/usr/bin/env python3
"""psycopg 3 AsyncConnection scenarios (tests/it/compat.rs, issue 12).

Async libpq clients (non-blocking mode) hung on TLS records bigger than the
8 KiB PostgreSQL sends: wide rows and COPY TO STDOUT. The told backend pid
must be the real one (NOTIFY from oneself, terminating one's own backend
by the pid the driver knows). Same usage and output as scenarios.py.
"""

import asyncio
import hashlib
import json
import sys

import psycopg

APP = "compat-psycopg-async"
# A scenario that takes longer has hung.
DEADLINE = 30


async def connect(endpoint):
    kw = dict(endpoint)
    kw.setdefault("application_name", APP)
    return await psycopg.AsyncConnection.connect(autocommit=True, **kw)


async def scenario_identity(conn):
    cur = await conn.execute("SELECT current_user, pg_backend_pid()")
    user, pid = await cur.fetchone()
    return {"user": user, "told_pid_is_real": pid == conn.info.backend_pid}


async def scenario_wide_rows(conn):
    out = {}
    for width in (3000, 8000, 8192, 12000, 16384, 20000):
        cur = await conn.execute(
            "SELECT i, repeat(chr(65 + i %% 26), %s) FROM generate_series(1, 50) i",
            (width,))
        rows = await cur.fetchall()
        digest = hashlib.sha256()
        for i, text in rows:
            digest.update(f"{i}:{text}\n".encode())
        out[str(width)] = [len(rows), digest.hexdigest()]
    return out


async def scenario_copy_out(conn):
    digest = hashlib.sha256()
    size = 0
    async with conn.cursor() as cur:
        async with cur.copy(
                "COPY (SELECT i, repeat(md5(i::text), 150) FROM generate_series(1, 400) i)"
                " TO STDOUT") as copy:
            async for data in copy:
                digest.update(bytes(data))
                size += len(data)
    return [size, digest.hexdigest()]


async def scenario_notify_self(conn):
    channel = "compat_async_self"
    await conn.execute(f"LISTEN {channel}")
    await conn.execute(f"NOTIFY {channel}, 'hello'")
    gen = conn.notifies(timeout=10, stop_after=1)
    got = [n async for n in gen]
    await conn.execute(f"UNLISTEN {channel}")
    return [[n.payload, n.pid == conn.info.backend_pid] for n in got]


async def scenario_terminate_told_pid(endpoint):
    """As psycopg's test_broken_connection: end the backend by the pid the
    driver was told."""
    conn = await connect(endpoint)
    try:
        await conn.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        return {"error": None, "closed": conn.closed}
    except psycopg.OperationalError as error:
        return {"error": type(error).__name__, "sqlstate": error.sqlstate, "closed": conn.closed}
    finally:
        await conn.close()


async def main():
    endpoints = json.loads(sys.argv[1])
    results = {"driver": f"psycopg {psycopg.__version__} async"}
    conn = await connect(endpoints["a"])
    try:
        for name, scenario in [
            ("identity", scenario_identity),
            ("wide_rows", scenario_wide_rows),
            ("copy_out", scenario_copy_out),
            ("notify_self", scenario_notify_self),
        ]:
            try:
                results[name] = await asyncio.wait_for(scenario(conn), DEADLINE)
            except asyncio.TimeoutError:
                results[name] = f"hung for {DEADLINE} s"
    finally:
        await conn.close()
    try:
        results["terminate"] = await asyncio.wait_for(
            scenario_terminate_told_pid(endpoints["b"]), DEADLINE)
    except asyncio.TimeoutError:
        results["terminate"] = f"hung for {DEADLINE} s"
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(main())
