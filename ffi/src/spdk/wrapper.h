/* The SPDK headers Carmine binds (bindgen input): the NVMe driver and its environment. */
#include <spdk/env.h>
#include <spdk/nvme.h>

/* shim.c: what bindgen cannot see because SPDK spells it as a macro or a bitfield. */
bool carmine_spdk_cpl_is_error(const struct spdk_nvme_cpl *cpl);
uint16_t carmine_spdk_cpl_status(const struct spdk_nvme_cpl *cpl);
