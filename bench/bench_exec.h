/* SPDX-License-Identifier: PostgreSQL */
/* pgr_bench's "exec" section (bench_exec.c): pgr_loop_exec beside the checkout path and
 * pgbench, on one loop thread. Prints its table (unless json) and JSON lines; 0 or -1. */
#ifndef PGR_BENCH_EXEC_H
#define PGR_BENCH_EXEC_H

#include <stdbool.h>

int bench_exec_run(const char *conninfo, double dur_s, bool json);

#endif
