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
