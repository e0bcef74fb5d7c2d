/* SPDX-License-Identifier: PostgreSQL */
/*
 * The prepared-statement cache of one libpq connection (exec.h): which statement texts were
 * used how often on it, and which it holds prepared under which name. Owned by the slot's owner
 * like every other non-atomic field of the slot; freed with the libpq connection.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exec.h"
#include "pool.h"
#include "pooler.h"

static bool is_error(const PGresult *r)
{
	ExecStatusType st = PQresultStatus(r);
	return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE;
}

/*
 * Two small tables, scanned linearly (prepare_cache_size is tens of entries; a scan of 64
 * hashes is cheaper than keeping a hash table coherent): use counts of texts not prepared yet,
 * keyed by a 64-bit hash only (a collision merely prepares a text a little early), and the
 * prepared statements, keyed by hash and verified by text. Both evict the least recently used.
 */
struct pcount {
	uint64_t h;
	uint64_t tick;
	uint32_t uses;
};
struct pprep {
	uint64_t h;
	uint64_t tick;
	uint64_t name;
	char *sql;
};
struct pgr__pcache {
	uint32_t cap;
	uint64_t tick;
	uint64_t next_name; /* never reused while the libpq connection lives */
	struct pcount *cnt;
	struct pprep *prep;
};

static uint64_t fnv1a(const char *s)
{
	uint64_t h = 1469598103934665603ull;
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ull;
	return h ? h : 1; /* 0 marks an empty entry */
}

static struct pgr__pcache *pcache_get(struct pgr_conn *c)
{
	if (c->pcache)
		return c->pcache;
	uint32_t cap = c->pool->cfg.prepare_cache_size ? c->pool->cfg.prepare_cache_size : 64;
	struct pgr__pcache *pc = calloc(1, sizeof(*pc));
	if (!pc)
		return NULL;
	pc->cnt = calloc(cap, sizeof(*pc->cnt));
	pc->prep = calloc(cap, sizeof(*pc->prep));
	if (!pc->cnt || !pc->prep) {
		free(pc->cnt);
		free(pc->prep);
		free(pc);
		return NULL;
	}
	pc->cap = cap;
	c->pcache = pc;
	return pc;
}

void pgr__pcache_name(uint64_t name_id, char *buf, size_t len)
{
	snprintf(buf, len, "pgr_%llx", (unsigned long long)name_id);
}

bool pgr__pcache_decide(struct pgr_conn *c, const char *sql, uint64_t *name_id, bool *prepare,
                        uint64_t *evicted)
{
	*name_id = 0;
	*prepare = false;
	*evicted = 0;
	int32_t threshold = pgr__prepare_threshold(c->pool); /* -1 behind a pooler */
	if (threshold < 0)
		return false;
	struct pgr__pcache *pc = pcache_get(c);
	if (!pc)
		return false;
	uint64_t h = fnv1a(sql);
	uint64_t tick = ++pc->tick;
	uint32_t lru = 0;
	for (uint32_t i = 0; i < pc->cap; i++) {
		struct pprep *e = &pc->prep[i];
		if (e->h == h && e->sql && strcmp(e->sql, sql) == 0) {
			e->tick = tick;
			*name_id = e->name;
			return true;
		}
		if (e->tick < pc->prep[lru].tick)
			lru = i;
	}
	/* Not prepared: count this use. */
	uint32_t ci = 0, clru = 0;
	bool found = false;
	for (; ci < pc->cap; ci++) {
		if (pc->cnt[ci].h == h) {
			found = true;
			break;
		}
		if (pc->cnt[ci].tick < pc->cnt[clru].tick)
			clru = ci;
	}
	if (!found) {
		ci = clru;
		pc->cnt[ci] = (struct pcount){.h = h};
	}
	uint32_t uses = pc->cnt[ci].uses++;
	pc->cnt[ci].tick = tick;
	if (uses < (uint32_t)threshold)
		return true;
	char *copy = strdup(sql);
	if (!copy)
		return true; /* unnamed this time */
	struct pprep *e = &pc->prep[lru];
	if (e->sql) {
		*evicted = e->name;
		free(e->sql);
	}
	*e = (struct pprep){.h = h, .tick = tick, .name = ++pc->next_name, .sql = copy};
	pc->cnt[ci] = (struct pcount){0};
	*name_id = e->name;
	*prepare = true;
	return true;
}

void pgr__pcache_drop(struct pgr_conn *c, uint64_t name_id)
{
	struct pgr__pcache *pc = c->pcache;
	if (!pc || !name_id)
		return;
	for (uint32_t i = 0; i < pc->cap; i++) {
		struct pprep *e = &pc->prep[i];
		if (e->sql && e->name == name_id) {
			/* Its next use prepares it again at once (this was a prepared text). */
			uint32_t k = 0;
			for (uint32_t j = 1; j < pc->cap; j++)
				if (pc->cnt[j].tick < pc->cnt[k].tick)
					k = j;
			int32_t t = c->pool->cfg.prepare_threshold;
			pc->cnt[k] = (struct pcount){
			    .h = e->h, .tick = ++pc->tick, .uses = t > 0 ? (uint32_t)t : 0};
			free(e->sql);
			*e = (struct pprep){0};
			return;
		}
	}
}

void pgr__pcache_forget(struct pgr_conn *c)
{
	struct pgr__pcache *pc = c->pcache;
	if (!pc)
		return;
	for (uint32_t i = 0; i < pc->cap; i++) {
		free(pc->prep[i].sql);
		pc->prep[i] = (struct pprep){0};
		pc->cnt[i] = (struct pcount){0};
	}
}

void pgr__pcache_free(struct pgr_conn *c)
{
	struct pgr__pcache *pc = c->pcache;
	if (!pc)
		return;
	pgr__pcache_forget(c);
	free(pc->cnt);
	free(pc->prep);
	free(pc);
	c->pcache = NULL;
}

bool pgr__pcache_retryable(const PGresult *r)
{
	if (!r || !is_error(r))
		return false;
	const char *ss = PQresultErrorField(r, PG_DIAG_SQLSTATE);
	/*
	 * 0A000 is "cached plan must not change result type" after an ALTER of a table the
	 * statement reads; matched by code alone, since the message is translated by lc_messages.
	 * Retrying any other 0A000 once is harmless: the failed autocommit statement was rolled
	 * back, and the retry fails the same way.
	 */
	return ss && (strcmp(ss, "0A000") == 0 || strcmp(ss, "26000") == 0);
}

int pgr__pcache_send(struct pgr_conn *c, const char *sql, int nparams, const char *const *pv,
                     uint64_t stale, struct pgr__pcache_sent *out)
{
	PGconn *pg = c->pg;
	uint64_t name = 0, evicted = 0;
	bool prep = false;
	*out = (struct pgr__pcache_sent){0};
	pgr__pcache_decide(c, sql, &name, &prep, &evicted);
	if (!name && !stale && !evicted)
		return PQsendQueryParams(pg, sql, nparams, NULL, pv, NULL, NULL, 0) ? 0 : -1;
	if (PQenterPipelineMode(pg) != 1)
		return -1;
	char nm[24];
	const uint64_t gone[2] = {stale, evicted};
	for (int i = 0; i < 2; i++) {
		if (!gone[i])
			continue;
		char q[48];
		pgr__pcache_name(gone[i], nm, sizeof(nm));
		snprintf(q, sizeof(q), "DEALLOCATE %s", nm);
		if (!PQsendQueryParams(pg, q, 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(pg))
			return -1;
		out->nstmt++;
		out->extra_syncs++;
	}
	out->first = out->nstmt;
	if (name) {
		pgr__pcache_name(name, nm, sizeof(nm));
		if (prep && !PQsendPrepare(pg, nm, sql, nparams, NULL))
			return -1;
		out->nstmt += prep;
		if (!PQsendQueryPrepared(pg, nm, nparams, pv, NULL, NULL, 0))
			return -1;
	} else if (!PQsendQueryParams(pg, sql, nparams, NULL, pv, NULL, NULL, 0)) {
		return -1;
	}
	out->nstmt++;
	out->name_id = name;
	out->prepared = prep;
	return PQpipelineSync(pg) ? 0 : -1;
}

int pgr__stmt_copy(char **buf, size_t *cap, const char *sql, int nparams, const char *const *params,
                   const char **sql_out, const char *const **pv_out)
{
	size_t sl = strlen(sql) + 1;
	size_t need = (size_t)nparams * sizeof(char *) + sl;
	for (int i = 0; i < nparams; i++)
		if (params[i])
			need += strlen(params[i]) + 1;
	if (need > *cap) {
		size_t n = need < 256 ? 256 : need;
		char *b = realloc(*buf, n);
		if (!b)
			return -ENOMEM;
		*buf = b;
		*cap = n;
	}
	const char **pv = (const char **)(void *)*buf;
	char *p = *buf + (size_t)nparams * sizeof(char *);
	memcpy(p, sql, sl);
	*sql_out = p;
	p += sl;
	for (int i = 0; i < nparams; i++) {
		if (!params[i]) {
			pv[i] = NULL;
			continue;
		}
		size_t n = strlen(params[i]) + 1;
		memcpy(p, params[i], n);
		pv[i] = p;
		p += n;
	}
	*pv_out = nparams ? pv : NULL;
	return 0;
}
