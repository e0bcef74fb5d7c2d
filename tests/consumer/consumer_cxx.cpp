/* SPDX-License-Identifier: PostgreSQL */
// The public header from C++17: it must compile warning-free and link through extern "C".
#include <pgring.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

int main()
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	if (cfg.struct_size != sizeof(pgr_config) || !cfg.manager_thread)
		return 1;
	if (std::strcmp(pgr_strerror(-PGR_E_TOO_MANY_WAITERS), "") == 0)
		return 1;
	if (pgr_loop_owns(0) || pgr_pool_stats(nullptr, nullptr) != -EINVAL)
		return 1;
	std::printf("C++17: pgring %s, close reason %s\n", pgr_version_string(),
	            pgr_close_reason_name(PGR_CLOSE_DISCARDED));
	return 0;
}
