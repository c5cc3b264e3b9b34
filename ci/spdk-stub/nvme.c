/*
 * STAND-IN, NOT SPDK: the NVMe half of Carmine's SPDK test double (ci/spdk-stub/README.md).
 *
 * One emulated controller per transport address, attached at most once per process, with one
 * namespace (id 1, 512-byte sectors) held in RAM, optionally loaded from and flushed to a file.
 * What it emulates, so that Carmine's SPDK backend is exercised the way a device would:
 * - asynchronous completion: a command does nothing when submitted; each call of
 *   spdk_nvme_qpair_process_completions completes a random subset of the commands out (each
 *   with probability 1/2), in random order, at most max_completions of them;
 * - a volatile write cache: a completed write is in RAM only; a flush writes every dirty page
 *   to the backing file and fdatasync()s it; detaching without a flush loses what was not
 *   flushed (stricter than a real controller, whose shutdown flushes its cache);
 * - DMA rules: a payload outside spdk_dma_zmalloc memory and spdk_mem_register'ed ranges fails
 *   with "invalid field", as real SPDK fails a request whose address it cannot translate;
 * - request accounting: a queue pair accepts io_queue_requests request objects, a transfer
 *   over the maximum transfer size takes one per piece plus a parent (as SPDK splits it), and
 *   a submission past that returns -ENOMEM;
 * - injectable errors, chosen by the data (so tests need no side channel): a sector written
 *   with WRITE_FAULT_MAGIC at its start fails the whole write (media error "write fault",
 *   nothing applied); a sector stored with READ_ERROR_MAGIC at its start fails every read of it
 *   (media error "unrecovered read error") until it is rewritten.
 *
 * Environment (stand-in only): SPDK_STUB_DIR=dir keeps the namespace of traddr T in file
 * dir/T.img (created if missing); SPDK_STUB_NS_MIB=n sizes a new namespace (default 256).
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "spdk/nvme.h"
#include "stub_internal.h"

#define SECTOR_BYTES 512u
#define PAGE_BYTES 4096u
#define MAX_IO_XFER_BYTES (128u * 1024u)
#define CONTROLLERS_MAX 16
#define SGES_PER_COMMAND_MAX 128
#define IO_QUEUE_REQUESTS_MAX 65536u
#define DEFAULT_IO_QUEUE_SIZE 256u
#define DEFAULT_IO_QUEUE_REQUESTS 512u
#define DEFAULT_NS_MIB 256u

static const char READ_ERROR_MAGIC[16] = "CARMINE-STUB-EIO";
static const char WRITE_FAULT_MAGIC[16] = "CARMINE-STUB-WFT";

enum opcode { OP_READ, OP_WRITE, OP_FLUSH };

struct sge {
	uint8_t *addr;
	uint32_t len;
};

struct command {
	enum opcode op;
	uint64_t lba;
	uint32_t lba_count;
	uint32_t requests; /* request objects it holds */
	spdk_nvme_cmd_cb cb;
	void *cb_arg;
	/* Set at submission when the payload breaks a rule; completes with this status. */
	uint16_t sct, sc;
	uint32_t sge_count;
	struct sge sges[SGES_PER_COMMAND_MAX];
};

struct spdk_nvme_ns {
	struct spdk_nvme_ctrlr *ctrlr;
	uint32_t id;
};

struct spdk_nvme_ctrlr {
	char traddr[SPDK_NVMF_TRADDR_MAX_LEN + 1];
	struct spdk_nvme_ns ns;
	uint64_t sectors;
	/* Guards image and dirty: every queue pair (one per thread) touches them. */
	pthread_mutex_t lock;
	uint8_t *image;
	uint8_t *dirty; /* one byte per page: written since the last flush */
	int fd;         /* backing file, or -1 for RAM only */
	uint32_t qpairs;
};

struct spdk_nvme_qpair {
	struct spdk_nvme_ctrlr *ctrlr;
	uint32_t requests_max, requests_used;
	uint32_t commands_max;
	struct command *commands;
	uint32_t *free_commands; /* stack */
	uint32_t free_count;
	uint32_t *pending; /* submitted, not completed */
	uint32_t pending_count;
	uint32_t *batch; /* scratch for process_completions */
	uint64_t rng;
	bool in_completions;
};

static pthread_mutex_t g_ctrlrs_lock = PTHREAD_MUTEX_INITIALIZER;
static struct spdk_nvme_ctrlr *g_ctrlrs[CONTROLLERS_MAX];

int spdk_nvme_transport_id_parse(struct spdk_nvme_transport_id *trid, const char *str)
{
	if (trid == NULL || str == NULL) {
		return -EINVAL;
	}
	const char *p = str;
	while (*p != '\0') {
		while (isspace((unsigned char)*p)) {
			p++;
		}
		if (*p == '\0') {
			break;
		}
		const char *key = p;
		while (*p != '\0' && *p != ':' && *p != '=' && !isspace((unsigned char)*p)) {
			p++;
		}
		size_t key_len = (size_t)(p - key);
		if (*p != ':' && *p != '=') {
			fprintf(stderr, "spdk-stub: transport ID key without a value in '%s'\n", str);
			return -EINVAL;
		}
		p++;
		const char *value = p;
		while (*p != '\0' && !isspace((unsigned char)*p)) {
			p++;
		}
		size_t value_len = (size_t)(p - value);
		char *dest = NULL;
		size_t dest_size = 0;
		if (key_len == 6 && strncasecmp(key, "trtype", 6) == 0) {
			if (value_len == 4 && strncasecmp(value, "PCIe", 4) == 0) {
				trid->trtype = SPDK_NVME_TRANSPORT_PCIE;
			} else if (value_len == 3 && strncasecmp(value, "TCP", 3) == 0) {
				trid->trtype = SPDK_NVME_TRANSPORT_TCP;
			} else if (value_len == 4 && strncasecmp(value, "RDMA", 4) == 0) {
				trid->trtype = SPDK_NVME_TRANSPORT_RDMA;
			} else {
				return -ENOENT;
			}
			dest = trid->trstring;
			dest_size = sizeof(trid->trstring);
		} else if (key_len == 6 && strncasecmp(key, "traddr", 6) == 0) {
			dest = trid->traddr;
			dest_size = sizeof(trid->traddr);
		} else if (key_len == 7 && strncasecmp(key, "trsvcid", 7) == 0) {
			dest = trid->trsvcid;
			dest_size = sizeof(trid->trsvcid);
		} else if (key_len == 6 && strncasecmp(key, "subnqn", 6) == 0) {
			dest = trid->subnqn;
			dest_size = sizeof(trid->subnqn);
		} else if (key_len == 6 && strncasecmp(key, "adrfam", 6) == 0) {
			trid->adrfam = (value_len == 4 && strncasecmp(value, "IPv6", 4) == 0)
					       ? SPDK_NVMF_ADRFAM_IPV6
					       : SPDK_NVMF_ADRFAM_IPV4;
		} else {
			fprintf(stderr, "spdk-stub: unknown transport ID key '%.*s'\n", (int)key_len,
				key);
			return -EINVAL;
		}
		if (dest != NULL) {
			if (value_len == 0 || value_len >= dest_size) {
				return -EINVAL;
			}
			memcpy(dest, value, value_len);
			dest[value_len] = '\0';
		}
	}
	return 0;
}

static uint64_t env_mib(void)
{
	const char *text = getenv("SPDK_STUB_NS_MIB");
	if (text == NULL) {
		return DEFAULT_NS_MIB;
	}
	char *end = NULL;
	unsigned long long mib = strtoull(text, &end, 10);
	return (end != text && *end == '\0' && mib > 0) ? mib : DEFAULT_NS_MIB;
}

/* Opens (creating it if missing) the backing file and loads it into ctrlr->image. */
static int open_backing(struct spdk_nvme_ctrlr *ctrlr, const char *dir)
{
	char path[4096];
	if (snprintf(path, sizeof(path), "%s/%s.img", dir, ctrlr->traddr) >= (int)sizeof(path)) {
		return -ENAMETOOLONG;
	}
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0) {
		return -errno;
	}
	struct stat st;
	if (fstat(fd, &st) != 0) {
		close(fd);
		return -errno;
	}
	uint64_t bytes = (uint64_t)st.st_size / PAGE_BYTES * PAGE_BYTES;
	if (bytes == 0) {
		bytes = env_mib() << 20;
		if (ftruncate(fd, (off_t)bytes) != 0) {
			close(fd);
			return -errno;
		}
	}
	ctrlr->image = calloc(1, bytes);
	if (ctrlr->image == NULL) {
		close(fd);
		return -ENOMEM;
	}
	for (uint64_t done = 0; done < bytes;) {
		ssize_t n = pread(fd, ctrlr->image + done, bytes - done, (off_t)done);
		if (n <= 0) {
			free(ctrlr->image);
			close(fd);
			return n < 0 ? -errno : -EIO;
		}
		done += (uint64_t)n;
	}
	ctrlr->fd = fd;
	ctrlr->sectors = bytes / SECTOR_BYTES;
	return 0;
}

struct spdk_nvme_ctrlr *spdk_nvme_connect(const struct spdk_nvme_transport_id *trid,
					  const struct spdk_nvme_ctrlr_opts *opts, size_t opts_size)
{
	(void)opts;
	(void)opts_size;
	if (!stub_env_initialized()) {
		fprintf(stderr, "spdk-stub: spdk_nvme_connect before spdk_env_init\n");
		return NULL;
	}
	if (trid == NULL || trid->trtype != SPDK_NVME_TRANSPORT_PCIE || trid->traddr[0] == '\0') {
		fprintf(stderr, "spdk-stub: only trtype PCIe with a traddr is emulated\n");
		return NULL;
	}
	struct spdk_nvme_ctrlr *ctrlr = calloc(1, sizeof(*ctrlr));
	if (ctrlr == NULL) {
		return NULL;
	}
	memcpy(ctrlr->traddr, trid->traddr, sizeof(ctrlr->traddr));
	ctrlr->ns = (struct spdk_nvme_ns){ctrlr, 1};
	ctrlr->fd = -1;
	pthread_mutex_init(&ctrlr->lock, NULL);

	pthread_mutex_lock(&g_ctrlrs_lock);
	int slot = -1;
	for (int i = 0; i < CONTROLLERS_MAX; i++) {
		if (g_ctrlrs[i] != NULL && strcmp(g_ctrlrs[i]->traddr, trid->traddr) == 0) {
			fprintf(stderr, "spdk-stub: %s is already attached\n", trid->traddr);
			slot = -2;
			break;
		}
		if (g_ctrlrs[i] == NULL && slot == -1) {
			slot = i;
		}
	}
	if (slot < 0) {
		pthread_mutex_unlock(&g_ctrlrs_lock);
		free(ctrlr);
		return NULL;
	}
	const char *dir = getenv("SPDK_STUB_DIR");
	int rc = 0;
	if (dir != NULL && dir[0] != '\0') {
		rc = open_backing(ctrlr, dir);
	} else {
		uint64_t bytes = env_mib() << 20;
		ctrlr->image = calloc(1, bytes);
		ctrlr->sectors = bytes / SECTOR_BYTES;
		rc = ctrlr->image == NULL ? -ENOMEM : 0;
	}
	if (rc == 0) {
		ctrlr->dirty = calloc(1, ctrlr->sectors * SECTOR_BYTES / PAGE_BYTES);
		rc = ctrlr->dirty == NULL ? -ENOMEM : 0;
	}
	if (rc != 0) {
		pthread_mutex_unlock(&g_ctrlrs_lock);
		fprintf(stderr, "spdk-stub: %s: cannot set up the namespace: %s\n", trid->traddr,
			strerror(-rc));
		if (ctrlr->fd >= 0) {
			close(ctrlr->fd);
		}
		free(ctrlr->image);
		free(ctrlr);
		return NULL;
	}
	g_ctrlrs[slot] = ctrlr;
	pthread_mutex_unlock(&g_ctrlrs_lock);
	return ctrlr;
}

int spdk_nvme_detach(struct spdk_nvme_ctrlr *ctrlr)
{
	if (ctrlr == NULL) {
		return -EINVAL;
	}
	pthread_mutex_lock(&g_ctrlrs_lock);
	for (int i = 0; i < CONTROLLERS_MAX; i++) {
		if (g_ctrlrs[i] == ctrlr) {
			g_ctrlrs[i] = NULL;
		}
	}
	pthread_mutex_unlock(&g_ctrlrs_lock);
	if (ctrlr->qpairs != 0) {
		fprintf(stderr, "spdk-stub: %s detached with %u I/O queue pairs still allocated\n",
			ctrlr->traddr, ctrlr->qpairs);
		abort();
	}
	/* Unflushed writes are dropped here: the stand-in's cache is lost like at a power cut. */
	if (ctrlr->fd >= 0) {
		close(ctrlr->fd);
	}
	free(ctrlr->dirty);
	free(ctrlr->image);
	pthread_mutex_destroy(&ctrlr->lock);
	free(ctrlr);
	return 0;
}

struct spdk_nvme_ns *spdk_nvme_ctrlr_get_ns(struct spdk_nvme_ctrlr *ctrlr, uint32_t ns_id)
{
	return (ctrlr != NULL && ns_id == 1) ? &ctrlr->ns : NULL;
}

bool spdk_nvme_ns_is_active(struct spdk_nvme_ns *ns)
{
	return ns != NULL && ns->ctrlr->sectors > 0;
}

uint32_t spdk_nvme_ns_get_sector_size(struct spdk_nvme_ns *ns)
{
	(void)ns;
	return SECTOR_BYTES;
}

uint64_t spdk_nvme_ns_get_num_sectors(struct spdk_nvme_ns *ns)
{
	return ns->ctrlr->sectors;
}

uint32_t spdk_nvme_ns_get_max_io_xfer_size(struct spdk_nvme_ns *ns)
{
	(void)ns;
	return MAX_IO_XFER_BYTES;
}

void spdk_nvme_ctrlr_get_default_io_qpair_opts(struct spdk_nvme_ctrlr *ctrlr,
					       struct spdk_nvme_io_qpair_opts *opts,
					       size_t opts_size)
{
	(void)ctrlr;
	if (opts == NULL || opts_size < sizeof(*opts)) {
		return;
	}
	memset(opts, 0, sizeof(*opts));
	opts->qprio = SPDK_NVME_QPRIO_URGENT;
	opts->io_queue_size = DEFAULT_IO_QUEUE_SIZE;
	opts->io_queue_requests = DEFAULT_IO_QUEUE_REQUESTS;
}

struct spdk_nvme_qpair *spdk_nvme_ctrlr_alloc_io_qpair(struct spdk_nvme_ctrlr *ctrlr,
						       const struct spdk_nvme_io_qpair_opts *user,
						       size_t opts_size)
{
	struct spdk_nvme_io_qpair_opts opts;
	spdk_nvme_ctrlr_get_default_io_qpair_opts(ctrlr, &opts, sizeof(opts));
	if (user != NULL && opts_size >= sizeof(opts)) {
		opts = *user;
	}
	if (ctrlr == NULL || opts.io_queue_requests == 0 ||
	    opts.io_queue_requests > IO_QUEUE_REQUESTS_MAX) {
		return NULL;
	}
	struct spdk_nvme_qpair *qpair = calloc(1, sizeof(*qpair));
	if (qpair == NULL) {
		return NULL;
	}
	uint32_t n = opts.io_queue_requests;
	qpair->ctrlr = ctrlr;
	qpair->requests_max = n;
	qpair->commands_max = n;
	qpair->commands = calloc(n, sizeof(struct command));
	qpair->free_commands = calloc(n, sizeof(uint32_t));
	qpair->pending = calloc(n, sizeof(uint32_t));
	qpair->batch = calloc(n, sizeof(uint32_t));
	if (!qpair->commands || !qpair->free_commands || !qpair->pending || !qpair->batch) {
		free(qpair->commands);
		free(qpair->free_commands);
		free(qpair->pending);
		free(qpair->batch);
		free(qpair);
		return NULL;
	}
	for (uint32_t i = 0; i < n; i++) {
		qpair->free_commands[i] = n - 1 - i;
	}
	qpair->free_count = n;
	qpair->rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)qpair;
	pthread_mutex_lock(&ctrlr->lock);
	ctrlr->qpairs++;
	pthread_mutex_unlock(&ctrlr->lock);
	return qpair;
}

int spdk_nvme_ctrlr_free_io_qpair(struct spdk_nvme_qpair *qpair)
{
	if (qpair == NULL) {
		return 0;
	}
	if (qpair->in_completions) {
		return -EAGAIN;
	}
	/* Commands still out are dropped without a callback, as when SPDK deletes the queue. */
	pthread_mutex_lock(&qpair->ctrlr->lock);
	qpair->ctrlr->qpairs--;
	pthread_mutex_unlock(&qpair->ctrlr->lock);
	free(qpair->commands);
	free(qpair->free_commands);
	free(qpair->pending);
	free(qpair->batch);
	free(qpair);
	return 0;
}

static uint64_t next_random(struct spdk_nvme_qpair *qpair)
{
	uint64_t x = qpair->rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	qpair->rng = x;
	return x;
}

/* Request objects a command of `bytes` takes: one, or one per piece plus a parent. */
static uint32_t requests_for(uint64_t bytes)
{
	uint64_t pieces = (bytes + MAX_IO_XFER_BYTES - 1) / MAX_IO_XFER_BYTES;
	return pieces <= 1 ? 1 : (uint32_t)pieces + 1;
}

static struct command *take_command(struct spdk_nvme_qpair *qpair, enum opcode op, uint64_t lba,
				    uint32_t lba_count, spdk_nvme_cmd_cb cb, void *cb_arg,
				    int *rc)
{
	uint32_t requests = requests_for((uint64_t)lba_count * SECTOR_BYTES);
	if (qpair->free_count == 0 || qpair->requests_used + requests > qpair->requests_max) {
		*rc = -ENOMEM;
		return NULL;
	}
	uint32_t index = qpair->free_commands[--qpair->free_count];
	struct command *cmd = &qpair->commands[index];
	memset(cmd, 0, offsetof(struct command, sges));
	cmd->op = op;
	cmd->lba = lba;
	cmd->lba_count = lba_count;
	cmd->requests = requests;
	cmd->cb = cb;
	cmd->cb_arg = cb_arg;
	qpair->requests_used += requests;
	*rc = 0;
	return cmd;
}

static void give_back(struct spdk_nvme_qpair *qpair, struct command *cmd)
{
	qpair->requests_used -= cmd->requests;
	qpair->free_commands[qpair->free_count++] = (uint32_t)(cmd - qpair->commands);
}

static void queue(struct spdk_nvme_qpair *qpair, struct command *cmd)
{
	qpair->pending[qpair->pending_count++] = (uint32_t)(cmd - qpair->commands);
}

/* The payload rule real SPDK enforces through address translation. */
static void check_payload(struct command *cmd)
{
	for (uint32_t i = 0; i < cmd->sge_count; i++) {
		if (!stub_is_dma_safe(cmd->sges[i].addr, cmd->sges[i].len)) {
			fprintf(stderr,
				"spdk-stub: payload %p+%u is neither spdk_dma_zmalloc memory nor "
				"spdk_mem_register'ed: failing the command (invalid field)\n",
				(void *)cmd->sges[i].addr, cmd->sges[i].len);
			cmd->sct = SPDK_NVME_SCT_GENERIC;
			cmd->sc = SPDK_NVME_SC_INVALID_FIELD;
			return;
		}
	}
}

static int submit_contig(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, enum opcode op,
			 void *payload, uint64_t lba, uint32_t lba_count, spdk_nvme_cmd_cb cb_fn,
			 void *cb_arg)
{
	if (ns == NULL || qpair == NULL || payload == NULL || lba_count == 0 ||
	    ns->ctrlr != qpair->ctrlr) {
		return -EINVAL;
	}
	int rc;
	struct command *cmd = take_command(qpair, op, lba, lba_count, cb_fn, cb_arg, &rc);
	if (cmd == NULL) {
		return rc;
	}
	cmd->sge_count = 1;
	cmd->sges[0] = (struct sge){payload, lba_count * SECTOR_BYTES};
	check_payload(cmd);
	queue(qpair, cmd);
	return 0;
}

int spdk_nvme_ns_cmd_read(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, void *payload,
			  uint64_t lba, uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			  uint32_t io_flags)
{
	(void)io_flags;
	return submit_contig(ns, qpair, OP_READ, payload, lba, lba_count, cb_fn, cb_arg);
}

int spdk_nvme_ns_cmd_write(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, void *payload,
			   uint64_t lba, uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			   uint32_t io_flags)
{
	(void)io_flags;
	return submit_contig(ns, qpair, OP_WRITE, payload, lba, lba_count, cb_fn, cb_arg);
}

/* Walks the caller's scatter-gather list at submission, as SPDK does to build PRPs or SGLs. */
static int submit_sgl(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, enum opcode op,
		      uint64_t lba, uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
		      spdk_nvme_req_reset_sgl_cb reset_sgl_fn, spdk_nvme_req_next_sge_cb next_sge_fn)
{
	if (ns == NULL || qpair == NULL || lba_count == 0 || reset_sgl_fn == NULL ||
	    next_sge_fn == NULL || ns->ctrlr != qpair->ctrlr) {
		return -EINVAL;
	}
	int rc;
	struct command *cmd = take_command(qpair, op, lba, lba_count, cb_fn, cb_arg, &rc);
	if (cmd == NULL) {
		return rc;
	}
	uint64_t want = (uint64_t)lba_count * SECTOR_BYTES;
	uint64_t have = 0;
	reset_sgl_fn(cb_arg, 0);
	while (have < want) {
		void *address = NULL;
		uint32_t length = 0;
		if (cmd->sge_count == SGES_PER_COMMAND_MAX ||
		    next_sge_fn(cb_arg, &address, &length) != 0 || length == 0 || address == NULL) {
			give_back(qpair, cmd);
			return -EINVAL;
		}
		if (length > want - have) {
			length = (uint32_t)(want - have);
		}
		cmd->sges[cmd->sge_count++] = (struct sge){address, length};
		have += length;
	}
	check_payload(cmd);
	queue(qpair, cmd);
	return 0;
}

int spdk_nvme_ns_cmd_readv(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, uint64_t lba,
			   uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			   uint32_t io_flags, spdk_nvme_req_reset_sgl_cb reset_sgl_fn,
			   spdk_nvme_req_next_sge_cb next_sge_fn)
{
	(void)io_flags;
	return submit_sgl(ns, qpair, OP_READ, lba, lba_count, cb_fn, cb_arg, reset_sgl_fn,
			  next_sge_fn);
}

int spdk_nvme_ns_cmd_writev(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, uint64_t lba,
			    uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			    uint32_t io_flags, spdk_nvme_req_reset_sgl_cb reset_sgl_fn,
			    spdk_nvme_req_next_sge_cb next_sge_fn)
{
	(void)io_flags;
	return submit_sgl(ns, qpair, OP_WRITE, lba, lba_count, cb_fn, cb_arg, reset_sgl_fn,
			  next_sge_fn);
}

int spdk_nvme_ns_cmd_flush(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair,
			   spdk_nvme_cmd_cb cb_fn, void *cb_arg)
{
	if (ns == NULL || qpair == NULL || ns->ctrlr != qpair->ctrlr) {
		return -EINVAL;
	}
	int rc;
	struct command *cmd = take_command(qpair, OP_FLUSH, 0, 0, cb_fn, cb_arg, &rc);
	if (cmd == NULL) {
		return rc;
	}
	queue(qpair, cmd);
	return 0;
}

/* Runs one command against the namespace; returns its status (sct << 8 | sc). */
static uint16_t execute(struct spdk_nvme_ctrlr *ctrlr, struct command *cmd)
{
	if (cmd->sct != 0 || cmd->sc != 0) {
		return (uint16_t)(cmd->sct << 8 | cmd->sc);
	}
	if (cmd->op == OP_FLUSH) {
		if (ctrlr->fd < 0) {
			memset(ctrlr->dirty, 0, ctrlr->sectors * SECTOR_BYTES / PAGE_BYTES);
			return 0;
		}
		uint64_t pages = ctrlr->sectors * SECTOR_BYTES / PAGE_BYTES;
		for (uint64_t page = 0; page < pages; page++) {
			if (!ctrlr->dirty[page]) {
				continue;
			}
			off_t at = (off_t)(page * PAGE_BYTES);
			if (pwrite(ctrlr->fd, ctrlr->image + at, PAGE_BYTES, at) != PAGE_BYTES) {
				return SPDK_NVME_SCT_GENERIC << 8 | SPDK_NVME_SC_INTERNAL_DEVICE_ERROR;
			}
			ctrlr->dirty[page] = 0;
		}
		if (fdatasync(ctrlr->fd) != 0) {
			return SPDK_NVME_SCT_GENERIC << 8 | SPDK_NVME_SC_INTERNAL_DEVICE_ERROR;
		}
		return 0;
	}
	if (cmd->lba >= ctrlr->sectors || cmd->lba_count > ctrlr->sectors - cmd->lba) {
		return SPDK_NVME_SCT_GENERIC << 8 | SPDK_NVME_SC_LBA_OUT_OF_RANGE;
	}
	uint8_t *media = ctrlr->image + cmd->lba * SECTOR_BYTES;
	uint64_t bytes = (uint64_t)cmd->lba_count * SECTOR_BYTES;
	if (cmd->op == OP_READ) {
		for (uint64_t at = 0; at < bytes; at += SECTOR_BYTES) {
			if (memcmp(media + at, READ_ERROR_MAGIC, sizeof(READ_ERROR_MAGIC)) == 0) {
				return SPDK_NVME_SCT_MEDIA_ERROR << 8 | SPDK_NVME_SC_UNRECOVERED_READ_ERROR;
			}
		}
		uint64_t at = 0;
		for (uint32_t i = 0; i < cmd->sge_count; i++) {
			memcpy(cmd->sges[i].addr, media + at, cmd->sges[i].len);
			at += cmd->sges[i].len;
		}
		return 0;
	}
	/* A write: refuse it whole if any sector carries the write-fault marker. */
	uint64_t at = 0;
	for (uint32_t i = 0; i < cmd->sge_count; i++) {
		for (uint32_t s = 0; s < cmd->sges[i].len; s += SECTOR_BYTES) {
			if (memcmp(cmd->sges[i].addr + s, WRITE_FAULT_MAGIC, sizeof(WRITE_FAULT_MAGIC)) ==
			    0) {
				return SPDK_NVME_SCT_MEDIA_ERROR << 8 | SPDK_NVME_SC_WRITE_FAULTS;
			}
		}
	}
	for (uint32_t i = 0; i < cmd->sge_count; i++) {
		memcpy(media + at, cmd->sges[i].addr, cmd->sges[i].len);
		at += cmd->sges[i].len;
	}
	uint64_t first = cmd->lba * SECTOR_BYTES / PAGE_BYTES;
	uint64_t last = (cmd->lba * SECTOR_BYTES + bytes - 1) / PAGE_BYTES;
	memset(ctrlr->dirty + first, 1, last - first + 1);
	return 0;
}

int32_t spdk_nvme_qpair_process_completions(struct spdk_nvme_qpair *qpair,
					    uint32_t max_completions)
{
	if (qpair == NULL || qpair->in_completions) {
		return -EINVAL;
	}
	/* Pick the commands that complete now: each with probability 1/2, in random order. */
	uint32_t chosen = 0;
	for (uint32_t i = 0; i < qpair->pending_count;) {
		bool now = (next_random(qpair) & 1) != 0 &&
			   (max_completions == 0 || chosen < max_completions);
		if (now) {
			qpair->batch[chosen++] = qpair->pending[i];
			qpair->pending[i] = qpair->pending[--qpair->pending_count];
		} else {
			i++;
		}
	}
	for (uint32_t i = chosen; i > 1; i--) {
		uint32_t j = (uint32_t)(next_random(qpair) % i);
		uint32_t t = qpair->batch[i - 1];
		qpair->batch[i - 1] = qpair->batch[j];
		qpair->batch[j] = t;
	}
	qpair->in_completions = true;
	for (uint32_t i = 0; i < chosen; i++) {
		struct command *cmd = &qpair->commands[qpair->batch[i]];
		pthread_mutex_lock(&qpair->ctrlr->lock);
		uint16_t status = execute(qpair->ctrlr, cmd);
		pthread_mutex_unlock(&qpair->ctrlr->lock);
		struct spdk_nvme_cpl cpl;
		memset(&cpl, 0, sizeof(cpl));
		cpl.cid = (uint16_t)qpair->batch[i];
		cpl.status.sct = (uint16_t)(status >> 8) & 0x7;
		cpl.status.sc = (uint16_t)status & 0xFF;
		cpl.status.dnr = status != 0;
		spdk_nvme_cmd_cb cb = cmd->cb;
		void *cb_arg = cmd->cb_arg;
		/* Free first: the callback may submit again, as SPDK allows. */
		give_back(qpair, cmd);
		if (cb != NULL) {
			cb(cb_arg, &cpl);
		}
	}
	qpair->in_completions = false;
	return (int32_t)chosen;
}
