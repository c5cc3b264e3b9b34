/* Macros of DPDK's API as functions, so Rust can call them (bindgen binds no function-like macros). */
#include "wrapper.h"

/* rte_errno is a macro over a per-lcore variable (RTE_PER_LCORE(_rte_errno)). */
int carmine_rte_errno(void) { return rte_errno; }

/* rte_pktmbuf_mtod(m, t) is a macro: the start of the data in the first segment. */
void *carmine_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }

/* The RSS hash types Carmine asks for: IPv4 and UDP over IPv4 (RTE_BIT64 macros). */
uint64_t carmine_rss_ipv4_udp(void) { return RTE_ETH_RSS_IPV4 | RTE_ETH_RSS_NONFRAG_IPV4_UDP; }
