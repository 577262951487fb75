from typing import Any

from iouzcrx._ring import Ring

OP_RECV: int
OP_RECV_ZC: int
OP_ACCEPT: int
OP_SEND: int

def query_opcodes() -> dict[str, int] | None: ...
def query_zcrx() -> dict[str, int] | None: ...

class KernelFeatures:
    release: str
    io_uring: bool
    io_uring_error: OSError | None
    setup_flags: list[str]
    opcodes: frozenset[int]
    query: dict[str, int] | None
    zcrx_query: dict[str, int] | None
    zcrx_nodev: bool
    zcrx_import: bool
    zcrx_ctrl_flush: bool
    zcrx_rx_buf_len: bool
    rq_hdr_size: int
    rq_hdr_alignment: int
    recvsend_bundle: bool
    eventfd_prompt: bool
    @property
    def recv_zc(self) -> bool: ...
    @property
    def bufring(self) -> bool: ...
    def as_dict(self) -> dict[str, Any]: ...

def enter_error(exc: OSError) -> OSError: ...
def eventfd_wakes_at_once(ring: Ring) -> bool: ...
def kernel_features() -> KernelFeatures: ...
