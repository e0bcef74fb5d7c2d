/* SPDX-License-Identifier: PostgreSQL */
/*
 * Test and benchmark support, not part of the public API: fill a pool with placeholder
 * connections that have no server behind them, so the lock-free core (shards, stealing, the
 * waiter FIFO) can be measured and stressed where no PostgreSQL runs. A fake pool never
 * connects (its slots are all taken) and skips the libpq status checks on return.
 */
#include <errno.h>

#include "pool.h"

int pgr__pool_add_fake(pgr_pool *p, uint32_t n)
{
	if (n > p->cap - atomic_load_explicit(&p->nopen, memory_order_relaxed))
		return -EINVAL;
	p->fake = 1;
	int64_t now = pgr__now_ms(p);
	for (uint32_t i = 0; i < p->cap && n > 0; i++) {
		struct pgr_conn *c = &p->conns[i];
		if (atomic_load_explicit(&c->state, memory_order_relaxed) != PGR__FREE)
			continue;
		atomic_fetch_add_explicit(&p->nopen, 1, memory_order_relaxed);
		pgr__conn_move(c, PGR__CONNECTING);
		atomic_store_explicit(&c->idle_since_ms, now, memory_order_relaxed);
		atomic_store_explicit(&c->expire_ms, INT64_MAX, memory_order_relaxed);
		pgr__publish(p, c);
		n--;
	}
	return 0;
}

/* A config for placeholder connections: no server, no socket to check, nothing expires. */
void pgr__fake_config(pgr_config *cfg, uint32_t conns)
{
	pgr_config_init(cfg);
	cfg->conninfo = "host=127.0.0.1 port=1 dbname=none";
	cfg->max_size = conns;
	cfg->ping_after_idle_ms = -1;
	cfg->check_after_idle_ms = INT64_MAX / 4;
	cfg->max_lifetime_ms = 0;
	cfg->idle_timeout_ms = 0;
}

/* A pool of cfg->max_size placeholders and no manager (no io_uring needed). */
int pgr__pool_create_fake(const pgr_config *cfg, pgr_pool **out)
{
	int rc = pgr__pool_create_nomgr(cfg, out);
	if (rc == 0 && (rc = pgr__pool_add_fake(*out, cfg->max_size)) != 0) {
		pgr_pool_destroy(*out);
		*out = NULL;
	}
	return rc;
}
