/* SPDX-License-Identifier: PostgreSQL */
/*
 * Placeholder connections (placeholder.h). A placeholder pool never connects (its slots are all
 * taken), and its connections always come back "idle": the libpq status the core asks for on
 * return is answered here instead.
 */
#include <errno.h>

#include "placeholder.h"
#include "pool.h"

static enum pgr__rstate placeholder_return_state(struct pgr_conn *c)
{
	(void)c;
	return PGR__RS_IDLE;
}

static const struct pgr__conn_ops placeholder_ops = {.return_state = placeholder_return_state};

static int add_placeholders(pgr_pool *p, uint32_t n)
{
	if (n > p->cap - atomic_load_explicit(&p->nopen, memory_order_relaxed))
		return -EINVAL;
	p->ops = &placeholder_ops;
	/* No runtime ticks for a placeholder pool: its clock reads as a live one that stands
	 * still, which costs the checkout path what a ticking clock does. */
	atomic_store_explicit(&p->own_clock.live, 1, memory_order_relaxed);
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

int pgr__pool_create_fake(const pgr_config *cfg, pgr_pool **out)
{
	int rc = pgr__pool_create_nomgr(cfg, out);
	if (rc == 0 && (rc = add_placeholders(*out, cfg->max_size)) != 0) {
		pgr_pool_destroy(*out);
		*out = NULL;
	}
	return rc;
}
