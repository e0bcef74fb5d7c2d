/* SPDX-License-Identifier: PostgreSQL */
/*
 * Log-linear histogram: bucket bounds, quantiles, merging and exact counts at bucket edges.
 */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "hist.h"

/* Deterministic so a failure reproduces; xorshift64 is plenty for spreading test values. */
static uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static pgr__hist *hist_new(void)
{
	pgr__hist *h = calloc(1, sizeof(*h));
	cr_assert_not_null(h);
	return h;
}

static void assert_in_bucket(uint64_t v)
{
	unsigned b = pgr__hist_bucket(v);
	cr_assert_lt(b, PGR__HIST_BUCKETS, "value %llu -> bucket %u out of range",
	             (unsigned long long)v, b);
	cr_assert(pgr__hist_bucket_lo(b) <= v && v <= pgr__hist_bucket_hi(b),
	          "value %llu in bucket %u = [%llu, %llu]", (unsigned long long)v, b,
	          (unsigned long long)pgr__hist_bucket_lo(b),
	          (unsigned long long)pgr__hist_bucket_hi(b));
}

Test(hist, every_small_value_lands_in_a_bucket_that_contains_it, .timeout = 30)
{
	unsigned prev = 0;
	for (uint64_t v = 0; v <= 100000; v++) {
		assert_in_bucket(v);
		unsigned b = pgr__hist_bucket(v);
		cr_assert_geq(b, prev, "bucket not monotonic at %llu", (unsigned long long)v);
		prev = b;
	}
}

Test(hist, large_and_random_values_land_in_a_bucket_that_contains_it, .timeout = 30)
{
	for (unsigned k = 0; k < 64; k++) {
		uint64_t p = (uint64_t)1 << k;
		assert_in_bucket(p);
		assert_in_bucket(p - 1);
		assert_in_bucket(p + 1);
		assert_in_bucket(p + p / 2);
	}
	assert_in_bucket(UINT64_MAX);
	uint64_t s = 0x9e3779b97f4a7c15ull;
	uint64_t prev_v = 0;
	for (int i = 0; i < 200000; i++) {
		/* Spread over every magnitude, not only the top few bits. */
		uint64_t v = rng_next(&s) >> (rng_next(&s) % 64);
		assert_in_bucket(v);
		uint64_t lo = v < prev_v ? v : prev_v, hi = v < prev_v ? prev_v : v;
		cr_assert_leq(pgr__hist_bucket(lo), pgr__hist_bucket(hi), "bucket not monotonic");
		prev_v = v;
	}
}

Test(hist, buckets_tile_the_whole_range_without_gaps, .timeout = 30)
{
	cr_assert_eq(pgr__hist_bucket_lo(0), 0);
	for (unsigned i = 0; i + 1 < PGR__HIST_BUCKETS; i++) {
		cr_assert_eq(pgr__hist_bucket_lo(i + 1), pgr__hist_bucket_hi(i) + 1,
		             "gap or overlap between buckets %u and %u", i, i + 1);
		cr_assert_eq(pgr__hist_bucket(pgr__hist_bucket_lo(i)), i);
		cr_assert_eq(pgr__hist_bucket(pgr__hist_bucket_hi(i)), i);
	}
	cr_assert_eq(pgr__hist_bucket_hi(PGR__HIST_BUCKETS - 1), UINT64_MAX);
	cr_assert_eq(pgr__hist_bucket(UINT64_MAX), PGR__HIST_BUCKETS - 1);
}

Test(hist, bucket_width_is_at_most_a_quarter_of_its_lower_bound, .timeout = 30)
{
	for (unsigned i = 0; i + 1 < PGR__HIST_BUCKETS; i++) {
		uint64_t lo = pgr__hist_bucket_lo(i), hi = pgr__hist_bucket_hi(i);
		uint64_t width = hi - lo + 1;
		if (i < PGR__HIST_LINEAR)
			cr_assert_eq(width, 1, "linear bucket %u has width %llu", i,
			             (unsigned long long)width);
		else
			cr_assert_leq(width * PGR__HIST_SUB, lo, "bucket %u [%llu, %llu] too wide",
			              i, (unsigned long long)lo, (unsigned long long)hi);
	}
}

/* The Prometheus export relies on this: 2^k - 1 must close a bucket for every k it reports. */
Test(hist, power_of_two_minus_one_is_a_bucket_upper_bound, .timeout = 30)
{
	for (unsigned k = 1; k <= PGR__HIST_MAX_EXP; k++) {
		uint64_t edge = ((uint64_t)1 << k) - 1;
		cr_assert_eq(pgr__hist_bucket_hi(pgr__hist_bucket(edge)), edge, "k=%u", k);
	}
}

Test(hist, quantiles_of_uniform_microseconds_stay_within_one_bucket, .timeout = 30)
{
	pgr__hist *h = hist_new();
	for (uint64_t us = 1; us <= 1000; us++)
		pgr__hist_add(h, us * 1000);
	pgr__hist_snap s;
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_merge(&s, h);

	cr_assert_eq(s.count, 1000);
	cr_assert_eq(s.sum_ns, 500500ull * 1000);
	cr_assert_eq(s.max_ns, 1000000);

	uint64_t p50 = pgr__hist_snap_quantile(&s, 0.5);
	unsigned b50 = pgr__hist_bucket(500000);
	uint64_t w50 = pgr__hist_bucket_hi(b50) - pgr__hist_bucket_lo(b50) + 1;
	cr_assert(p50 >= 500000 && p50 <= 500000 + w50, "p50 = %llu", (unsigned long long)p50);

	uint64_t p99 = pgr__hist_snap_quantile(&s, 0.99);
	cr_assert(p99 >= 990000 && p99 <= s.max_ns, "p99 = %llu", (unsigned long long)p99);
	cr_assert_geq(pgr__hist_snap_quantile(&s, 0.999), p99);

	/* q = 0 still names a real value: the first one's bucket top. */
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.0), pgr__hist_bucket_hi(pgr__hist_bucket(1000)));
	cr_assert_eq(pgr__hist_snap_quantile(&s, 1.0), 1000000);

	pgr_hist_summary sum;
	pgr__hist_snap_summary(&s, &sum);
	cr_assert_eq(sum.count, 1000);
	cr_assert_eq(sum.sum_ns, 500500ull * 1000);
	cr_assert_eq(sum.max_ns, 1000000);
	cr_assert_eq(sum.p50_ns, p50);
	cr_assert_eq(sum.p99_ns, p99);
	cr_assert(sum.p50_ns <= sum.p90_ns && sum.p90_ns <= sum.p99_ns &&
	          sum.p99_ns <= sum.p999_ns && sum.p999_ns <= sum.max_ns);
	free(h);
}

/* Values 0..9 each own a bucket, so the rank arithmetic shows through exactly. */
Test(hist, quantile_picks_the_ceiling_rank, .timeout = 30)
{
	pgr__hist *h = hist_new();
	for (uint64_t v = 0; v < 10; v++)
		pgr__hist_add(h, v);
	pgr__hist_snap s;
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_merge(&s, h);

	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.0), 0);  /* rank 1 at least */
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.05), 0); /* ceil(0.5) = 1 */
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.1), 0);  /* rank 1 */
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.7), 6);  /* rank 7 */
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.71), 7); /* ceil(7.1) = 8 */
	cr_assert_eq(pgr__hist_snap_quantile(&s, 1.0), 9);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 2.0), 9);  /* clamped */
	cr_assert_eq(pgr__hist_snap_quantile(&s, -1.0), 0); /* clamped */
	free(h);
}

/* 0.07 * 100 is 7.000000000000001 in doubles; the rank must still be 7, not 8. */
Test(hist, quantile_rank_ignores_floating_point_noise, .timeout = 30)
{
	pgr__hist *h = hist_new();
	for (int i = 0; i < 7; i++)
		pgr__hist_add(h, 0);
	for (int i = 0; i < 93; i++)
		pgr__hist_add(h, 1);
	pgr__hist_snap s;
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_merge(&s, h);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.07), 0);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.071), 1);
	free(h);
}

Test(hist, quantile_is_capped_at_the_maximum, .timeout = 30)
{
	pgr__hist *h = hist_new();
	pgr__hist_add(h, 12345);
	pgr__hist_snap s;
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_merge(&s, h);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.5), 12345);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.999), 12345);

	/* The top bucket's bound is UINT64_MAX; the answer must still be the real maximum. */
	uint64_t big = (uint64_t)1 << 50;
	pgr__hist_add(h, big);
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_merge(&s, h);
	cr_assert_eq(pgr__hist_bucket(big), PGR__HIST_BUCKETS - 1);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 1.0), big);
	cr_assert_eq(s.sum_ns, big + 12345);
	free(h);
}

Test(hist, empty_histogram_reports_zero, .timeout = 30)
{
	pgr__hist *h = hist_new();
	pgr__hist_snap s;
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_merge(&s, h);
	cr_assert_eq(s.count, 0);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.0), 0);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 0.5), 0);
	cr_assert_eq(pgr__hist_snap_quantile(&s, 1.0), 0);
	cr_assert_eq(pgr__hist_snap_count_le(&s, UINT64_MAX), 0);
	pgr_hist_summary sum;
	memset(&sum, 0xff, sizeof(sum));
	pgr__hist_snap_summary(&s, &sum);
	cr_assert_eq(sum.count, 0);
	cr_assert_eq(sum.sum_ns, 0);
	cr_assert_eq(sum.p50_ns, 0);
	cr_assert_eq(sum.p90_ns, 0);
	cr_assert_eq(sum.p99_ns, 0);
	cr_assert_eq(sum.p999_ns, 0);
	cr_assert_eq(sum.max_ns, 0);
	free(h);
}

Test(hist, merge_sums_buckets_counts_and_sums_and_keeps_the_larger_max, .timeout = 30)
{
	pgr__hist *a = hist_new(), *b = hist_new();
	for (uint64_t v = 100; v < 200; v++)
		pgr__hist_add(a, v);
	for (uint64_t v = 5000; v < 5050; v++)
		pgr__hist_add(b, v);
	pgr__hist_add(b, 150);

	pgr__hist_snap s;
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_merge(&s, b); /* larger max first: merge must not overwrite it */
	pgr__hist_snap_merge(&s, a);

	cr_assert_eq(s.count, 151);
	uint64_t want_sum = 0;
	for (uint64_t v = 100; v < 200; v++)
		want_sum += v;
	for (uint64_t v = 5000; v < 5050; v++)
		want_sum += v;
	want_sum += 150;
	cr_assert_eq(s.sum_ns, want_sum);
	cr_assert_eq(s.max_ns, 5049);

	uint64_t total = 0;
	for (unsigned i = 0; i < PGR__HIST_BUCKETS; i++) {
		uint64_t want = atomic_load(&a->bucket[i]) + atomic_load(&b->bucket[i]);
		cr_assert_eq(s.bucket[i], want, "bucket %u", i);
		total += s.bucket[i];
	}
	cr_assert_eq(total, s.count);
	/* 150 sits in both inputs; its bucket must hold both. */
	cr_assert_eq(
	    pgr__hist_snap_count_le(&s, pgr__hist_bucket_hi(pgr__hist_bucket(150))) -
	        pgr__hist_snap_count_le(&s, pgr__hist_bucket_lo(pgr__hist_bucket(150)) - 1),
	    atomic_load(&a->bucket[pgr__hist_bucket(150)]) + 1);
	free(a);
	free(b);
}

Test(hist, count_le_is_exact_at_every_bucket_upper_bound, .timeout = 30)
{
	enum {
		N = 20000
	};
	static uint64_t vals[N];
	pgr__hist *h = hist_new();
	uint64_t s = 12345;
	for (int i = 0; i < N; i++) {
		vals[i] = rng_next(&s) >> (20 + rng_next(&s) % 44); /* 0 .. 2^44 */
		pgr__hist_add(h, vals[i]);
	}
	pgr__hist_snap snap;
	pgr__hist_snap_clear(&snap);
	pgr__hist_snap_merge(&snap, h);

	for (unsigned b = 0; b < PGR__HIST_BUCKETS; b++) {
		uint64_t edge = pgr__hist_bucket_hi(b);
		uint64_t want = 0;
		for (int i = 0; i < N; i++)
			want += vals[i] <= edge;
		cr_assert_eq(pgr__hist_snap_count_le(&snap, edge), want, "edge %llu (bucket %u)",
		             (unsigned long long)edge, b);
		/* Off an edge it may only undercount: the straddling bucket is left out. */
		if (b > PGR__HIST_LINEAR && b + 1 < PGR__HIST_BUCKETS) {
			uint64_t mid = pgr__hist_bucket_lo(b) + (edge - pgr__hist_bucket_lo(b)) / 2;
			uint64_t got = pgr__hist_snap_count_le(&snap, mid);
			want = 0;
			for (int i = 0; i < N; i++)
				want += vals[i] <= mid;
			cr_assert_leq(got, want, "count_le overcounts at %llu",
			              (unsigned long long)mid);
			cr_assert_eq(got,
			             pgr__hist_snap_count_le(&snap, pgr__hist_bucket_lo(b) - 1));
		}
	}
	cr_assert_eq(pgr__hist_snap_count_le(&snap, UINT64_MAX), N);
	free(h);
}
