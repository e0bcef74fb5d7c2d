/* SPDX-License-Identifier: PostgreSQL */
/*
 * System services for the layers above: futex wait/wake on shared words, the fork guard and
 * lazily backed memory.
 */
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sys.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

int pgr__futex_wait_abs(_Atomic uint32_t *addr, uint32_t val, int64_t deadline_ns)
{
	struct timespec ts;
	pgr__ns_to_timespec(deadline_ns, &ts);
	/* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time; MATCH_ANY pairs with WAKE. */
	long r = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_BITSET, val, &ts, NULL,
	                 FUTEX_BITSET_MATCH_ANY);
	return r == 0 ? 0 : -errno;
}

void pgr__futex_wake1(_Atomic uint32_t *addr)
{
	syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* See sys.h: process-wide by necessity, written only by the atfork child handler. */
_Atomic uint32_t pgr__fork_epoch_v;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
	atomic_fetch_add_explicit(&pgr__fork_epoch_v, 1, memory_order_relaxed);
}

static void fork_register(void)
{
	pthread_atfork(NULL, NULL, on_fork_child);
}

uint32_t pgr__fork_guard(void)
{
	pthread_once(&fork_once, fork_register);
	return atomic_load_explicit(&pgr__fork_epoch_v, memory_order_relaxed);
}

void *pgr__lazy_zalloc(size_t size)
{
	if (size == 0)
		return NULL;
	void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return NULL;
	/* A huge page would make the first write to a 4 KB waiter page resident as 2 MB. Advice
	 * only: where the kernel has no THP the call fails and changes nothing. */
	(void)madvise(m, size, MADV_NOHUGEPAGE);
	return m;
}

void pgr__lazy_free(void *mem, size_t size)
{
	if (mem)
		munmap(mem, size);
}

void pgr__lazy_populate(void *mem, size_t size)
{
	uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	uintptr_t lo = (uintptr_t)mem & ~(page - 1);
	uintptr_t hi = ((uintptr_t)mem + size + page - 1) & ~(page - 1);
	/* The range may cover a neighbour's bytes in its first or last page: populating writes
	 * nothing, so they are untouched. */
	(void)madvise((void *)lo, hi - lo, MADV_POPULATE_WRITE);
}
