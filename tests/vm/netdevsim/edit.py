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
