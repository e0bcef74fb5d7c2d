/* SPDX-License-Identifier: PostgreSQL */
/*
 * Resizing a live pool: min_idle, max_size and max_overflow change without a rebuild.
 *
 * The three limits live in one 64-bit word (pool.h, pgr_pool.limits) that every reader loads
 * once and decodes, so a reader sees one resize's values or another's, never a mix, and
 * concurrent resizes need no lock: the last store wins, whole. Relaxed is enough: a limit is
 * a policy input, and each decision that uses it re-reads nopen and nwaiters itself; a caller
 * that read the old limit an instant before the resize decides as if it had come first.
 *
 * The resize itself only stores the word and wakes the manager; the effects follow from the
 * places that already enforce the limits:
 *   - grow (manager.c) opens connections for parked waiters up to the new total at once;
 *   - maintain (manager.c) closes idle connections while more than the new total are open;
 *   - the return verdict (checkout.c) retires a returned connection above the new total, by a
 *     CAS on nopen, so concurrent returns retire only the surplus.
 * A connection in use is never touched: only its owner may, and the owner is its holder.
 *
 * The slot tables (connections, shard bitmaps, the manager's ring) are sized at create by
 * cfg.max_capacity and never move, because lock-free readers hold indices into them; that
 * capacity is the bound of every resize.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

#include "pool.h"

static __attribute__((format(printf, 3, 4))) int bad(pgr_pool *p, const char *field,
                                                     const char *fmt, ...)
{
	char msg[256], why[160];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	snprintf(msg, sizeof(msg), "pgr_pool_resize: %s %s; limits unchanged", field, why);
	pgr__set_last_error(p, msg);
	pgr__emit(p, PGR_EV_CONFIG_ERROR, msg, NULL, field, PGR__NONE);
	return -EINVAL;
}

int pgr_pool_resize(pgr_pool *p, uint32_t min_idle, uint32_t max_size, uint32_t max_overflow)
{
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (atomic_load_explicit(&p->closing, memory_order_relaxed))
		return -ESHUTDOWN;
	if (max_size == 0)
		return bad(p, "max_size", "must be at least 1");
	if (min_idle > max_size)
		return bad(p, "min_idle", "must not exceed max_size (%u > %u)", min_idle, max_size);
	if ((uint64_t)max_size + max_overflow > p->cap)
		return bad(p, "max_overflow",
		           "with max_size exceeds the pool's capacity (%llu > max_capacity %u)",
		           (unsigned long long)max_size + max_overflow, p->cap);
	atomic_store_explicit(&p->limits, pgr__limits_pack(min_idle, max_size, max_overflow),
	                      memory_order_relaxed);
	/*
	 * The manager grows for waiters and min_idle and closes idle surplus in its next round.
	 * The store above is ordered before the manager's read by the poke's exchange (acq_rel,
	 * paired with the round's exchange of mgr_poke).
	 */
	pgr__manager_wake(p);
	return 0;
}
