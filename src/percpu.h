/* SPDX-License-Identifier: PostgreSQL */
/*
 * Per-CPU connection caches: one idle connection per CPU, taken and returned without a locked
 * instruction.
 *
 * Why: on one thread, acquire + release through the shard bitmaps costs two locked
 * read-modify-writes (the take's CAS, the return's fetch_or), about half of the whole call; a
 * mutex pool pays the same two pairs. A restartable sequence (rseq) lets a thread update data
 * of the CPU it runs on with plain loads and one plain store: if the thread is preempted,
 * migrated or signalled before that store, the kernel moves it to an abort handler and the
 * sequence starts over, so no other thread on that CPU can interleave and the thread cannot
 * commit on a CPU it no longer runs on.
 *
 * The cache holds one connection id per CPU, on its own cache line. The owner CPU's sequences
 * are the only writers while the gate is open (gate == 0). Anyone else who needs the cached
 * connections (a caller about to wait, the manager claiming one, a drain) closes the gate: it
 * counts itself in, then a membarrier (MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ) interrupts every
 * CPU running a thread of this process, which aborts any sequence in progress there and makes
 * every committed one visible; sequences that start later read the gate inside the sequence and
 * fall back to the bitmaps. Then the closer moves every cached connection into the bitmaps,
 * where the rest of the pool sees it. While the gate is closed the caches stay empty. The
 * membarrier (a system call and an interrupt on each CPU running the process, a few
 * microseconds) is paid only when the gate goes from open to closed; later closers find it
 * fenced and only count themselves in.
 *
 * The waiter/releaser Dekker pair (waiters.c) stays intact: a waiter closes the gate before it
 * sleeps (a loop's waiter before it counts itself in nwaiters; a blocking one after its spin,
 * which needs no gate because a spinning waiter is running), so a release that commits to a
 * cache did so before the waiter's fence (and the waiter's flush finds it, before the waiter
 * sleeps), and a release after it finds the gate closed and takes the atomic path, which reads
 * nwaiters. A caller that waits and is served while it spins pays no fence at all.
 *
 * Builds under ThreadSanitizer, which cannot see inside a restartable sequence, and machines
 * without rseq (glibc not registering it, another architecture) or without the membarrier
 * command (old kernels, seccomp) keep the atomic path only; pgr__pool_set_percpu switches a
 * pool to it for tests and benchmarks.
 */
#ifndef PGR_PERCPU_H
#define PGR_PERCPU_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#if defined(__has_feature)
#if !__has_feature(thread_sanitizer)
#define PGR__HAVE_PERCPU 1
#endif
#else
#define PGR__HAVE_PERCPU 1
#endif
#endif
#ifndef PGR__HAVE_PERCPU
#define PGR__HAVE_PERCPU 0
#endif

#if PGR__HAVE_PERCPU
#include <sys/rseq.h>
#endif

#define PGR__PCPU_EMPTY  UINT32_MAX       /* a cache with nothing in it */
#define PGR__PCPU_CLOSED (UINT32_MAX - 1) /* gate closed, or a CPU beyond the table */
#define PGR__PCPU_ABORT  (UINT32_MAX - 2) /* the sequence was interrupted: try again */

/* One CPU's cache; its own cache line, written only by that CPU while the gate is open. */
struct pgr__pcpu {
	_Atomic uint32_t id;
	char pad[60];
};

/* The sequences index the caches with a shift by 6. */
_Static_assert(sizeof(struct pgr__pcpu) == 64, "one cache line per CPU cache");

/* Gate word: bit 0 = fenced (a membarrier ran since the count left 0), the rest a count. */
#define PGR__GATE_FENCED 1u
#define PGR__GATE_ONE    2u

#if PGR__HAVE_PERCPU

/*
 * The signature the kernel checks in the 4 bytes before an abort handler: the one glibc
 * registered every thread's rseq area with (RSEQ_SIG, <sys/rseq.h>); a handler without it kills
 * the process with SIGSEGV.
 */
#define PGR__STR_(x)  #x
#define PGR__STR(x)   PGR__STR_(x)
#define PGR__RSEQ_SIG PGR__STR(RSEQ_SIG)

static inline struct rseq *pgr__rseq_area(void)
{
	return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

/*
 * The two sequences share their frame; only the middle differs.
 *
 * Enter: the descriptor (section __rseq_cs) tells the kernel where the sequence starts (1:),
 * where it ends (2:, just past the committing store) and where to go when interrupted (4:). The
 * CPU number is read inside the sequence, so a migration after reading it aborts it; a CPU past
 * the table goes to 5: (CLOSED). The gate is read inside too: a closer's membarrier either
 * aborts this sequence or comes after its commit. Leaves %rax pointing at this CPU's cache.
 *
 * Leave: the abort handler, behind the signature; 5: for CLOSED; 6: the way out, which clears
 * the descriptor pointer rather than leave it for the kernel to clear: it points into this
 * library, which a dlclose could unmap.
 */
#define PGR__RSEQ_ENTER                                                                            \
	".pushsection __rseq_cs, \"aw\"\n\t"                                                       \
	".balign 32\n\t"                                                                           \
	"3:\n\t"                                                                                   \
	".long 0, 0\n\t"                                                                           \
	".quad 1f, (2f - 1f), 4f\n\t"                                                              \
	".popsection\n\t"                                                                          \
	"leaq 3b(%%rip), %%rax\n\t"                                                                \
	"movq %%rax, %c[cs](%[rs])\n\t"                                                            \
	"1:\n\t"                                                                                   \
	"movl %c[cpu](%[rs]), %%eax\n\t"                                                           \
	"cmpl %[ncpus], %%eax\n\t"                                                                 \
	"jae 5f\n\t"                                                                               \
	"cmpq $0, (%[gate])\n\t"                                                                   \
	"jne 5f\n\t"                                                                               \
	"shlq $6, %%rax\n\t"                                                                       \
	"addq %[slots], %%rax\n\t"
/* ud1 <sig>(%rip), %edi: the signature disassembles as one instruction that would trap if ever
 * executed. */
#define PGR__RSEQ_LEAVE                                                                            \
	".pushsection __rseq_failure, \"ax\"\n\t"                                                  \
	".byte 0x0f, 0xb9, 0x3d\n\t"                                                               \
	".long " PGR__RSEQ_SIG "\n\t"                                                              \
	"4:\n\t"                                                                                   \
	"movl $-3, %[ret]\n\t"                                                                     \
	"jmp 6f\n\t"                                                                               \
	".popsection\n\t"                                                                          \
	"5:\n\t"                                                                                   \
	"movl $-2, %[ret]\n\t"                                                                     \
	"6:\n\t"                                                                                   \
	"movq $0, %c[cs](%[rs])\n\t"
#define PGR__RSEQ_INPUTS                                                                           \
	[rs] "r"(rs), [cs] "i"(offsetof(struct rseq, rseq_cs)),                                    \
	    [cpu] "i"(offsetof(struct rseq, cpu_id)), [ncpus] "r"(ncpus), [gate] "r"(gate),        \
	    [slots] "r"(slots)

/* Take the calling CPU's cached connection. Returns its id, or EMPTY, CLOSED or ABORT. */
static inline uint32_t pgr__pcpu_pop(struct pgr__pcpu *slots, uint32_t ncpus,
                                     const _Atomic uint64_t *gate)
{
	uint32_t ret;
	struct rseq *rs = pgr__rseq_area();
	__asm__ __volatile__(PGR__RSEQ_ENTER "movl (%%rax), %[ret]\n\t"
	                                     "cmpl $-1, %[ret]\n\t"
	                                     "je 6f\n\t"
	                                     "movl $-1, (%%rax)\n\t"
	                                     "2:\n\t"
	                                     "jmp 6f\n\t" PGR__RSEQ_LEAVE
	                     : [ret] "=&r"(ret)
	                     : PGR__RSEQ_INPUTS
	                     : "rax", "memory", "cc");
	return ret;
}

/*
 * Put connection id into the calling CPU's cache. Returns 0 when committed, or CLOSED (gate
 * closed, cache full, CPU beyond the table) or ABORT. Everything the caller wrote to the
 * connection before this call is visible to whoever takes it next: x86 keeps stores in program
 * order, the "memory" clobber keeps the compiler from sinking them below the commit, and a
 * taker on another CPU reads the cache only after a membarrier, which drains this CPU's stores.
 */
static inline uint32_t pgr__pcpu_push(struct pgr__pcpu *slots, uint32_t ncpus,
                                      const _Atomic uint64_t *gate, uint32_t id)
{
	uint32_t ret;
	struct rseq *rs = pgr__rseq_area();
	__asm__ __volatile__(PGR__RSEQ_ENTER "cmpl $-1, (%%rax)\n\t"
	                                     "jne 5f\n\t"
	                                     "movl %[id], (%%rax)\n\t"
	                                     "2:\n\t"
	                                     "xorl %[ret], %[ret]\n\t"
	                                     "jmp 6f\n\t" PGR__RSEQ_LEAVE
	                     : [ret] "=&r"(ret)
	                     : PGR__RSEQ_INPUTS, [id] "r"(id)
	                     : "rax", "memory", "cc");
	return ret;
}

#else

static inline uint32_t pgr__pcpu_pop(struct pgr__pcpu *slots, uint32_t ncpus,
                                     const _Atomic uint64_t *gate)
{
	(void)slots, (void)ncpus, (void)gate;
	return PGR__PCPU_CLOSED;
}

static inline uint32_t pgr__pcpu_push(struct pgr__pcpu *slots, uint32_t ncpus,
                                      const _Atomic uint64_t *gate, uint32_t id)
{
	(void)slots, (void)ncpus, (void)gate, (void)id;
	return PGR__PCPU_CLOSED;
}

#endif

/*
 * Whether this process can run the caches: rseq registered by glibc for the calling thread, and
 * the expedited rseq membarrier registered (a process-wide kernel setting that is idempotent and
 * harmless to other code). Returns the number of CPU caches to allocate, or 0.
 */
uint32_t pgr__percpu_setup(void);

/* The fence of a gate that just closed: aborts or completes every sequence in flight. */
int pgr__percpu_fence(void);

#endif
