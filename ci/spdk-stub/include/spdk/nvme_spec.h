/*
 * STAND-IN, NOT SPDK. Part of Carmine's SPDK test double (ci/spdk-stub/README.md).
 *
 * The NVMe completion entry and status codes, as SPDK's spdk/nvme_spec.h names them, for the
 * subset Carmine uses. The completion entry's layout is the NVMe specification's (16 bytes).
 */
#ifndef SPDK_NVME_SPEC_H
#define SPDK_NVME_SPEC_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status field of a completion, phase tag included (bit 0), as the specification lays it out. */
struct spdk_nvme_status {
	uint16_t p : 1;   /* phase tag */
	uint16_t sc : 8;  /* status code */
	uint16_t sct : 3; /* status code type */
	uint16_t crd : 2; /* command retry delay */
	uint16_t m : 1;   /* more */
	uint16_t dnr : 1; /* do not retry */
};

enum spdk_nvme_status_code_type {
	SPDK_NVME_SCT_GENERIC = 0x0,
	SPDK_NVME_SCT_COMMAND_SPECIFIC = 0x1,
	SPDK_NVME_SCT_MEDIA_ERROR = 0x2,
	SPDK_NVME_SCT_PATH = 0x3,
	SPDK_NVME_SCT_VENDOR_SPECIFIC = 0x7,
};

enum spdk_nvme_generic_command_status_code {
	SPDK_NVME_SC_SUCCESS = 0x00,
	SPDK_NVME_SC_INVALID_OPCODE = 0x01,
	SPDK_NVME_SC_INVALID_FIELD = 0x02,
	SPDK_NVME_SC_DATA_TRANSFER_ERROR = 0x04,
	SPDK_NVME_SC_INTERNAL_DEVICE_ERROR = 0x06,
	SPDK_NVME_SC_LBA_OUT_OF_RANGE = 0x80,
};

enum spdk_nvme_media_error_status_code {
	SPDK_NVME_SC_WRITE_FAULTS = 0x80,
	SPDK_NVME_SC_UNRECOVERED_READ_ERROR = 0x81,
};

/* Completion queue entry. */
struct spdk_nvme_cpl {
	uint32_t cdw0;
	uint32_t cdw1;
	uint16_t sqhd;
	uint16_t sqid;
	uint16_t cid;
	union {
		uint16_t status_raw;
		struct spdk_nvme_status status;
	};
};

_Static_assert(sizeof(struct spdk_nvme_cpl) == 16, "NVMe completion entry is 16 bytes");

/* True when the completion reports a failure (SPDK defines it as a macro too). */
#define spdk_nvme_cpl_is_error(cpl)                                                          \
	((cpl)->status.sc != SPDK_NVME_SC_SUCCESS || (cpl)->status.sct != SPDK_NVME_SCT_GENERIC)

#ifdef __cplusplus
}
#endif

#endif
