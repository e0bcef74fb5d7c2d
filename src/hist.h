/* SPDX-License-Identifier: PostgreSQL */
/*
 * Log-linear latency histograms.
 *
 * Values are nanoseconds. Values below 16 get a bucket each; above, every power of two is cut
 * into PGR__HIST_SUB equal sub-buckets, so a bucket's width is at most 1/PGR__HIST_SUB of its
 * lower bound (relative error under 25%). The top bucket absorbs everything past 2^44 ns.
 *
 * Concurrency: a pgr__hist has ONE writer at a time (the thread that owns the connection slot
 * it belongs to, ownership passed by the slot's acquire/release handoff), so recording is plain
 * relaxed load+store, no read-modify-write. Readers on other threads merge with relaxed loads
 * and may see a record half-applied (bucket counted, sum not yet): snapshots are approximate by
 * one in-flight record, never torn per field.
 */
#ifndef PGR_HIST_H
#define PGR_HIST_H

#include <stdatomic.h>
#include <stdint.h>

#include "pgring.h"

#define PGR__HIST_SUB_BITS 2
#define PGR__HIST_SUB      (1u << PGR__HIST_SUB_BITS)
#define PGR__HIST_LINEAR   16u
#define PGR__HIST_MAX_EXP  44u
#define PGR__HIST_BUCKETS  (PGR__HIST_LINEAR + (PGR__HIST_MAX_EXP - 4u + 1u) * PGR__HIST_SUB)

typedef struct pgr__hist {
	_Atomic uint64_t bucket[PGR__HIST_BUCKETS];
	_Atomic uint64_t sum_ns;
	_Atomic uint64_t max_ns;
} pgr__hist;

/* A merged, plain copy for computing percentiles and exporting. */
typedef struct pgr__hist_snap {
	uint64_t bucket[PGR__HIST_BUCKETS];
	uint64_t count;
	uint64_t sum_ns;
	uint64_t max_ns;
} pgr__hist_snap;

static inline unsigned pgr__hist_bucket(uint64_t v)
{
	if (v < PGR__HIST_LINEAR)
		return (unsigned)v;
	unsigned e = 63u - (unsigned)__builtin_clzll(v); /* e >= 4 */
	if (e > PGR__HIST_MAX_EXP)
		return PGR__HIST_BUCKETS - 1;
	unsigned sub = (unsigned)(v >> (e - PGR__HIST_SUB_BITS)) & (PGR__HIST_SUB - 1);
	return PGR__HIST_LINEAR + (e - 4u) * PGR__HIST_SUB + sub;
}

/* Single-writer record (see the concurrency note above). */
static inline void pgr__hist_add(pgr__hist *h, uint64_t v)
{
	unsigned b = pgr__hist_bucket(v);
	atomic_store_explicit(&h->bucket[b],
	                      atomic_load_explicit(&h->bucket[b], memory_order_relaxed) + 1,
	                      memory_order_relaxed);
	atomic_store_explicit(&h->sum_ns,
	                      atomic_load_explicit(&h->sum_ns, memory_order_relaxed) + v,
	                      memory_order_relaxed);
	if (v > atomic_load_explicit(&h->max_ns, memory_order_relaxed))
		atomic_store_explicit(&h->max_ns, v, memory_order_relaxed);
}

/* Smallest and largest value that land in bucket i (inclusive). */
uint64_t pgr__hist_bucket_lo(unsigned i);
uint64_t pgr__hist_bucket_hi(unsigned i);

void pgr__hist_snap_clear(pgr__hist_snap *s);
/* Add h's content to s (relaxed loads; see above). */
void pgr__hist_snap_merge(pgr__hist_snap *s, const pgr__hist *h);
/* Value at quantile q in [0,1]: the upper bound of the bucket holding it, capped at max. */
uint64_t pgr__hist_snap_quantile(const pgr__hist_snap *s, double q);
void pgr__hist_snap_summary(const pgr__hist_snap *s, pgr_hist_summary *out);
/* Count of recorded values <= limit_ns; exact when limit_ns is a bucket's upper bound. */
uint64_t pgr__hist_snap_count_le(const pgr__hist_snap *s, uint64_t limit_ns);

#endif
