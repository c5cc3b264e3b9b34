/*
 * STAND-IN, NOT SPDK: shared between the stand-in's env.c and nvme.c, not part of the API.
 */
#ifndef CARMINE_SPDK_STUB_INTERNAL_H
#define CARMINE_SPDK_STUB_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

/* Whether spdk_env_init succeeded in this process. */
bool stub_env_initialized(void);

/* Whether addr..addr+len lies inside one spdk_dma_zmalloc allocation or one spdk_mem_register
 * region: what real SPDK can translate to a bus address (spdk_vtophys). */
bool stub_is_dma_safe(const void *addr, size_t len);

#endif
