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
