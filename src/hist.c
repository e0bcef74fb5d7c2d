/* SPDX-License-Identifier: PostgreSQL */
/*
 * Log-linear latency histograms: bucket bounds, snapshots and percentiles.
 *
 * Recording is inline in hist.h. Everything here works on pgr__hist_snap, a plain copy owned
 * by the reading thread, so nothing in this file needs more than relaxed loads (see the
 * concurrency note in hist.h for what a snapshot may miss).
 */
#include "hist.h"

#include <float.h>
#include <string.h>

uint64_t pgr__hist_bucket_lo(unsigned i)
{
	if (i < PGR__HIST_LINEAR)
		return i;
	/* Out of range is a caller bug; clamp so the shift below stays defined. */
	if (i >= PGR__HIST_BUCKETS)
		i = PGR__HIST_BUCKETS - 1;
	unsigned j = i - PGR__HIST_LINEAR;
	unsigned e = 4u + j / PGR__HIST_SUB;
	uint64_t sub = j % PGR__HIST_SUB;
	/* Inverse of pgr__hist_bucket: the leading one at bit e, then sub in the next bits. */
	return (PGR__HIST_SUB + sub) << (e - PGR__HIST_SUB_BITS);
}

uint64_t pgr__hist_bucket_hi(unsigned i)
{
	/* The top bucket also absorbs every value past the last exponent. */
	if (i >= PGR__HIST_BUCKETS - 1)
		return UINT64_MAX;
	return pgr__hist_bucket_lo(i + 1) - 1;
}

void pgr__hist_snap_clear(pgr__hist_snap *s)
{
	memset(s, 0, sizeof(*s));
}

void pgr__hist_snap_merge(pgr__hist_snap *s, const pgr__hist *h)
{
	/*
	 * count is the sum of the buckets we actually read, not a separate counter, so that
	 * quantile ranks and cumulative exports always agree with the buckets even while a
	 * writer is recording.
	 */
	for (unsigned i = 0; i < PGR__HIST_BUCKETS; i++) {
		uint64_t n = atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
		s->bucket[i] += n;
		s->count += n;
	}
	s->sum_ns += atomic_load_explicit(&h->sum_ns, memory_order_relaxed);
	uint64_t max = atomic_load_explicit(&h->max_ns, memory_order_relaxed);
	if (max > s->max_ns)
		s->max_ns = max;
}

/* 1-based rank of the value at quantile q: ceil(q * count), within [1, count]. */
static uint64_t quantile_rank(uint64_t count, double q)
{
	if (!(q > 0.0)) /* also catches NaN */
		return 1;
	if (q >= 1.0)
		return count;
	/*
	 * Shave a few ulps off before rounding up, so that a product that should be an integer
	 * but came out a hair above it (0.7 * 10 and the like) does not move to the next rank.
	 */
	double r = q * (double)count * (1.0 - 4.0 * DBL_EPSILON);
	/* Compare before converting: a double at or above 2^64 does not fit in uint64_t. */
	if (r >= (double)count)
		return count;
	uint64_t rank = (uint64_t)r;
	if ((double)rank < r)
		rank++;
	if (rank < 1)
		rank = 1;
	if (rank > count)
		rank = count;
	return rank;
}

uint64_t pgr__hist_snap_quantile(const pgr__hist_snap *s, double q)
{
	if (s->count == 0)
		return 0;
	uint64_t rank = quantile_rank(s->count, q);
	uint64_t cum = 0;
	for (unsigned i = 0; i < PGR__HIST_BUCKETS; i++) {
		cum += s->bucket[i];
		if (cum >= rank) {
			/* The bucket's top overstates the tail of a bucket holding the maximum. */
			uint64_t hi = pgr__hist_bucket_hi(i);
			return hi < s->max_ns ? hi : s->max_ns;
		}
	}
	/* Only reachable if count was set larger than the buckets' sum. */
	return s->max_ns;
}

void pgr__hist_snap_summary(const pgr__hist_snap *s, pgr_hist_summary *out)
{
	out->count = s->count;
	out->sum_ns = s->sum_ns;
	out->p50_ns = pgr__hist_snap_quantile(s, 0.5);
	out->p90_ns = pgr__hist_snap_quantile(s, 0.9);
	out->p99_ns = pgr__hist_snap_quantile(s, 0.99);
	out->p999_ns = pgr__hist_snap_quantile(s, 0.999);
	out->max_ns = s->max_ns;
}

uint64_t pgr__hist_snap_count_le(const pgr__hist_snap *s, uint64_t limit_ns)
{
	/*
	 * Only whole buckets are counted: a bucket straddling limit_ns is left out rather than
	 * guessed at. That keeps the result exact at bucket upper bounds and, for any limit,
	 * monotonic over time, which Prometheus requires of every bucket series. (Using max_ns to
	 * count the straddling bucket would be exact more often but could make a series drop
	 * once a larger value arrives.)
	 */
	uint64_t n = 0;
	for (unsigned i = 0; i < PGR__HIST_BUCKETS; i++) {
		if (pgr__hist_bucket_hi(i) > limit_ns)
			break;
		n += s->bucket[i];
	}
	return n;
}
