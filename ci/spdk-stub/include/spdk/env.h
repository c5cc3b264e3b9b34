/*
 * STAND-IN, NOT SPDK. Part of Carmine's SPDK test double (ci/spdk-stub/README.md).
 *
 * Declares only the subset of SPDK's environment API (spdk/env.h, SPDK v24.09 and later) that
 * Carmine calls, under SPDK's names, types and signatures, so that bindgen and Carmine's Rust
 * code compile against this header exactly as against the real one. Written for Carmine from
 * SPDK's public documentation; no SPDK code is copied. Struct layouts are NOT SPDK's: only the
 * fields Carmine touches exist here, which is enough because Carmine takes every size from
 * these headers (bindgen) and never hard-codes one.
 */
#ifndef SPDK_ENV_H
#define SPDK_ENV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPDK_ENV_SOCKET_ID_ANY (-1)

/* Environment initialization options (the fields Carmine sets; SPDK has more). */
struct spdk_env_opts {
	const char *name;
	const char *core_mask;
	int shm_id;
	int mem_channel;
	int main_core;
	int mem_size;
	bool no_pci;
	/* Since SPDK v24.09: the caller sets it to sizeof(struct spdk_env_opts). */
	size_t opts_size;
};

/* Fills opts with defaults. */
void spdk_env_opts_init(struct spdk_env_opts *opts);

/* Initializes the environment once per process: 0, or a negative errno. */
int spdk_env_init(const struct spdk_env_opts *opts);

/* Pinned, DMA-able, zeroed memory of size bytes aligned to align; NULL when out of memory.
 * phys_addr, when not NULL, receives the bus address. */
void *spdk_dma_zmalloc(size_t size, size_t align, uint64_t *phys_addr);

/* Frees memory from spdk_dma_zmalloc. */
void spdk_dma_free(void *buf);

/* Makes vaddr..vaddr+len (both multiples of 2 MiB) usable for DMA: 0 or a negative errno. */
int spdk_mem_register(void *vaddr, size_t len);

/* Undoes spdk_mem_register of exactly that range: 0 or a negative errno. */
int spdk_mem_unregister(void *vaddr, size_t len);

#ifdef __cplusplus
}
#endif

#endif
