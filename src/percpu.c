/* SPDX-License-Identifier: PostgreSQL */
/* Setting up the per-CPU caches' kernel side: rseq and the expedited rseq membarrier. */
#include <linux/membarrier.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "percpu.h"

#define PGR__PCPU_MAX 1024u /* CPU ids past this take the shards (one cache line each) */

static long membarrier(int cmd, unsigned flags)
{
	return syscall(__NR_membarrier, cmd, flags, 0);
}

uint32_t pgr__percpu_setup(void)
{
#if PGR__HAVE_PERCPU
	/* glibc registers rseq for every thread it starts unless told not to (a tunable); a
	 * thread without it reads an invalid cpu_id, which the sequences send to the shards. */
	if (__rseq_size == 0 || (int32_t)pgr__rseq_area()->cpu_id < 0)
		return 0;
	long cmds = membarrier(MEMBARRIER_CMD_QUERY, 0);
	if (cmds < 0 || !(cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ))
		return 0;
	if (membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0) != 0)
		return 0;
	long n = sysconf(_SC_NPROCESSORS_CONF);
	if (n <= 0)
		return 0;
	return n > (long)PGR__PCPU_MAX ? PGR__PCPU_MAX : (uint32_t)n;
#else
	return 0;
#endif
}

int pgr__percpu_fence(void)
{
	/* Registered at pool create, so this cannot fail for want of registration; and if it
	 * failed for another reason, a sequence could commit behind a closed gate, handing one
	 * connection to two callers: refuse to go on. */
	if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, 0) != 0) {
		fprintf(stderr, "pgring: membarrier(PRIVATE_EXPEDITED_RSEQ) failed; aborting\n");
		abort();
	}
	return 0;
}
