/* SPDX-License-Identifier: PostgreSQL */
/*
 * Pool lifetime (create, drain, destroy), events, the last-error buffer and the read side of
 * observability (stats, histograms, Prometheus).
 *
 * Everything a pool needs is allocated here, at create: the connection table, the shard
 * bitmaps, the waiter slots, the histograms. Nothing on the checkout path allocates. The waiter
 * slots and the histograms are sized for the pool's limits (max_waiters, max_size +
 * max_overflow) but lazily backed (pgr__lazy_zalloc): an idle pool with one connection keeps
 * resident only what it has used, a few KB, not the 110 KB its limits would take.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "exec.h"
#include "pool.h"
#include "prom.h"

/* ---- events and errors ---- */

void pgr__emit(pgr_pool *p, enum pgr_event_type type, const char *msg, const char *reason,
               const char *field, uint32_t conn_id)
{
	if (!p->cfg.on_event)
		return;
	char clean[640];
	snprintf(clean, sizeof(clean), "%s", msg ? msg : "");
	pgr__scrub(p, clean);
	pgr_event ev = {.type = type,
	                .message = clean,
	                .reason = reason,
	                .field = field,
	                .conn_id = conn_id,
	                .pool = p->cfg.name};
	p->cfg.on_event(&ev, p->cfg.user_data);
}

void pgr__emitf(pgr_pool *p, enum pgr_event_type type, uint32_t conn_id, const char *fmt, ...)
{
	if (!p->cfg.on_event)
		return;
	char msg[640];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	const char *reason = NULL;
	if (type == PGR_EV_CONN_CLOSED && conn_id < p->cap)
		reason = pgr_close_reason_name(p->conns[conn_id].close_reason);
	pgr__emit(p, type, msg, reason, NULL, conn_id);
}

static void mask(char *from, char *to)
{
	for (char *q = from; q < to; q++)
		*q = '*';
}

/*
 * Never let a secret out. libpq echoes a whole URI in some parse errors ("end of string reached
 * when looking for matching "]"... in URI: "postgresql://user:secret@[::1"), and a conninfo
 * fragment can carry password=...; the pool's own password is masked wherever it appears. Runs
 * on every event message and every last-error text, so no caller has to remember it.
 */
void pgr__scrub(const pgr_pool *p, char *msg)
{
	if (p && p->password && p->password[0]) {
		size_t n = strlen(p->password);
		char *hit;
		while ((hit = strstr(msg, p->password)) != NULL)
			memset(hit, '*', n);
	}
	/* URI userinfo: scheme://user:SECRET@host */
	for (char *q = strstr(msg, "://"); q; q = strstr(q, "://")) {
		q += 3;
		char *end = q + strcspn(q, "@/ \"\'?#");
		if (*end != '@')
			continue;
		char *colon = memchr(q, ':', (size_t)(end - q));
		if (colon)
			mask(colon + 1, end);
	}
	/* keyword=value forms of every secret libpq takes. */
	static const char *const keys[] = {"password", "sslpassword"};
	for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
		size_t kl = strlen(keys[k]);
		for (char *q = strstr(msg, keys[k]); q; q = strstr(q + 1, keys[k])) {
			char *v = q + kl;
			while (*v == ' ')
				v++;
			if (*v != '=')
				continue;
			v++;
			while (*v == ' ')
				v++;
			char *end;
			if (*v == '\'') {
				v++;
				end = v;
				while (*end && *end != '\'')
					end += (*end == '\\' && end[1]) ? 2 : 1;
			} else {
				end = v + strcspn(v, " \"");
			}
			mask(v, end);
		}
	}
}

void pgr__set_last_error(pgr_pool *p, const char *msg)
{
	pthread_mutex_lock(&p->err_lock);
	snprintf(p->last_error, sizeof(p->last_error), "%s", msg);
	pgr__scrub(p, p->last_error);
	pthread_mutex_unlock(&p->err_lock);
}

size_t pgr_pool_last_error(pgr_pool *p, char *buf, size_t len)
{
	if (!p || (!buf && len)) {
		if (buf && len)
			buf[0] = 0;
		return 0;
	}
	pthread_mutex_lock(&p->err_lock);
	int n = snprintf(buf, len, "%s", p->last_error);
	pthread_mutex_unlock(&p->err_lock);
	return n < 0 ? 0 : (size_t)n;
}

void pgr__conn_bad_move(struct pgr_conn *c, unsigned from, unsigned to)
{
	static const char *const state_names[PGR__STATES] = {
	    [PGR__FREE] = "FREE",       [PGR__CONNECTING] = "CONNECTING", [PGR__IDLE] = "IDLE",
	    [PGR__GRANTED] = "GRANTED", [PGR__IN_USE] = "IN_USE",         [PGR__LOOP] = "LOOP",
	    [PGR__MANAGED] = "MANAGED", [PGR__CLOSING] = "CLOSING",
	};
	fprintf(stderr, "pgring: connection %u: illegal state move %s -> %s\n", c->id,
	        from < PGR__STATES ? state_names[from] : "?",
	        to < PGR__STATES ? state_names[to] : "?");
	abort();
}

/* ---- create / drain / destroy ---- */

static void pool_free_memory(pgr_pool *p);

static void pool_free(pgr_pool *p)
{
	if (p->conns) {
		for (uint32_t i = 0; i < p->cap; i++)
			if (p->conns[i].pg)
				PQfinish(p->conns[i].pg);
	}
	pgr__manager_release(p);
	pool_free_memory(p);
}

/*
 * A forked child's copy of a pool: its sockets are the parent's sessions. PQfinish would send
 * a Terminate on them, so the child only closes its own file descriptors and leaves the PGconn
 * structures (a little copied memory) unreleased; no manager thread exists in the child.
 */
static void pool_free_forked(pgr_pool *p)
{
	for (uint32_t i = 0; p->conns && i < p->cap; i++) {
		int fd = p->conns[i].pg ? PQsocket(p->conns[i].pg) : -1;
		if (fd >= 0)
			close(fd);
	}
	pgr__manager_forget(p);
	pool_free_memory(p);
}

static void pool_free_memory(pgr_pool *p)
{
	for (uint32_t i = 0; p->conns && i < p->cap; i++)
		pgr__pcache_free(&p->conns[i]);
	free(p->conns);
	free(p->bits);
	free(p->pcpu);
	pgr__lazy_free(p->hists, sizeof(*p->hists) * p->cap);
	pgr__lazy_free(p->waiters, sizeof(*p->waiters) * p->nwaiter_slots);
	pthread_mutex_destroy(&p->wq_lock);
	pthread_mutex_destroy(&p->err_lock);
	pgr__config_free(p);
	free(p);
}

static int pool_create(const pgr_config *cfg, bool manager, pgr_pool **out);

int pgr_pool_create(const pgr_config *cfg, pgr_pool **out)
{
	return pool_create(cfg, true, out);
}

/* A pool with no manager (no io_uring), for the core's placeholder connections (tests/). */
int pgr__pool_create_nomgr(const pgr_config *cfg, pgr_pool **out)
{
	return pool_create(cfg, false, out);
}

static int pool_create(const pgr_config *cfg, bool manager, pgr_pool **out)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	if (!cfg)
		return -EINVAL;
	pgr_pool *p = aligned_alloc(PGR__CACHELINE, (sizeof(*p) + PGR__CACHELINE - 1) &
	                                                ~(size_t)(PGR__CACHELINE - 1));
	if (!p)
		return -ENOMEM;
	memset(p, 0, sizeof(*p));
	pthread_mutex_init(&p->wq_lock, NULL);
	pthread_mutex_init(&p->err_lock, NULL);
	p->own_clock.efd = -1;
	atomic_store_explicit(&p->own_clock.now_ms, pgr__coarse_ms(), memory_order_relaxed);
	p->clock = &p->own_clock;
	p->ops = &pgr__libpq_ops;
	p->fork_epoch = pgr__fork_guard();
	/* Events of a rejected config go to the caller's callback before anything is copied. */
	p->cfg.on_event = cfg->on_event;
	p->cfg.user_data = cfg->user_data;
	p->cfg.name = cfg->name ? cfg->name : "default";
	pgr_config full; /* the caller's fields over the defaults, whatever its header's version */
	int rc = pgr__config_import(p, cfg, &full);
	if (rc == 0)
		rc = pgr__config_validate(p, &full);
	if (rc == 0)
		rc = pgr__config_copy(p, &full);
	if (rc != 0) {
		pool_free(p);
		return rc;
	}
	p->cap = p->cfg.max_capacity ? p->cfg.max_capacity : p->cfg.max_size + p->cfg.max_overflow;
	atomic_store_explicit(
	    &p->limits, pgr__limits_pack(p->cfg.min_idle, p->cfg.max_size, p->cfg.max_overflow),
	    memory_order_relaxed);
	p->nshards = p->cfg.shards;
	p->nwords = (p->cap + 63) / 64;
	for (uint32_t c = 0; c < PGR__MAX_CPUS; c++)
		p->cpu_shard[c] = (uint8_t)(c % p->nshards);
	/* Spinning only helps when the holder can run meanwhile, i.e. on another CPU. */
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	p->spin_iters = ncpu > 1 ? 1000 : 0;
	p->spin_positions = ncpu > 3 ? (uint32_t)ncpu / 2 : 1;
	p->spin_busy_max = ncpu > 0 ? (uint32_t)ncpu : 1;
	/* Each shard's bitmap starts on its own cache line: CPUs write different shards. */
	p->shard_stride = (p->nwords + 7) & ~7u;
	p->conns = aligned_alloc(PGR__CACHELINE, sizeof(struct pgr_conn) * p->cap);
	p->bits = aligned_alloc(PGR__CACHELINE, sizeof(uint64_t) * p->shard_stride * p->nshards);
	if (p->conns) /* zeroed before anything can fail: pool_free reads every slot */
		memset(p->conns, 0, sizeof(struct pgr_conn) * p->cap);
	p->hists = pgr__lazy_zalloc(sizeof(*p->hists) * p->cap);
	p->waiters = pgr__lazy_zalloc(sizeof(*p->waiters) * p->cfg.max_waiters);
	if (p->waiters)
		p->nwaiter_slots = p->cfg.max_waiters;
	if (!p->conns || !p->bits || !p->hists || (p->cfg.max_waiters && !p->waiters)) {
		pool_free(p);
		return -ENOMEM;
	}
	/* Handles carry a lease number in the top 16 bits of the slot's address (pool.h). */
	if (((uintptr_t)(p->conns + p->cap) & ~(uintptr_t)PGR__ADDR_MASK) != 0) {
		pgr__emitf(p, PGR_EV_CONFIG_ERROR, PGR__NONE,
		           "cannot create the pool: its memory lies above 2^48");
		pool_free(p);
		return -ENOMEM;
	}
	memset(p->bits, 0, sizeof(uint64_t) * p->shard_stride * p->nshards);
	/* Per-CPU caches where the machine allows them (percpu.h); without them the pool works
	 * the same, one locked instruction slower each way. */
	uint32_t npcpu = pgr__percpu_setup();
	if (npcpu && (p->pcpu = aligned_alloc(PGR__CACHELINE, sizeof(*p->pcpu) * npcpu))) {
		for (uint32_t i = 0; i < npcpu; i++)
			atomic_init(&p->pcpu[i].id, PGR__PCPU_EMPTY);
		p->npcpu = p->npcpu_alloc = npcpu;
	}
	for (uint32_t i = 0; i < p->cap; i++) {
		p->conns[i].pool = p;
		p->conns[i].id = i;
		p->conns[i].hist = p->hists[i].h;
		p->conns[i].expire_ms = INT64_MAX;
	}
	/* No free list yet: slots are taken in index order the first time (pool.h). */
	p->wq_head = p->wq_tail = p->wq_free = PGR__NONE;
	atomic_init(&p->wq_head_hint, PGR__NONE);
	p->req_head = PGR__NONE;
	rc = manager ? pgr__manager_start(p) : 0;
	if (rc != 0) {
		pgr__emitf(p, PGR_EV_CONFIG_ERROR, PGR__NONE, "cannot start the manager: %s",
		           pgr_strerror(rc));
		pool_free(p);
		return rc;
	}
	*out = p;
	return 0;
}

static uint32_t count_state(pgr_pool *p, unsigned st)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i < p->cap; i++)
		n += atomic_load_explicit(&p->conns[i].state, memory_order_relaxed) == st;
	return n;
}

int pgr_pool_drain(pgr_pool *p, int64_t drain_ms)
{
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	/* A second call, even a concurrent one, returns at once (drain once, from one thread). */
	if (atomic_exchange_explicit(&p->drained, 1, memory_order_acq_rel))
		return 0;
	pthread_mutex_lock(&p->wq_lock);
	atomic_store_explicit(&p->closing, 1, memory_order_seq_cst);
	pthread_mutex_unlock(&p->wq_lock);
	pgr__waiters_shutdown(p);
	pgr__manager_wake(p);
	int64_t deadline = pgr__deadline_ns(drain_ms);
	/*
	 * Wait for holders to return, for waiters already granted a connection to take it, for
	 * loops to finish their pings and rollbacks, and for the manager's requests to end in a
	 * close. Connections a loop still holds at the deadline stay with it (the loop is not
	 * being driven, or is this very thread): the loop's destroy hands them back.
	 */
	for (;;) {
		uint32_t out = count_state(p, PGR__IN_USE) + count_state(p, PGR__GRANTED) +
		               count_state(p, PGR__LOOP);
		if (out + count_state(p, PGR__MANAGED) == 0)
			break;
		if (pgr__mono_ns() >= deadline) {
			rc = out ? -ETIMEDOUT : 0;
			break;
		}
		pgr__manager_poke(p);
		usleep(1000);
	}
	pgr__manager_stop(p);
	return rc;
}

int pgr_pool_destroy(pgr_pool *p)
{
	if (!p)
		return -EINVAL;
	if (pgr__forked(p->fork_epoch)) {
		pool_free_forked(p);
		return 0;
	}
	if (atomic_load_explicit(&p->nloops, memory_order_acquire))
		return pgr__misuse(p, PGR__NONE, -EBUSY,
		                   "misuse: pgr_pool_destroy with %u pgr_loop(s) still bound; "
		                   "destroy them first",
		                   atomic_load_explicit(&p->nloops, memory_order_relaxed));
	pgr_pool_drain(p, 0);
	/* Waiters woken with -ESHUTDOWN may still be on their way out of pgr_acquire. */
	while (atomic_load_explicit(&p->nblocked, memory_order_acquire))
		usleep(100);
	/* What is left was checked out at the drain's deadline: closed under its holder, or (given
	 * back after the deadline, to a manager that had stopped) where the return left it. */
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		if (c->pg) {
			c->close_reason = PGR_CLOSE_POOL_CLOSING;
			atomic_fetch_add_explicit(&p->c_closes[PGR_CLOSE_POOL_CLOSING], 1,
			                          memory_order_relaxed);
			bool held =
			    atomic_load_explicit(&c->state, memory_order_acquire) != PGR__MANAGED;
			pgr__emitf(p, PGR_EV_CONN_CLOSED, c->id,
			           "connection %u closed %s: pool_closing", c->id,
			           held ? "while checked out"
			                : "after its return past the drain's deadline");
			PQfinish(c->pg);
			c->pg = NULL;
		}
	}
	pool_free(p);
	return 0;
}

/* ---- stats ---- */

static void stats_fill(pgr_pool *p, pgr_stats *o)
{
	if (!o)
		return;
	memset(o, 0, sizeof(*o));
	o->struct_size = sizeof(*o);
	if (!p)
		return;
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		switch (atomic_load_explicit(&c->state, memory_order_relaxed)) {
		case PGR__IN_USE:
			o->in_use++;
			o->size++;
			break;
		case PGR__IDLE:
		case PGR__GRANTED:
		case PGR__LOOP:
		case PGR__MANAGED:
		case PGR__CLOSING:
			o->size++;
			break;
		case PGR__CONNECTING:
			o->connecting++;
			break;
		}
		o->acquired_immediately +=
		    atomic_load_explicit(&c->n_immediate, memory_order_relaxed);
		o->steals += atomic_load_explicit(&c->n_steals, memory_order_relaxed);
		o->handoffs += atomic_load_explicit(&c->n_handoffs, memory_order_relaxed);
		o->waits += atomic_load_explicit(&c->n_waits, memory_order_relaxed);
	}
	o->acquires = o->acquired_immediately + o->waits;
	o->idle = pgr__idle_count(p);
	o->waiting = atomic_load_explicit(&p->nwaiters, memory_order_relaxed);
	uint64_t lim = pgr__limits(p);
	o->max_size = pgr__lim_max_size(lim);
	o->max_overflow = pgr__lim_max_overflow(lim);
	o->overflow_in_use = o->size > o->max_size ? o->size - o->max_size : 0;
	if (o->overflow_in_use > o->in_use)
		o->overflow_in_use = o->in_use;
	o->timeouts = atomic_load_explicit(&p->c_timeouts, memory_order_relaxed);
	o->rejected = atomic_load_explicit(&p->c_rejected, memory_order_relaxed);
	o->connects_ok = atomic_load_explicit(&p->c_connects_ok, memory_order_relaxed);
	o->connects_failed = atomic_load_explicit(&p->c_connects_failed, memory_order_relaxed);
	o->pings = atomic_load_explicit(&p->c_pings, memory_order_relaxed);
	o->pings_failed = atomic_load_explicit(&p->c_pings_failed, memory_order_relaxed);
	o->checks_failed = atomic_load_explicit(&p->c_checks_failed, memory_order_relaxed);
	o->rollbacks = atomic_load_explicit(&p->c_rollbacks, memory_order_relaxed);
	o->resets = atomic_load_explicit(&p->c_resets, memory_order_relaxed);
	o->resets_failed = atomic_load_explicit(&p->c_resets_failed, memory_order_relaxed);
	o->leaks = atomic_load_explicit(&p->c_leaks, memory_order_relaxed);
	for (int r = 0; r < PGR_CLOSE_REASONS; r++) {
		o->closes_by_reason[r] =
		    atomic_load_explicit(&p->c_closes[r], memory_order_relaxed);
		o->closes += o->closes_by_reason[r];
	}
	o->pooler = atomic_load_explicit(&p->pooler, memory_order_relaxed);
}

/* 0.2's pgr_stats ends with closes_by_reason; later fields lie past it. */
#define STATS_SIZE_0_2                                                                             \
	(offsetof(pgr_stats, closes_by_reason) + sizeof(((pgr_stats *)0)->closes_by_reason))

int pgr_pool_stats_size(pgr_pool *p, pgr_stats *out, size_t size)
{
	if (!p || !out || size < STATS_SIZE_0_2)
		return -EINVAL;
	pgr_stats full;
	stats_fill(p, &full);
	/* The caller's struct may be smaller (older header) or larger (newer header) than ours. */
	if (size > sizeof(full)) {
		memset((char *)out + sizeof(full), 0, size - sizeof(full));
		size = sizeof(full);
	}
	full.struct_size = size;
	memcpy(out, &full, size);
	return 0;
}

static void hist_snap(pgr_pool *p, enum pgr_hist_kind kind, pgr__hist_snap *s)
{
	pgr__hist_snap_clear(s);
	uint64_t immediate = 0;
	for (uint32_t i = 0; i < p->cap; i++) {
		pgr__hist_snap_merge(s, &p->conns[i].hist[kind]);
		immediate += atomic_load_explicit(&p->conns[i].n_immediate, memory_order_relaxed);
	}
	/* Immediate checkouts waited 0 ns; the fast path counts them instead of recording them. */
	if (kind == PGR_HIST_ACQUIRE_WAIT) {
		s->bucket[0] += immediate;
		s->count += immediate;
	}
}

void pgr_pool_histogram(pgr_pool *p, enum pgr_hist_kind kind, pgr_hist_summary *out)
{
	if (!out)
		return;
	memset(out, 0, sizeof(*out));
	if (!p || (unsigned)kind >= PGR_HIST_KINDS)
		return;
	pgr__hist_snap s;
	hist_snap(p, kind, &s);
	pgr__hist_snap_summary(&s, out);
}

size_t pgr_pool_prometheus(pgr_pool *p, char *buf, size_t len)
{
	if (!p || (!buf && len)) {
		if (buf && len)
			buf[0] = 0;
		return 0;
	}
	pgr_stats st;
	stats_fill(p, &st);
	pgr__hist_snap snaps[PGR_HIST_KINDS];
	for (int k = 0; k < PGR_HIST_KINDS; k++)
		hist_snap(p, (enum pgr_hist_kind)k, &snaps[k]);
	return pgr__prom_format(buf, len, p->cfg.name, &st, snaps);
}
