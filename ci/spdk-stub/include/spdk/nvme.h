/*
 * STAND-IN, NOT SPDK. Part of Carmine's SPDK test double (ci/spdk-stub/README.md).
 *
 * Declares only the subset of SPDK's NVMe driver API (spdk/nvme.h) that Carmine calls, with
 * SPDK's names, types and signatures. Struct layouts hold only the fields Carmine touches.
 */
#ifndef SPDK_NVME_H
#define SPDK_NVME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "spdk/env.h"
#include "spdk/nvme_spec.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SPDK_NVMF_TRSTRING_MAX_LEN 32
#define SPDK_NVMF_TRADDR_MAX_LEN 256
#define SPDK_NVMF_TRSVCID_MAX_LEN 32
#define SPDK_NVMF_NQN_MAX_LEN 223

enum spdk_nvme_transport_type {
	SPDK_NVME_TRANSPORT_PCIE = 256,
	SPDK_NVME_TRANSPORT_RDMA = 1,
	SPDK_NVME_TRANSPORT_FC = 2,
	SPDK_NVME_TRANSPORT_TCP = 3,
	SPDK_NVME_TRANSPORT_CUSTOM = 4096,
};

enum spdk_nvmf_adrfam {
	SPDK_NVMF_ADRFAM_IPV4 = 1,
	SPDK_NVMF_ADRFAM_IPV6 = 2,
};

/* Where a controller is: "trtype:PCIe traddr:0000:04:00.0" parsed. */
struct spdk_nvme_transport_id {
	char trstring[SPDK_NVMF_TRSTRING_MAX_LEN + 1];
	enum spdk_nvme_transport_type trtype;
	enum spdk_nvmf_adrfam adrfam;
	char traddr[SPDK_NVMF_TRADDR_MAX_LEN + 1];
	char trsvcid[SPDK_NVMF_TRSVCID_MAX_LEN + 1];
	char subnqn[SPDK_NVMF_NQN_MAX_LEN + 1];
	int priority;
};

struct spdk_nvme_ctrlr;
struct spdk_nvme_ns;
struct spdk_nvme_qpair;
struct spdk_nvme_ctrlr_opts;

enum spdk_nvme_qprio {
	SPDK_NVME_QPRIO_URGENT = 0x0,
	SPDK_NVME_QPRIO_HIGH = 0x1,
	SPDK_NVME_QPRIO_MEDIUM = 0x2,
	SPDK_NVME_QPRIO_LOW = 0x3,
};

/* I/O queue pair options (the fields Carmine sets; SPDK has more). */
struct spdk_nvme_io_qpair_opts {
	enum spdk_nvme_qprio qprio;
	/* Submission queue entries. */
	uint32_t io_queue_size;
	/* Request objects: commands the driver accepts before spdk_nvme_ns_cmd_* says -ENOMEM. */
	uint32_t io_queue_requests;
};

/* Called once per command with its completion, from spdk_nvme_qpair_process_completions. */
typedef void (*spdk_nvme_cmd_cb)(void *ctx, const struct spdk_nvme_cpl *cpl);

/* Scatter-gather payloads: rewind the caller's list to byte offset `offset` of the payload. */
typedef void (*spdk_nvme_req_reset_sgl_cb)(void *cb_arg, uint32_t offset);

/* Scatter-gather payloads: the next element's address and length; 0, or nonzero on error. */
typedef int (*spdk_nvme_req_next_sge_cb)(void *cb_arg, void **address, uint32_t *length);

int spdk_nvme_transport_id_parse(struct spdk_nvme_transport_id *trid, const char *str);

struct spdk_nvme_ctrlr *spdk_nvme_connect(const struct spdk_nvme_transport_id *trid,
					  const struct spdk_nvme_ctrlr_opts *opts,
					  size_t opts_size);

int spdk_nvme_detach(struct spdk_nvme_ctrlr *ctrlr);

struct spdk_nvme_ns *spdk_nvme_ctrlr_get_ns(struct spdk_nvme_ctrlr *ctrlr, uint32_t ns_id);

bool spdk_nvme_ns_is_active(struct spdk_nvme_ns *ns);

uint32_t spdk_nvme_ns_get_sector_size(struct spdk_nvme_ns *ns);

uint64_t spdk_nvme_ns_get_num_sectors(struct spdk_nvme_ns *ns);

uint32_t spdk_nvme_ns_get_max_io_xfer_size(struct spdk_nvme_ns *ns);

void spdk_nvme_ctrlr_get_default_io_qpair_opts(struct spdk_nvme_ctrlr *ctrlr,
					       struct spdk_nvme_io_qpair_opts *opts,
					       size_t opts_size);

struct spdk_nvme_qpair *spdk_nvme_ctrlr_alloc_io_qpair(struct spdk_nvme_ctrlr *ctrlr,
						       const struct spdk_nvme_io_qpair_opts *opts,
						       size_t opts_size);

int spdk_nvme_ctrlr_free_io_qpair(struct spdk_nvme_qpair *qpair);

int spdk_nvme_ns_cmd_read(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, void *payload,
			  uint64_t lba, uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			  uint32_t io_flags);

int spdk_nvme_ns_cmd_write(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, void *payload,
			   uint64_t lba, uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			   uint32_t io_flags);

int spdk_nvme_ns_cmd_readv(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, uint64_t lba,
			   uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			   uint32_t io_flags, spdk_nvme_req_reset_sgl_cb reset_sgl_fn,
			   spdk_nvme_req_next_sge_cb next_sge_fn);

int spdk_nvme_ns_cmd_writev(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair, uint64_t lba,
			    uint32_t lba_count, spdk_nvme_cmd_cb cb_fn, void *cb_arg,
			    uint32_t io_flags, spdk_nvme_req_reset_sgl_cb reset_sgl_fn,
			    spdk_nvme_req_next_sge_cb next_sge_fn);

int spdk_nvme_ns_cmd_flush(struct spdk_nvme_ns *ns, struct spdk_nvme_qpair *qpair,
			   spdk_nvme_cmd_cb cb_fn, void *cb_arg);

/* Reaps at most max_completions completions (0: all there are), calling each command's
 * callback: how many, or a negative errno when the queue pair failed. */
int32_t spdk_nvme_qpair_process_completions(struct spdk_nvme_qpair *qpair,
					    uint32_t max_completions);

#ifdef __cplusplus
}
#endif

#endif
