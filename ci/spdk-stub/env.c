/*
 * STAND-IN, NOT SPDK: the environment half of Carmine's SPDK test double
 * (ci/spdk-stub/README.md). Real SPDK initializes DPDK here (hugepages, IOMMU, PCI access) and
 * hands out pinned memory with bus addresses. This file only keeps the rules Carmine must obey:
 * initialize once, with opts_size set; payloads must come from spdk_dma_zmalloc or from
 * spdk_mem_register'ed ranges, which must be 2 MiB aligned in address and length.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spdk/env.h"
#include "stub_internal.h"

#define TWO_MIB ((size_t)2 << 20)
/* Bounds on the tables below: Carmine allocates a handful of buffers per queue pair and
 * registers at most a few dozen regions. */
#define DMA_ALLOCATIONS_MAX 4096
#define REGISTRATIONS_MAX 256

struct range {
	uintptr_t start;
	size_t len;
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static bool g_initialized;
static struct range g_dma[DMA_ALLOCATIONS_MAX];
static size_t g_dma_count;
static struct range g_registered[REGISTRATIONS_MAX];
static size_t g_registered_count;

void spdk_env_opts_init(struct spdk_env_opts *opts)
{
	if (opts == NULL) {
		return;
	}
	size_t opts_size = opts->opts_size;
	memset(opts, 0, sizeof(*opts));
	opts->name = "spdk";
	opts->core_mask = "0x1";
	opts->shm_id = -1;
	opts->mem_channel = -1;
	opts->main_core = -1;
	opts->mem_size = -1;
	opts->opts_size = opts_size;
}

int spdk_env_init(const struct spdk_env_opts *opts)
{
	pthread_mutex_lock(&g_lock);
	int rc = 0;
	if (opts == NULL || g_initialized) {
		fprintf(stderr, "spdk-stub: spdk_env_init called twice or without options\n");
		rc = -EINVAL;
	} else if (opts->opts_size == 0) {
		fprintf(stderr, "spdk-stub: spdk_env_opts.opts_size must be set\n");
		rc = -EINVAL;
	} else {
		g_initialized = true;
	}
	pthread_mutex_unlock(&g_lock);
	return rc;
}

bool stub_env_initialized(void)
{
	pthread_mutex_lock(&g_lock);
	bool initialized = g_initialized;
	pthread_mutex_unlock(&g_lock);
	return initialized;
}

void *spdk_dma_zmalloc(size_t size, size_t align, uint64_t *phys_addr)
{
	if (!stub_env_initialized() || size == 0) {
		return NULL;
	}
	if (align < 64) {
		align = 64;
	}
	if ((align & (align - 1)) != 0) {
		return NULL;
	}
	size_t rounded = (size + align - 1) / align * align;
	void *buf = aligned_alloc(align, rounded);
	if (buf == NULL) {
		return NULL;
	}
	memset(buf, 0, rounded);
	pthread_mutex_lock(&g_lock);
	if (g_dma_count == DMA_ALLOCATIONS_MAX) {
		pthread_mutex_unlock(&g_lock);
		free(buf);
		return NULL;
	}
	g_dma[g_dma_count++] = (struct range){(uintptr_t)buf, rounded};
	pthread_mutex_unlock(&g_lock);
	if (phys_addr != NULL) {
		/* No IOMMU here: the "bus address" is the virtual one. */
		*phys_addr = (uint64_t)(uintptr_t)buf;
	}
	return buf;
}

void spdk_dma_free(void *buf)
{
	if (buf == NULL) {
		return;
	}
	pthread_mutex_lock(&g_lock);
	for (size_t i = 0; i < g_dma_count; i++) {
		if (g_dma[i].start == (uintptr_t)buf) {
			g_dma[i] = g_dma[--g_dma_count];
			pthread_mutex_unlock(&g_lock);
			free(buf);
			return;
		}
	}
	pthread_mutex_unlock(&g_lock);
	fprintf(stderr, "spdk-stub: spdk_dma_free(%p): not from spdk_dma_zmalloc\n", buf);
	abort();
}

static bool overlaps(const struct range *r, uintptr_t start, size_t len)
{
	return start < r->start + r->len && r->start < start + len;
}

int spdk_mem_register(void *vaddr, size_t len)
{
	uintptr_t start = (uintptr_t)vaddr;
	if (!stub_env_initialized()) {
		return -EINVAL;
	}
	if (len == 0 || start % TWO_MIB != 0 || len % TWO_MIB != 0) {
		/* Real SPDK refuses these too: its translation maps are per 2 MiB. */
		return -EINVAL;
	}
	pthread_mutex_lock(&g_lock);
	int rc = 0;
	for (size_t i = 0; i < g_registered_count; i++) {
		if (overlaps(&g_registered[i], start, len)) {
			rc = -EBUSY;
		}
	}
	if (rc == 0 && g_registered_count == REGISTRATIONS_MAX) {
		rc = -ENOMEM;
	}
	if (rc == 0) {
		g_registered[g_registered_count++] = (struct range){start, len};
	}
	pthread_mutex_unlock(&g_lock);
	return rc;
}

int spdk_mem_unregister(void *vaddr, size_t len)
{
	pthread_mutex_lock(&g_lock);
	for (size_t i = 0; i < g_registered_count; i++) {
		if (g_registered[i].start == (uintptr_t)vaddr && g_registered[i].len == len) {
			g_registered[i] = g_registered[--g_registered_count];
			pthread_mutex_unlock(&g_lock);
			return 0;
		}
	}
	pthread_mutex_unlock(&g_lock);
	return -EINVAL;
}

bool stub_is_dma_safe(const void *addr, size_t len)
{
	uintptr_t start = (uintptr_t)addr;
	bool safe = false;
	pthread_mutex_lock(&g_lock);
	for (size_t i = 0; i < g_dma_count && !safe; i++) {
		safe = start >= g_dma[i].start && start + len <= g_dma[i].start + g_dma[i].len;
	}
	for (size_t i = 0; i < g_registered_count && !safe; i++) {
		safe = start >= g_registered[i].start &&
		       start + len <= g_registered[i].start + g_registered[i].len;
	}
	pthread_mutex_unlock(&g_lock);
	return safe;
}
