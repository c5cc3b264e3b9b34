/* The DPDK headers Carmine binds (bindgen input; also included by the generated wrapper C file). */
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ethdev.h>
#include <rte_ether.h>
#include <rte_memory.h>
#include <rte_memzone.h>
#include <rte_malloc.h>

/* shim.c: what bindgen cannot see because DPDK spells it as a macro. */
int carmine_rte_errno(void);
void *carmine_pktmbuf_mtod(struct rte_mbuf *m);
/* RTE_ETH_RSS_* are RTE_BIT64(n) macro calls, which bindgen cannot evaluate. */
uint64_t carmine_rss_ipv4_udp(void);
