#!/usr/bin/env node
// node-postgres scenarios of Ephemera's compatibility suite (tests/it/compat.rs).
//
// Usage: node scenarios.js '<json>' where the JSON is {"a": ENDPOINT, "b": ENDPOINT}
// and an ENDPOINT has host, port, user, dbname, sslmode, sslrootcert and either
// sslcert + sslkey (through Ephemera) or password (directly to PostgreSQL).
// "a" and "b" are two different identities. Prints one JSON document: the
// results of every scenario, to be compared between the two runs.
'use strict'

const fs = require('fs')
const crypto = require('crypto')
const { pipeline } = require('stream/promises')
const { Readable, Writable } = require('stream')
const pg = require('pg')
const copyStreams = require('pg-copy-streams')

const APP = 'compat-node'
const CANCEL_SLEEP = 8

function config(endpoint, extra = {}) {
  const ssl = { ca: fs.readFileSync(endpoint.sslrootcert, 'utf8'), rejectUnauthorized: true }
  if (endpoint.sslcert) {
    ssl.cert = fs.readFileSync(endpoint.sslcert, 'utf8')
    ssl.key = fs.readFileSync(endpoint.sslkey, 'utf8')
  }
  return {
    host: endpoint.host,
    port: endpoint.port,
    user: endpoint.user,
    database: endpoint.dbname,
    password: endpoint.password,
    application_name: APP,
    ssl,
    ...extra,
  }
}

async function connect(endpoint, extra) {
  const client = new pg.Client(config(endpoint, extra))
  await client.connect()
  return client
}

// A JSON-able, type-revealing form of a value from node-postgres.
function show(v) {
  if (v === null || v === undefined) return null
  if (Buffer.isBuffer(v)) return ['buffer', v.toString('hex')]
  if (v instanceof Date) return ['date', v.toISOString()]
  if (Array.isArray(v)) return ['array', v.map(show)]
  if (typeof v === 'object') return ['object', JSON.stringify(v)]
  return [typeof v, String(v)]
}

function sqlstate(e) {
  return e.code || e.message
}

const VALUES = [
  42,
  '4611686018427387911', // bigint beyond 2^53, as text
  '-12345678901234567890.123456789',
  "héllo wörld — 日本語 🎉 'quoted' \"double\" \\ back",
  Buffer.from([0, 1, 2, 0xfe, 0xff, 0x20, 0x62, 0]),
  true,
  new Date(Date.UTC(2024, 1, 29, 23, 59, 58, 123)),
  JSON.stringify({ a: [1, 2.5, { b: null }], ü: 'ñ' }),
  [1, 2, 3, null],
  ['x', 'y z', null, 'ünï'],
  null,
]
const CASTS = ['int', 'bigint', 'numeric', 'text', 'bytea', 'bool', 'timestamptz', 'jsonb', 'int[]', 'text[]', 'text']

async function scenarioTypes(a) {
  const out = {}
  const placeholders = CASTS.map((c, i) => `$${i + 1}::${c}`).join(', ')
  // Extended protocol (parameters), text results.
  let r = await a.query(`SELECT ${placeholders}`, VALUES)
  out.extended = r.fields.map((f) => show(r.rows[0][f.name]))
  r = await a.query({ text: `SELECT ${placeholders}`, values: VALUES, rowMode: 'array' })
  out.extended_array = r.rows[0].map(show)
  out.types = r.fields.map((f) => f.dataTypeID)
  r = await a.query('SELECT $1::json AS j, pg_typeof($1::json)::text AS t', [{ k: [1, 'v'] }])
  out.json = [show(r.rows[0].j), r.rows[0].t]
  // Simple protocol: no parameters, several statements in one string.
  const many = await a.query("SELECT 1 AS one; SELECT 'two' AS two, NULL::int AS n")
  out.multi_statement = many.map((res) => res.rows)
  return out
}

async function scenarioPrepared(a) {
  const out = []
  await a.query('CREATE TEMP TABLE prep (id int PRIMARY KEY, label text)')
  for (let txn = 0; txn < 3; txn++) {
    await a.query('BEGIN')
    for (let i = 0; i < 3; i++) {
      await a.query({ name: 'prep_insert', text: 'INSERT INTO prep VALUES ($1, $2)', values: [txn * 10 + i, `t${txn}-${i}`] })
    }
    const r = await a.query({ name: 'prep_count', text: 'SELECT count(*), max(label) FROM prep WHERE id >= $1', values: [txn * 10] })
    out.push(r.rows)
    await a.query('COMMIT')
  }
  const r = await a.query('SELECT name, statement FROM pg_prepared_statements ORDER BY name')
  return { per_txn: out, server_prepared_statements: r.rows }
}

async function scenarioRollback(a) {
  await a.query('CREATE TEMP TABLE rb (x int)')
  await a.query('INSERT INTO rb VALUES (1)')
  await a.query('BEGIN')
  await a.query('INSERT INTO rb VALUES (2), (3)')
  const inside = (await a.query('SELECT count(*) FROM rb')).rows[0].count
  await a.query('ROLLBACK')
  const after = (await a.query('SELECT count(*) FROM rb')).rows[0].count
  return { inside, after_rollback: after }
}

async function scenarioErrorRecovery(a) {
  const out = {}
  await a.query('CREATE TEMP TABLE er (x int)')
  await a.query('BEGIN')
  await a.query('INSERT INTO er VALUES (1)')
  try {
    await a.query('SELECT 1 / $1::int', [0])
  } catch (e) {
    out.error = sqlstate(e)
    out.message = e.message
  }
  try {
    await a.query('SELECT 1')
  } catch (e) {
    out.in_failed_txn = sqlstate(e)
  }
  await a.query('ROLLBACK')
  out.after = (await a.query('SELECT count(*) FROM er')).rows[0].count
  return out
}

async function scenarioCopy(a) {
  const rows = 100000
  await a.query('CREATE TEMP TABLE cp (id int, name text, amount numeric)')
  function* lines() {
    let chunk = ''
    for (let i = 0; i < rows; i++) {
      chunk += `${i}\trow ünï ${i}\\ttab\t${(i / 8).toFixed(3)}\n`
      if (chunk.length > 65536) {
        yield Buffer.from(chunk)
        chunk = ''
      }
    }
    if (chunk) yield Buffer.from(chunk)
  }
  await pipeline(Readable.from(lines()), a.query(copyStreams.from('COPY cp FROM STDIN')))
  const summary = (await a.query("SELECT count(*), sum(id), md5(string_agg(cp::text, '|' ORDER BY id)) FROM cp")).rows[0]
  const hash = crypto.createHash('sha256')
  let size = 0
  await pipeline(
    a.query(copyStreams.to('COPY (SELECT * FROM cp ORDER BY id) TO STDOUT')),
    new Writable({
      write(chunk, _enc, done) {
        hash.update(chunk)
        size += chunk.length
        done()
      },
    }),
  )
  return { server: summary, copy_out_bytes: size, copy_out_sha256: hash.digest('hex') }
}

async function scenarioBigBytea(a) {
  const blob = Buffer.alloc(64 * 1024 * 1024)
  for (let i = 0; i < blob.length; i++) blob[i] = i & 0xff
  const r = await a.query('SELECT $1::bytea AS b, length($1::bytea) AS n, md5($1::bytea) AS m', [blob])
  const back = r.rows[0].b
  return {
    length: r.rows[0].n,
    md5: r.rows[0].m,
    same: Buffer.compare(back, blob) === 0,
    sha256: crypto.createHash('sha256').update(back).digest('hex'),
  }
}

async function scenarioListenNotify(aEndpoint, bEndpoint) {
  const listener = await connect(aEndpoint)
  const notifier = await connect(bEndpoint)
  // A channel of our own: other runs (direct and proxied run side by side)
  // LISTEN/NOTIFY in the same database.
  const channel = 'compat_' + crypto.randomBytes(6).toString('hex')
  try {
    const got = []
    let resolve
    const two = new Promise((r) => (resolve = r))
    listener.on('notification', (n) => {
      got.push(n)
      if (got.length === 2) resolve()
    })
    await listener.query(`LISTEN ${channel}`)
    const notifierPid = (await notifier.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    const who = [
      (await listener.query('SELECT current_user AS u')).rows[0].u,
      (await notifier.query('SELECT current_user AS u')).rows[0].u,
    ]
    await notifier.query(`NOTIFY ${channel}, 'hello ü'`)
    await notifier.query(`SELECT pg_notify('${channel}', 'second')`)
    let timer
    await Promise.race([two, new Promise((_, reject) => (timer = setTimeout(() => reject(new Error('no notification within 10 s')), 10000)))])
    clearTimeout(timer)
    return {
      notifications: got.map((n) => ({ own_channel: n.channel === channel, payload: n.payload, from_notifier: n.processId === notifierPid })),
      different_roles: who[0] !== who[1],
    }
  } finally {
    await listener.end()
    await notifier.end()
  }
}

async function scenarioCancel(aEndpoint) {
  const client = await connect(aEndpoint)
  const result = {}
  const started = Date.now()
  let query
  const running = new Promise((resolve) => {
    query = new pg.Query('SELECT pg_sleep($1)', [CANCEL_SLEEP], (e) => resolve(e ? sqlstate(e) : 'finished'))
    client.query(query)
  })
  let done = false
  running.then(() => (done = true))
  // Poll: cancel until the running query is interrupted (a cancel that
  // arrives before the query starts does nothing), with a deadline.
  while (!done && Date.now() - started < CANCEL_SLEEP * 1000) {
    // node-postgres cancels from a second Client with the same settings.
    new pg.Client(config(aEndpoint)).cancel(client, query)
    await Promise.race([running, new Promise((r) => setTimeout(r, 100))])
  }
  result.outcome = await running
  result.quick = Date.now() - started < CANCEL_SLEEP * 1000
  result.usable_after = (await client.query("SELECT 'still usable' AS s")).rows[0].s
  await client.end()
  return result
}

async function scenarioPipeline(aEndpoint) {
  // pg's pipeline mode: every query is sent at once, each with its own Sync.
  const client = await connect(aEndpoint, { pipeline: true })
  try {
    const sent = Array.from({ length: 20 }, (_, i) =>
      i === 10
        ? client.query('SELECT 1 / $1::int', [0])
        : client.query({ text: 'SELECT $1::int * 2 AS d, $2::text AS t', values: [i, `p${i}`], rowMode: 'array' }),
    )
    const settled = await Promise.allSettled(sent)
    return settled.map((s) => (s.status === 'fulfilled' ? s.value.rows[0] : ['error', sqlstate(s.reason)]))
  } finally {
    await client.end()
  }
}

async function scenarioSettings(a) {
  const out = {}
  for (const stmt of [
    "SET DateStyle = 'ISO, DMY'",
    "SET TIME ZONE 'Asia/Tokyo'",
    "SET work_mem = '7MB'",
    'SET search_path = pg_temp, public',
    "SET intervalstyle = 'iso_8601'",
  ]) {
    await a.query(stmt)
  }
  for (const name of ['DateStyle', 'TimeZone', 'work_mem', 'search_path', 'IntervalStyle', 'statement_timeout', 'client_encoding', 'application_name']) {
    out[name] = (await a.query(`SHOW "${name.toLowerCase()}"`)).rows[0]
  }
  out.formatted = (await a.query({ text: "SELECT '2024-03-01 12:00:00+00'::timestamptz::text, '1 day 2 hours'::interval::text", rowMode: 'array' })).rows[0]
  await a.query('RESET ALL')
  out.after_reset = (await a.query('SHOW work_mem')).rows[0]
  return out
}

async function scenarioIdentity(a) {
  const r = await a.query({
    text: "SELECT current_user, session_user, application_name, pg_has_role(current_user, 'billing_rw', 'MEMBER') FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    rowMode: 'array',
  })
  return r.rows[0]
}

async function main() {
  const endpoints = JSON.parse(process.argv[2])
  const aEp = endpoints.a
  const bEp = endpoints.b
  const results = { driver: `pg ${require('pg/package.json').version}` }
  // Startup options pass through (statement_timeout via `options`).
  const a = await connect(aEp, { options: '-c statement_timeout=54321' })
  try {
    results.identity = await scenarioIdentity(a)
    results.types = await scenarioTypes(a)
    results.prepared = await scenarioPrepared(a)
    results.rollback = await scenarioRollback(a)
    results.error_recovery = await scenarioErrorRecovery(a)
    results.copy = await scenarioCopy(a)
    results.big_bytea = await scenarioBigBytea(a)
    results.settings = await scenarioSettings(a)
  } finally {
    await a.end()
  }
  results.listen_notify = await scenarioListenNotify(aEp, bEp)
  results.pipeline = await scenarioPipeline(aEp)
  results.cancel = await scenarioCancel(aEp)
  process.stdout.write(JSON.stringify(results) + '\n')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
