// SPDX-License-Identifier: PostgreSQL
// pgr_bench peer: node-postgres's pg.Pool (pure JavaScript client), run by pgr_bench as a child
// process: `node node_peer.js`, with NODE_PATH pointing at the node_modules that hold `pg`.
//
// Protocol (bench/README.md, "Peers"): the server comes in the environment (PGR_PEER_HOST,
// _PORT, _USER, _PASSWORD, _DBNAME, _SSL); the peer prints one line, "ready <versions>" or
// "skip <reason>", then answers each "run <query> <threads> <conns> <hold_ns> <warmup_s> <secs>
// <sample_every>" line on stdin with "ok <ops> <errors> <secs> <sum_ns> <max_ns> <hist>" or
// "fail <reason>", and exits at "quit" or end of input.
//
// Threads: node has one event loop, so the harness's N threads become N concurrent async
// chains on it (acquire, query, release, repeat), the way a node server serves N requests at
// once. V8 is warmed before the first counted round of each query kind
// (PGR_PEER_FIRST_WARMUP seconds of uncounted work on top of the round's own warm-up).
'use strict'

const readline = require('readline')

const PHASE_WARMUP = 0
const PHASE_MEASURE = 1
const PHASE_STOP = 2
const LOOKUP_ROWS = 10000
// pgring's log-linear histogram (src/hist.h): 16 linear buckets, then 4 per power of two up to
// 2^44 ns. The harness merges the counts into its own snapshot.
const HIST_BUCKETS = 16 + (44 - 4 + 1) * 4
// An idle client is handed out through process.nextTick and promise callbacks, which never let
// timers run: a chain yields to the event loop every YIELD_EVERY checkouts so that the phase
// timers fire (and measures itself with the clock, not the timers).
const YIELD_EVERY = 64

let pg
try {
  pg = require('pg')
} catch (e) {
  console.log('skip npm package pg not installed (' + String(e.message).split('\n')[0] + ')')
  process.exit(0)
}

const nowNs = () => process.hrtime.bigint() // CLOCK_MONOTONIC, the clock the C harness reads

function bucketOf(v) {
  // v: a Number of nanoseconds (exact below 2^53)
  if (v < 16) return Math.max(Math.floor(v), 0)
  const e = Math.floor(Math.log2(v))
  // Math.log2 can round up just below a power of two: correct by one
  const ee = 2 ** e > v ? e - 1 : 2 ** (e + 1) <= v ? e + 1 : e
  if (ee > 44) return HIST_BUCKETS - 1
  const sub = Math.floor(v / 2 ** (ee - 2)) & 3
  return 16 + (ee - 4) * 4 + sub
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const yieldLoop = () => new Promise((r) => setImmediate(r))

async function sleepSecs(s) {
  const until = nowNs() + BigInt(Math.round(s * 1e9))
  for (;;) {
    const left = until - nowNs()
    if (left <= 0n) return
    await sleep(Number(left) / 1e6)
  }
}

// 32-bit xorshift on plain numbers: BigInt arithmetic would cost more than a checkout.
function xorshift(state) {
  let x = state.s
  x ^= x << 13
  x ^= x >>> 17
  x ^= x << 5
  state.s = x >>> 0
  return state.s
}

const warmed = new Set()

async function runRound(args) {
  const [query, threadsS, connsS, holdS, warmupS, secsS, sampleS] = args
  const chains = parseInt(threadsS, 10)
  const conns = parseInt(connsS, 10)
  const holdNs = BigInt(holdS)
  let warmup = parseFloat(warmupS)
  const secs = parseFloat(secsS)
  const sampleEvery = parseInt(sampleS, 10)
  if (!warmed.has(query)) {
    warmed.add(query)
    warmup += parseFloat(process.env.PGR_PEER_FIRST_WARMUP || '0')
  }
  const pool = new pg.Pool({
    host: process.env.PGR_PEER_HOST,
    port: parseInt(process.env.PGR_PEER_PORT || '5432', 10),
    user: process.env.PGR_PEER_USER,
    password: process.env.PGR_PEER_PASSWORD || undefined,
    database: process.env.PGR_PEER_DBNAME,
    ssl: process.env.PGR_PEER_SSL === '1' ? { rejectUnauthorized: false } : false,
    max: conns,
    idleTimeoutMillis: 0, // keep every connection for the whole round
    connectionTimeoutMillis: 10000, // the harness's per-checkout deadline
  })
  pool.on('error', () => {}) // an idle client's error is counted by the chain that uses it
  try {
    // pg.Pool opens connections on demand: check out all of them at once, then return them.
    const held = await Promise.all(Array.from({ length: conns }, () => pool.connect()))
    for (const c of held) c.release()

    let phase = PHASE_WARMUP
    let ops = 0
    let errors = 0
    let sum = 0n
    let max = 0n
    const hist = new Map()
    const q = query !== 'none'
    let seed = (Number(nowNs() & 0xffffffffn) | 1) >>> 0

    async function chain(state) {
      let n = 0
      while (phase !== PHASE_STOP) {
        if (++n % YIELD_EVERY === 0) await yieldLoop()
        // sampleEvery is a power of two (the harness rounds --sample up to one)
        const timed = (xorshift(state) & (sampleEvery - 1)) === 0
        const t0 = timed ? nowNs() : 0n
        let lat = 0n
        let c
        try {
          c = await pool.connect()
        } catch (e) {
          if (phase === PHASE_MEASURE) errors++
          await sleep(1)
          continue
        }
        let ok = true
        if (!q && (timed || holdNs > 0n)) {
          const t1 = nowNs()
          lat = t1 - t0
          while (holdNs > 0n && nowNs() - t1 < holdNs);
        }
        if (q) {
          try {
            const res =
              query === 'select1'
                ? await c.query('SELECT 1')
                : await c.query('SELECT name FROM pgr_bench_users WHERE id = $1', [
                    (xorshift(state) % LOOKUP_ROWS) + 1,
                  ])
            ok = res.rows.length === 1
          } catch (e) {
            ok = false
          }
        }
        c.release(ok ? undefined : true)
        if (timed && q) lat = nowNs() - t0
        if (phase === PHASE_MEASURE) {
          if (!ok) {
            errors++
          } else {
            ops++
            if (timed) {
              const b = bucketOf(Number(lat))
              hist.set(b, (hist.get(b) || 0) + 1)
              sum += lat
              if (lat > max) max = lat
            }
          }
        }
      }
    }

    const running = []
    for (let i = 0; i < chains; i++) {
      seed = xorshift({ s: seed }) || 1
      running.push(chain({ s: seed }))
    }
    await sleepSecs(warmup)
    const t0 = nowNs()
    phase = PHASE_MEASURE
    await sleepSecs(secs)
    phase = PHASE_STOP
    const t1 = nowNs()
    await Promise.all(running)
    const h = [...hist.entries()].sort((a, b) => a[0] - b[0]).map(([b, n]) => b + ':' + n)
    return `ok ${ops} ${errors} ${(Number(t1 - t0) / 1e9).toFixed(6)} ${sum} ${max} ${h.length ? h.join(',') : '-'}`
  } finally {
    await pool.end()
  }
}

async function main() {
  const pgVersion = require('pg/package.json').version
  console.log(`ready node-postgres ${pgVersion} (pg.Pool, JavaScript client), Node ${process.versions.node}`)
  const rl = readline.createInterface({ input: process.stdin, terminal: false })
  for await (const line of rl) {
    const a = line.trim().split(/\s+/)
    if (a[0] === '' || a[0] === 'quit') break
    let reply
    if (a[0] !== 'run' || a.length !== 8 || !['none', 'select1', 'lookup'].includes(a[1])) {
      reply = 'fail bad command: ' + line.trim()
    } else {
      try {
        reply = await runRound(a.slice(1))
      } catch (e) {
        reply = 'fail ' + String(e && e.message ? e.message : e).replace(/\n/g, ' ')
      }
    }
    console.log(reply)
  }
  process.exit(0)
}

main()
