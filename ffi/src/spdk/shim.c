/* Carmine's C shim over SPDK: `spdk_nvme_cpl_is_error` is a macro and the status is a bitfield
 * struct, neither of which bindgen turns into something Rust can call or read portably. */
#include "wrapper.h"

bool carmine_spdk_cpl_is_error(const struct spdk_nvme_cpl *cpl)
{
	return spdk_nvme_cpl_is_error(cpl);
}

/* The completion's status without the phase tag, in the NVMe specification's layout (status
 * code bits 0-7, type 8-10, retry delay 11-12, more 13, do not retry 14): Carmine's
 * `NvmeStatus`. Built from the named bitfields, so the compiler's bitfield layout decides. */
uint16_t carmine_spdk_cpl_status(const struct spdk_nvme_cpl *cpl)
{
	return (uint16_t)(cpl->status.sc | cpl->status.sct << 8 | cpl->status.crd << 11 |
			  cpl->status.m << 13 | cpl->status.dnr << 14);
}
