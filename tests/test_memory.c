/* SPDX-License-Identifier: PostgreSQL */
/*
 * What an idle pool keeps resident. The waiter slots (max_waiters) and the per-connection
 * histograms (max_size + max_overflow sets) are sized for the pool's limits but lazily backed:
 * pages become resident when used. mincore() tells which pages of an array are; a page reads
 * as resident once it is written (or read: these tests never read the arrays themselves).
 */
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "pool.h"
#include "testutil.h"

/* Resident pages of [mem, mem + size). */
static size_t resident_pages(const void *mem, size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	uintptr_t lo = (uintptr_t)mem & ~(uintptr_t)(page - 1);
	size_t n = ((uintptr_t)mem + size - lo + page - 1) / page;
	unsigned char *vec = calloc(n, 1);
	cr_assert(vec);
	cr_assert_eq(mincore((void *)lo, n * page, vec), 0);
	size_t r = 0;
	for (size_t i = 0; i < n; i++)
		r += vec[i] & 1;
	free(vec);
	return r;
}

static size_t pages_spanned(const void *mem, size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	uintptr_t lo = (uintptr_t)mem & ~(uintptr_t)(page - 1);
	return ((uintptr_t)mem + size - lo + page - 1) / page;
}

static pgr_pool *pool_of(uint32_t max_size, uint32_t min_idle, uint32_t max_waiters)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = max_size;
	cfg.min_idle = min_idle;
	cfg.max_waiters = max_waiters;
	return tu_pool(&cfg);
}

Test(memory, an_idle_pool_keeps_its_waiter_slots_and_unused_histograms_unbacked, .timeout = 30)
{
	pgr_pool *p = pool_of(64, 1, 4096);
	/* 4096 waiter slots are 256 KB and 64 histogram sets 276 KB: none of it was needed. */
	cr_assert_eq(resident_pages(p->waiters, sizeof(*p->waiters) * p->nwaiter_slots), 0,
	             "no caller ever waited, yet waiter pages are resident");
	/* The one open connection's set (the slot that connected) and nothing else. */
	uint32_t used = PGR__NONE;
	for (uint32_t i = 0; i < p->cap; i++)
		if (atomic_load(&p->conns[i].state) != PGR__FREE)
			used = i;
	cr_assert_neq(used, PGR__NONE);
	size_t res = resident_pages(p->hists, sizeof(*p->hists) * p->cap);
	size_t own = pages_spanned(&p->hists[used], sizeof(p->hists[used]));
	cr_assert(res >= 1 && res <= own,
	          "%zu histogram pages resident for one connection (its set spans %zu)", res, own);
	pgr_pool_destroy(p);
}

Test(memory, waiter_slots_are_reused_before_new_ones_are_touched, .timeout = 30)
{
	pgr_pool *p = pool_of(1, 1, 4096);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 1000, &held), 0);
	/* 200 callers in turn wait and time out: one slot serves them all. */
	for (int i = 0; i < 200; i++) {
		pgr_conn *c;
		int rc = pgr_acquire(p, 1, &c);
		cr_assert_eq(rc, -ETIMEDOUT, "wait %d: %s", i, pgr_strerror(rc));
	}
	cr_assert_eq(p->wq_fresh, 1, "%u slots taken for one waiter at a time", p->wq_fresh);
	cr_assert_eq(resident_pages(p->waiters, sizeof(*p->waiters) * p->nwaiter_slots), 1);
	cr_assert_eq(pgr_release(held), 0);
	pgr_pool_destroy(p);
}

/*
 * The histograms of a connection slot are written by the checkout path (hold time on every
 * release). Their pages are populated when the slot connects, so that first write does not
 * fault. The release of one connection warms the code and the stack; the release of the other,
 * whose histograms' last page nothing has written yet, is the one measured.
 */
Test(memory, the_first_release_of_a_new_connection_takes_no_page_fault, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = cfg.min_idle = 2;
	cfg.ping_after_idle_ms = -1;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *a, *b;
	cr_assert_eq(pgr_acquire(p, 1000, &a), 0);
	cr_assert_eq(pgr_acquire(p, 1000, &b), 0);
	/* The higher slot's set ends on a page of its own (the array starts page-aligned); the
	 * lower slot's last page is also the higher one's first. */
	if (pgr__slot(a)->id > pgr__slot(b)->id) {
		pgr_conn *t = a;
		a = b;
		b = t;
	}
	cr_assert_eq(pgr_release(a), 0);
	/* Under AddressSanitizer every write also reads the shadow of its address: read the
	 * histograms once so that those shadow pages are mapped. A read maps a page that was
	 * never populated as the shared zero page, so the release's write would still fault. */
	const pgr__hist *h = &pgr__slot(b)->hist[PGR_HIST_HOLD];
	(void)atomic_load(&h->bucket[0]);
	(void)atomic_load(&h->max_ns);
	struct rusage r0, r1;
	getrusage(RUSAGE_THREAD, &r0);
	int rc = pgr_release(b);
	getrusage(RUSAGE_THREAD, &r1);
	cr_assert_eq(rc, 0);
	cr_assert_eq(r1.ru_minflt - r0.ru_minflt, 0, "%ld page faults in the release",
	             r1.ru_minflt - r0.ru_minflt);
	pgr_pool_destroy(p);
}
