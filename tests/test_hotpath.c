/* SPDX-License-Identifier: PostgreSQL */
/*
 * The checkout path of an idle connection makes no system call and no allocation.
 *
 * System calls: the measuring thread installs a seccomp filter (on itself only: no TSYNC)
 * that traps every system call but exit and rt_sigreturn; the SIGSYS handler counts the call,
 * records its number and makes it fail with -ENOSYS instead of running. The other threads
 * (the pool's manager ticking every 10 ms, Criterion's) are not filtered, so their calls do
 * not count. Allocations: malloc and friends are interposed in this binary (sanitizer builds
 * use the sanitizer's allocation hook instead, since they own malloc) and counted while the
 * measuring thread says so. Each detector has a control that proves it sees what it should.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include "testutil.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED 1
#endif
#endif

/* ---- allocation counter ---- */

static _Thread_local int counting_allocs;
static _Atomic uint64_t allocs;

#ifdef SANITIZED
/* From the sanitizer runtime's allocator interface (the header is not always installed). */
int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void *, size_t),
                                              void (*free_hook)(const volatile void *));
static void on_malloc(const volatile void *ptr, size_t size)
{
	(void)ptr;
	(void)size;
	if (counting_allocs)
		allocs++;
}
static void on_free(const volatile void *ptr)
{
	(void)ptr;
}
static void alloc_hook_install(void)
{
	__sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
}
#else
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static inline void count_alloc(void)
{
	if (counting_allocs)
		allocs++;
}
void *malloc(size_t n)
{
	count_alloc();
	return __libc_malloc(n);
}
void *calloc(size_t n, size_t m)
{
	count_alloc();
	return __libc_calloc(n, m);
}
void *realloc(void *p, size_t n)
{
	count_alloc();
	return __libc_realloc(p, n);
}
void *aligned_alloc(size_t a, size_t n)
{
	count_alloc();
	return __libc_memalign(a, n);
}
int posix_memalign(void **out, size_t a, size_t n)
{
	count_alloc();
	void *p = __libc_memalign(a, n);
	if (!p)
		return ENOMEM;
	*out = p;
	return 0;
}
static void alloc_hook_install(void)
{
}
#endif

/* ---- system call trap ---- */

#define MAX_SEEN 16
static _Atomic uint64_t syscalls;
static int seen_nr[MAX_SEEN];

static void on_sigsys(int sig, siginfo_t *si, void *ctx)
{
	(void)sig;
	uint64_t n = syscalls++;
	if (n < MAX_SEEN)
		seen_nr[n] = si->si_syscall;
	ucontext_t *uc = ctx;
#if defined(__x86_64__)
	uc->uc_mcontext.gregs[REG_RAX] = -ENOSYS;
#elif defined(__aarch64__)
	uc->uc_mcontext.regs[0] = (unsigned long long)-ENOSYS;
#else
#error "set the system call's return register for this architecture"
#endif
}

#if defined(__x86_64__)
#define AUDIT_ARCH_NATIVE AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define AUDIT_ARCH_NATIVE AUDIT_ARCH_AARCH64
#endif

/* From here on every system call of this thread traps, except exit and rt_sigreturn. */
static void trap_syscalls_of_this_thread(void)
{
	struct sock_filter f[] = {
	    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
	    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_NATIVE, 1, 0),
	    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
	    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
	    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_exit, 2, 0),
	    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_rt_sigreturn, 1, 0),
	    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
	    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = sizeof(f) / sizeof(f[0]), .filter = f};
	cr_assert_eq(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
	cr_assert_eq(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog), 0, "seccomp: %s",
	             strerror(errno));
}

/*
 * What runs in the filtered thread. It may not call cr_assert (that writes to a pipe): it
 * records what it sees, and the test thread asserts. After the filter is on, the thread makes
 * no call that needs the kernel except its exit.
 */
struct job {
	pgr_pool *pool;
	int rounds;
	int control; /* 1: one getpid(); 2: one malloc */
	int failed_rc;
	int failures;
	bool pinned;
	uint64_t syscalls, allocs;
};

static void *filtered_main(void *a)
{
	struct job *j = a;
	/*
	 * The promise is for a connection idle where the caller runs: in its CPU's cache or in a
	 * shard. One cached by another CPU costs a membarrier to take (README, "The checkout
	 * path"), so the thread stays on one CPU and takes the connection there once before the
	 * filter goes on.
	 */
	cpu_set_t one;
	CPU_ZERO(&one);
	CPU_SET(sched_getcpu(), &one);
	j->pinned = sched_setaffinity(0, sizeof(one), &one) == 0;
	pgr_conn *w;
	if (pgr_acquire(j->pool, 1000, &w) == 0)
		pgr_release(w);
	trap_syscalls_of_this_thread();
	syscalls = 0;
	allocs = 0;
	counting_allocs = 1;
	if (j->control == 1)
		(void)getpid(); /* a real system call in glibc 2.36: not cached */
	if (j->control == 2) {
		void *volatile m = malloc(24);
		free(m);
	}
	for (int i = 0; i < j->rounds; i++) {
		pgr_conn *c;
		int rc = pgr_acquire(j->pool, 1000, &c);
		if (rc == 0)
			rc = pgr_release(c);
		if (rc) {
			j->failed_rc = rc;
			j->failures++;
		}
	}
	counting_allocs = 0;
	j->syscalls = syscalls;
	j->allocs = allocs;
	/*
	 * Leave with the bare exit system call: the usual thread exit makes system calls that now
	 * fail, and a sanitizer runtime's bookkeeping spins on them. pthread_join still returns:
	 * the kernel clears the thread id and wakes the joiner.
	 */
	syscall(SYS_exit, 0);
	return NULL;
}

static void run_filtered(struct job *j)
{
	struct sigaction sa = {.sa_sigaction = on_sigsys, .sa_flags = SA_SIGINFO};
	sigemptyset(&sa.sa_mask);
	cr_assert_eq(sigaction(SIGSYS, &sa, NULL), 0);
	alloc_hook_install();
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, filtered_main, j), 0);
	cr_assert_eq(pthread_join(t, NULL), 0);
}

static pgr_pool *one_idle_conn(void)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	/* The promise is for a connection idle in the caller's shard and not idle long enough to
	 * be pinged or checked: those are the documented exceptions. */
	cfg.ping_after_idle_ms = -1;
	cfg.check_after_idle_ms = 3600 * 1000;
	cfg.leak_threshold_ms = 60000; /* records the acquire site too */
	pgr_pool *p = tu_pool(&cfg);
	/* A connection's first checkout after its connect always polls its socket (the coarse
	 * clock cannot tell how long it has really been idle); the promise is about the ones
	 * after that. */
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	cr_assert_eq(pgr_release(c), 0);
	return p;
}

#define ROUNDS 100000

Test(hotpath, acquire_and_release_of_an_idle_connection_make_no_system_call_or_allocation,
     .timeout = 60)
{
	pgr_pool *p = one_idle_conn();
	struct job j = {.pool = p, .rounds = ROUNDS};
	run_filtered(&j);
	cr_assert(j.pinned, "could not pin the measuring thread to its CPU");
	cr_assert_eq(j.failures, 0, "%d failed checkouts (%s)", j.failures,
	             pgr_strerror(j.failed_rc));
	cr_assert_eq(j.syscalls, 0, "%llu system calls in %d checkouts, first: nr %d",
	             (unsigned long long)j.syscalls, ROUNDS, seen_nr[0]);
	cr_assert_eq(j.allocs, 0, "%llu allocations in %d checkouts", (unsigned long long)j.allocs,
	             ROUNDS);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.acquires, ROUNDS + 2);
	cr_assert_eq(s.acquired_immediately, ROUNDS + 2,
	             "every checkout found the idle connection");
	pgr_pool_destroy(p);
}

Test(hotpath, control_the_system_call_trap_sees_a_getpid, .timeout = 30)
{
	pgr_pool *p = one_idle_conn();
	struct job j = {.pool = p, .rounds = 1000, .control = 1};
	run_filtered(&j);
	cr_assert_eq(j.failures, 0);
	cr_assert_eq(j.syscalls, 1, "the trap counted %llu system calls for one getpid (%d, %d)",
	             (unsigned long long)j.syscalls, seen_nr[0], seen_nr[1]);
	cr_assert_eq(seen_nr[0], __NR_getpid);
	pgr_pool_destroy(p);
}

Test(hotpath, control_the_allocation_counter_sees_a_malloc, .timeout = 30)
{
	pgr_pool *p = one_idle_conn();
	struct job j = {.pool = p, .rounds = 1000, .control = 2};
	run_filtered(&j);
	cr_assert_eq(j.failures, 0);
	cr_assert_eq(j.allocs, 1, "the counter saw %llu allocations for one malloc",
	             (unsigned long long)j.allocs);
	pgr_pool_destroy(p);
}
