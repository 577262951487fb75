"""Edit the stock netdevsim sources so io_uring zcrx can bind to its RX queues.

    python3 edit.py DIR      (DIR holds drivers/net/netdevsim's files)

Before it binds a queue, the kernel asks of the driver: a DMA device behind
the queue (the netdev's parent) that can map the area, and RX page pools that
map (and sync) their pages for that device, in the DMA_FROM_DEVICE direction, and opt in
to unreadable memory (PP_FLAG_ALLOW_UNREADABLE_NETMEM, with the queue index so
the pool finds the queue's memory provider). Stock netdevsim has none of it.

Each edit is anchored on a short snippet of the stock source that must occur
exactly once; a source that does not match stops the build rather than
producing a module that silently lacks an edit. Every change is printed.
Standard library only. The build cache is keyed on this file's hash.
"""

from __future__ import annotations

import os
import sys

# (file, anchor, replacement, why)
EDITS = [
    (
        "bus.c",
        "#include <linux/device.h>\n",
        "#include <linux/device.h>\n#include <linux/dma-mapping.h>\n",
        "DMA_BIT_MASK for the bus device",
    ),
    (
        "bus.c",
        "\tnsim_bus_dev->dev.type = &nsim_bus_dev_type;\n",
        "\tnsim_bus_dev->dev.type = &nsim_bus_dev_type;\n"
        "\t/* The parent of every port: the DMA device zcrx maps its area for. */\n"
        "\tnsim_bus_dev->dev.coherent_dma_mask = DMA_BIT_MASK(64);\n"
        "\tnsim_bus_dev->dev.dma_mask = &nsim_bus_dev->dev.coherent_dma_mask;\n",
        "a 64-bit DMA mask on the netdevsim bus device",
    ),
    (
        "netdev.c",
        "\t\t.dev = &napi->dev->dev,\n"
        "\t\t.napi = napi,\n"
        "\t\t.dma_dir = DMA_BIDIRECTIONAL,\n"
        "\t\t.netdev = napi->dev,\n",
        "\t\t/* What a memory provider (io_uring zcrx) requires of a pool:\n"
        "\t\t * mapped and synced for the device, unreadable memory allowed.\n"
        "\t\t */\n"
        "\t\t.flags = PP_FLAG_DMA_MAP | PP_FLAG_DMA_SYNC_DEV |\n"
        "\t\t\t PP_FLAG_ALLOW_UNREADABLE_NETMEM,\n"
        "\t\t.max_len = PAGE_SIZE,\n"
        "\t\t.dev = napi->dev->dev.parent,\n"
        "\t\t.napi = napi,\n"
        "\t\t.dma_dir = DMA_FROM_DEVICE,\n"
        "\t\t.netdev = napi->dev,\n"
        "\t\t.queue_idx = napi->index,\n",
        "RX page pools DMA-mapped and synced on the parent, DMA_FROM_DEVICE, "
        "unreadable netmem allowed",
    ),
    (
        "netdev.c",
        "\terr = nsim_create_page_pool(&qmem->rq->page_pool, &qmem->rq->napi);\n",
        "\t/* The pool is made before the new NAPI is added: give it the device\n"
        "\t * and queue it is for (adding the NAPI later sets the same values).\n"
        "\t */\n"
        "\tqmem->rq->napi.dev = dev;\n"
        "\tqmem->rq->napi.index = idx;\n"
        "\terr = nsim_create_page_pool(&qmem->rq->page_pool, &qmem->rq->napi);\n",
        "a restarted queue's new pool knows its device and queue index",
    ),
    # Receive buffers larger than a page (zcrx rx_buf_len): the queue API's
    # QCFG_RX_PAGE_SIZE, honoured by RX page pools of that order.
    (
        "netdev.c",
        "static int nsim_create_page_pool(struct page_pool **p, struct napi_struct *napi)\n"
        "{\n"
        "\tstruct page_pool_params params = {\n"
        "\t\t.order = 0,\n",
        "static int nsim_create_page_pool_order(struct page_pool **p, struct napi_struct *napi,\n"
        "\t\t\t\t       unsigned int order)\n"
        "{\n"
        "\tstruct page_pool_params params = {\n"
        "\t\t.order = order,\n",
        "RX page pools of a given order",
    ),
    (
        "netdev.c",
        "\tpool = page_pool_create(&params);\n",
        "\t/* A buffer is PAGE_SIZE << order bytes: sync all of it for the device. */\n"
        "\tif (params.flags & PP_FLAG_DMA_SYNC_DEV)\n"
        "\t\tparams.max_len = PAGE_SIZE << order;\n"
        "\tpool = page_pool_create(&params);\n",
        "a pool syncs whole buffers of its order",
    ),
    (
        "netdev.c",
        "static int nsim_init_napi(struct netdevsim *ns)\n",
        "static int nsim_create_page_pool(struct page_pool **p, struct napi_struct *napi)\n"
        "{\n"
        "\treturn nsim_create_page_pool_order(p, napi, 0);\n"
        "}\n"
        "\n"
        "/* The page order of a queue's receive buffers: its configured page size. */\n"
        "static unsigned int nsim_rx_page_order(const struct netdev_queue_config *qcfg)\n"
        "{\n"
        "\tif (!qcfg || qcfg->rx_page_size <= PAGE_SIZE)\n"
        "\t\treturn 0;\n"
        "\treturn ilog2(qcfg->rx_page_size) - PAGE_SHIFT;\n"
        "}\n"
        "\n"
        "static int nsim_init_napi(struct netdevsim *ns)\n",
        "page-sized pools by default; the order of a queue config's page size",
    ),
    (
        "netdev.c",
        "\t\treturn nsim_create_page_pool(&qmem->pp, &ns->rq[idx]->napi);\n",
        "\t\treturn nsim_create_page_pool_order(&qmem->pp, &ns->rq[idx]->napi,\n"
        "\t\t\t\t\t\t   nsim_rx_page_order(qcfg));\n",
        "a restarted queue's pool (reset mode 1) takes the configured page size",
    ),
    (
        "netdev.c",
        "\terr = nsim_create_page_pool(&qmem->rq->page_pool, &qmem->rq->napi);\n",
        "\terr = nsim_create_page_pool_order(&qmem->rq->page_pool, &qmem->rq->napi,\n"
        "\t\t\t\t\t  nsim_rx_page_order(qcfg));\n",
        "a restarted queue's new pool takes the configured page size",
    ),
    (
        "netdev.c",
        "static const struct netdev_queue_mgmt_ops nsim_queue_mgmt_ops = {\n",
        "/* Like a NIC with a largest receive buffer: page sizes up to 64 KiB. */\n"
        "#define NSIM_MAX_RX_PAGE_SIZE\t(64 * 1024)\n"
        "\n"
        "static void nsim_queue_default_qcfg(struct net_device *dev,\n"
        "\t\t\t\t    struct netdev_queue_config *qcfg)\n"
        "{\n"
        "\tqcfg->rx_page_size = PAGE_SIZE;\n"
        "}\n"
        "\n"
        "static int nsim_queue_validate_qcfg(struct net_device *dev,\n"
        "\t\t\t\t    struct netdev_queue_config *qcfg,\n"
        "\t\t\t\t    struct netlink_ext_ack *extack)\n"
        "{\n"
        "\tu32 size = qcfg->rx_page_size;\n"
        "\n"
        "\tif (size && (size < PAGE_SIZE || size > NSIM_MAX_RX_PAGE_SIZE ||\n"
        "\t\t     !is_power_of_2(size))) {\n"
        '\t\tNL_SET_ERR_MSG_MOD(extack, "rx page size not supported");\n'
        "\t\treturn -EINVAL;\n"
        "\t}\n"
        "\treturn 0;\n"
        "}\n"
        "\n"
        "static const struct netdev_queue_mgmt_ops nsim_queue_mgmt_ops = {\n",
        "queue config defaults and validation of the rx page size",
    ),
    (
        "netdev.c",
        "\t.ndo_queue_stop\t\t= nsim_queue_stop,\n};\n",
        "\t.ndo_queue_stop\t\t= nsim_queue_stop,\n"
        "\t.ndo_default_qcfg\t= nsim_queue_default_qcfg,\n"
        "\t.ndo_validate_qcfg\t= nsim_queue_validate_qcfg,\n"
        "\t.supported_params\t= QCFG_RX_PAGE_SIZE,\n"
        "};\n",
        "the queue API advertises QCFG_RX_PAGE_SIZE",
    ),
    # -- header/data split: payload into the RX queue's page pool ---------------
    (
        "netdevsim.h",
        "struct nsim_rq {\n",
        "/* What the simulated header/data split did on one RX queue: payload\n"
        " * bytes it wrote into memory-provider buffers (net_iov, e.g. an\n"
        " * io_uring zcrx area) or into ordinary pool pages, packets it dropped\n"
        " * because the pool had no buffer, and TCP packets it left whole.\n"
        " */\n"
        "#define NSIM_HDS_QUEUES 32\n"
        "struct nsim_hds_stats {\n"
        "\tatomic64_t niov_packets;\n"
        "\tatomic64_t niov_bytes;\n"
        "\tatomic64_t page_packets;\n"
        "\tatomic64_t page_bytes;\n"
        "\tatomic64_t drops;\n"
        "\tatomic64_t unsplit;\n"
        "};\n"
        "\n"
        "struct nsim_rq {\n",
        "per-queue counters of the simulated header/data split",
    ),
    (
        "netdevsim.h",
        "\tstruct dentry *vlan_dfs;\n",
        "\tstruct dentry *vlan_dfs;\n"
        "\tstruct dentry *hds_dfs;\n"
        "\tstruct nsim_hds_stats hds[NSIM_HDS_QUEUES];\n",
        "the port keeps the split's counters for its first NSIM_HDS_QUEUES queues",
    ),
    (
        "netdev.c",
        "#define NSIM_RING_SIZE\t\t256\n",
        "#define NSIM_RING_SIZE\t\t256\n"
        "\n"
        "/* Where the TCP payload starts (*hlen, from the network header) and how\n"
        " * long it is (*plen), or false for anything but unfragmented TCP over\n"
        " * IPv4 or IPv6 without extension headers.\n"
        " */\n"
        "static bool nsim_hds_tcp(struct sk_buff *skb, unsigned int *hlen,\n"
        "\t\t\t unsigned int *plen)\n"
        "{\n"
        "\tunsigned int l3len, len;\n"
        "\tstruct tcphdr _th;\n"
        "\tconst struct tcphdr *th;\n"
        "\n"
        "\tif (skb->protocol == htons(ETH_P_IP)) {\n"
        "\t\tstruct iphdr _iph;\n"
        "\t\tconst struct iphdr *iph;\n"
        "\n"
        "\t\tiph = skb_header_pointer(skb, 0, sizeof(_iph), &_iph);\n"
        "\t\tif (!iph || iph->version != 4 || iph->ihl < 5 ||\n"
        "\t\t    iph->protocol != IPPROTO_TCP || ip_is_fragment(iph))\n"
        "\t\t\treturn false;\n"
        "\t\tl3len = iph->ihl * 4;\n"
        "\t\tlen = ntohs(iph->tot_len);\n"
        "\t} else if (skb->protocol == htons(ETH_P_IPV6)) {\n"
        "\t\tstruct ipv6hdr _ip6h;\n"
        "\t\tconst struct ipv6hdr *ip6h;\n"
        "\n"
        "\t\tip6h = skb_header_pointer(skb, 0, sizeof(_ip6h), &_ip6h);\n"
        "\t\tif (!ip6h || ip6h->nexthdr != IPPROTO_TCP)\n"
        "\t\t\treturn false;\n"
        "\t\tl3len = sizeof(*ip6h);\n"
        "\t\tlen = l3len + ntohs(ip6h->payload_len);\n"
        "\t} else {\n"
        "\t\treturn false;\n"
        "\t}\n"
        "\tth = skb_header_pointer(skb, l3len, sizeof(_th), &_th);\n"
        "\tif (!th || th->doff < 5)\n"
        "\t\treturn false;\n"
        "\t*hlen = l3len + th->doff * 4;\n"
        "\t/* A GSO packet may carry no length of its own (BIG TCP); a shorter\n"
        "\t * one than the frame means link-layer padding, which is not payload.\n"
        "\t */\n"
        "\tif (len < l3len || len > skb->len)\n"
        "\t\tlen = skb->len;\n"
        "\tif (len < *hlen)\n"
        "\t\treturn false;\n"
        "\t*plen = len - *hlen;\n"
        "\treturn true;\n"
        "}\n"
        "\n"
        "/* Where the CPU can write what the device would have DMA'd into @netmem.\n"
        " * A net_iov (memory-provider buffer) has no struct page to map, but on\n"
        " * this device dma-direct maps without an IOMMU or bounce buffers (64-bit\n"
        " * mask), so its DMA address is a physical address of the pinned memory\n"
        " * behind it, which the kernel's direct map covers.\n"
        " */\n"
        "static void *nsim_hds_addr(struct page_pool *pool, netmem_ref netmem)\n"
        "{\n"
        "\tdma_addr_t dma;\n"
        "\tphys_addr_t phys;\n"
        "\n"
        "\tif (!netmem_is_net_iov(netmem))\n"
        "\t\treturn netmem_address(netmem);\n"
        "\tdma = page_pool_get_dma_addr_netmem(netmem);\n"
        "\tif (!dma)\n"
        "\t\treturn NULL;\n"
        "\tphys = dma_to_phys(pool->p.dev, dma);\n"
        "\tif (!pfn_valid(PHYS_PFN(phys)))\n"
        "\t\treturn NULL;\n"
        "\treturn phys_to_virt(phys);\n"
        "}\n"
        "\n"
        "/* Header/data split as a NIC with header split enabled does it: a new\n"
        " * skb whose linear part holds the headers and whose frags are buffers\n"
        " * from the RX queue's page pool holding the TCP payload, as if the\n"
        " * device had written them. With a memory provider (io_uring zcrx,\n"
        " * devmem) those buffers are net_iovs and the skb is unreadable to the\n"
        " * CPU; an empty pool drops the packet, as a NIC without descriptors\n"
        " * does, and TCP retransmits. Returns the skb to receive (the original\n"
        " * when nothing was split) or NULL when the packet was dropped.\n"
        " */\n"
        "static struct sk_buff *nsim_hds_split(struct netdevsim *ns,\n"
        "\t\t\t\t      struct nsim_rq *rq,\n"
        "\t\t\t\t      struct sk_buff *skb)\n"
        "{\n"
        "\tstruct net_device *dev = rq->napi.dev;\n"
        "\tstruct page_pool *pool = rq->page_pool;\n"
        "\tnetmem_ref netmems[MAX_SKB_FRAGS];\n"
        "\tunsigned int hlen, plen, bufsz, nfrags, off, len, i;\n"
        "\tstruct nsim_hds_stats *st;\n"
        "\tstruct sk_buff *nskb;\n"
        "\tbool niov = false;\n"
        "\tvoid *addr;\n"
        "\n"
        "\tif (!pool || dev->cfg->hds_config != ETHTOOL_TCP_DATA_SPLIT_ENABLED)\n"
        "\t\treturn skb;\n"
        "\tif (!nsim_hds_tcp(skb, &hlen, &plen) || !plen ||\n"
        "\t    plen < dev->cfg->hds_thresh)\n"
        "\t\treturn skb;\n"
        "\tst = rq->napi.index < NSIM_HDS_QUEUES ? &ns->hds[rq->napi.index] : NULL;\n"
        "\tbufsz = PAGE_SIZE << pool->p.order;\n"
        "\tnfrags = DIV_ROUND_UP(plen, bufsz);\n"
        "\t/* Extensions (PSP) belong to the sender's skb; a payload beyond\n"
        "\t * MAX_SKB_FRAGS buffers does not fit one skb: keep those whole.\n"
        "\t */\n"
        "\tif (skb_has_extensions(skb) || nfrags > MAX_SKB_FRAGS ||\n"
        "\t    !pskb_may_pull(skb, hlen)) {\n"
        "\t\tif (st)\n"
        "\t\t\tatomic64_inc(&st->unsplit);\n"
        "\t\treturn skb;\n"
        "\t}\n"
        "\tfor (i = 0; i < nfrags; i++) {\n"
        "\t\tnetmems[i] = page_pool_dev_alloc_netmems(pool);\n"
        "\t\tif (!netmems[i] || !nsim_hds_addr(pool, netmems[i])) {\n"
        "\t\t\tif (netmems[i])\n"
        "\t\t\t\ti++;\n"
        "\t\t\tgoto drop;\n"
        "\t\t}\n"
        "\t\tif (netmem_is_net_iov(netmems[i]))\n"
        "\t\t\tniov = true;\n"
        "\t}\n"
        "\tnskb = napi_alloc_skb(&rq->napi, ETH_HLEN + hlen);\n"
        "\tif (!nskb)\n"
        "\t\tgoto drop;\n"
        "\tskb_put_data(nskb, skb_mac_header(skb), ETH_HLEN);\n"
        "\tskb_put_data(nskb, skb->data, hlen);\n"
        "\tfor (i = 0, off = 0; i < nfrags; i++, off += len) {\n"
        "\t\tlen = min(plen - off, bufsz);\n"
        "\t\taddr = nsim_hds_addr(pool, netmems[i]);\n"
        "\t\t/* Within skb->len by nsim_hds_tcp(): cannot fail. */\n"
        "\t\tWARN_ON_ONCE(skb_copy_bits(skb, hlen + off, addr, len));\n"
        "\t\tskb_add_rx_frag_netmem(nskb, i, netmems[i], 0, len, bufsz);\n"
        "\t}\n"
        "\tskb_mark_for_recycle(nskb);\n"
        "\tnskb->protocol = eth_type_trans(nskb, dev);\n"
        "\t/* The device checked the checksum: nothing on the host can read the\n"
        "\t * payload of a net_iov to do it.\n"
        "\t */\n"
        "\tnskb->ip_summed = CHECKSUM_UNNECESSARY;\n"
        "\tskb_record_rx_queue(nskb, rq->napi.index);\n"
        "\tskb_copy_hash(nskb, skb);\n"
        "\tif (skb_vlan_tag_present(skb))\n"
        "\t\t__vlan_hwaccel_put_tag(nskb, skb->vlan_proto, skb_vlan_tag_get(skb));\n"
        "\tif (skb_is_gso(skb)) {\n"
        "\t\t/* One large receive (LRO) rather than one frame per segment. */\n"
        "\t\tskb_shinfo(nskb)->gso_size = skb_shinfo(skb)->gso_size;\n"
        "\t\tskb_shinfo(nskb)->gso_type = skb_shinfo(skb)->gso_type;\n"
        "\t\tskb_shinfo(nskb)->gso_segs = skb_shinfo(skb)->gso_segs;\n"
        "\t}\n"
        "\tconsume_skb(skb);\n"
        "\tif (st) {\n"
        "\t\tatomic64_inc(niov ? &st->niov_packets : &st->page_packets);\n"
        "\t\tatomic64_add(plen, niov ? &st->niov_bytes : &st->page_bytes);\n"
        "\t}\n"
        "\treturn nskb;\n"
        "\n"
        "drop:\n"
        "\twhile (i--)\n"
        "\t\tpage_pool_put_full_netmem(pool, netmems[i], true);\n"
        "\tif (st)\n"
        "\t\tatomic64_inc(&st->drops);\n"
        "\tdev_dstats_rx_dropped(dev);\n"
        "\tkfree_skb_reason(skb, SKB_DROP_REASON_NOMEM);\n"
        "\treturn NULL;\n"
        "}\n",
        "header/data split: TCP payload written into buffers of the RX queue's "
        "page pool, dropped when the pool is empty",
    ),
    (
        "netdev.c",
        "\t\t/* skb might be discard at netif_receive_skb, save the len */\n",
        "\t\tif (!xdp_prog) {\n"
        "\t\t\tskb = nsim_hds_split(ns, rq, skb);\n"
        "\t\t\tif (!skb)\n"
        "\t\t\t\tcontinue;\n"
        "\t\t}\n"
        "\n"
        "\t\t/* skb might be discard at netif_receive_skb, save the len */\n",
        "received TCP goes through the header/data split (not with XDP)",
    ),
    (
        "netdev.c",
        "DEFINE_SHOW_ATTRIBUTE(nsim_vlan);\n",
        "DEFINE_SHOW_ATTRIBUTE(nsim_vlan);\n"
        "\n"
        "static int nsim_hds_stats_show(struct seq_file *s, void *data)\n"
        "{\n"
        "\tstruct netdevsim *ns = s->private;\n"
        "\tunsigned int i, n;\n"
        "\n"
        "\tn = min_t(unsigned int, ns->netdev->num_rx_queues, NSIM_HDS_QUEUES);\n"
        "\tfor (i = 0; i < n; i++) {\n"
        "\t\tstruct nsim_hds_stats *st = &ns->hds[i];\n"
        "\n"
        '\t\tseq_printf(s, "queue %u niov_packets %lld niov_bytes %lld "\n'
        '\t\t\t   "page_packets %lld page_bytes %lld drops %lld unsplit %lld\\n",\n'
        "\t\t\t   i, atomic64_read(&st->niov_packets),\n"
        "\t\t\t   atomic64_read(&st->niov_bytes),\n"
        "\t\t\t   atomic64_read(&st->page_packets),\n"
        "\t\t\t   atomic64_read(&st->page_bytes),\n"
        "\t\t\t   atomic64_read(&st->drops),\n"
        "\t\t\t   atomic64_read(&st->unsplit));\n"
        "\t}\n"
        "\treturn 0;\n"
        "}\n"
        "DEFINE_SHOW_ATTRIBUTE(nsim_hds_stats);\n",
        "debugfs hds_stats: the split's counters, one line per queue",
    ),
    (
        "netdev.c",
        '\tns->vlan_dfs = debugfs_create_file("vlan", 0400, nsim_dev_port->ddir,\n'
        "\t\t\t\t\t   ns, &nsim_vlan_fops);\n",
        '\tns->vlan_dfs = debugfs_create_file("vlan", 0400, nsim_dev_port->ddir,\n'
        "\t\t\t\t\t   ns, &nsim_vlan_fops);\n"
        '\tns->hds_dfs = debugfs_create_file("hds_stats", 0400,\n'
        "\t\t\t\t\t  nsim_dev_port->ddir, ns,\n"
        "\t\t\t\t\t  &nsim_hds_stats_fops);\n",
        "debugfs hds_stats created with the port",
    ),
    (
        "netdev.c",
        "\tdebugfs_remove(ns->vlan_dfs);\n",
        "\tdebugfs_remove(ns->hds_dfs);\n\tdebugfs_remove(ns->vlan_dfs);\n",
        "debugfs hds_stats removed with the port",
    ),
    (
        "netdev.c",
        "#include <linux/debugfs.h>\n",
        "#include <linux/debugfs.h>\n#include <linux/dma-direct.h>\n#include <linux/if_vlan.h>\n"
        "#include <net/ip.h>\n"
        "#include <net/ipv6.h>\n#include <net/tcp.h>\n",
        "headers of the header/data split",
    ),
]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: edit.py DIR", file=sys.stderr)
        return 2
    root = sys.argv[1]
    texts: dict[str, str] = {}
    for name, anchor, replacement, why in EDITS:
        path = os.path.join(root, name)
        if name not in texts:
            with open(path, encoding="utf-8") as f:
                texts[name] = f.read()
        count = texts[name].count(anchor)
        if count != 1:
            first = anchor.strip().splitlines()[0]
            print(
                f"edit.py: {name}: anchor {first!r} found {count} times, expected once "
                "(the driver's source changed: update tests/vm/netdevsim/edit.py)",
                file=sys.stderr,
            )
            return 1
        texts[name] = texts[name].replace(anchor, replacement)
        print(f"edit.py: {name}: {why}")
    for name, text in texts.items():
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
