"""The eager plans' scratch pool (``runtime.kernels.scratch``): one pair per stream, thread and shape, bounded;
the unpacked-weight workspace: one buffer per stream and thread, grown, replaced buffers kept."""

from __future__ import annotations

import threading

import torch

from comfyquant.runtime.kernels.scratch import ScratchPool, WeightWorkspace


def test_same_key_gives_the_same_tensors_and_other_keys_do_not() -> None:
    p = ScratchPool(torch.device("cpu"))
    q, s = p.pair(7, 4, 64, torch.int8)
    assert q.shape == (4, 64) and q.dtype == torch.int8 and s.shape == (4, 1) and s.dtype == torch.float32
    again = p.pair(7, 4, 64, torch.int8)
    assert again[0] is q and again[1] is s
    for other in (p.pair(8, 4, 64, torch.int8), p.pair(7, 5, 64, torch.int8), p.pair(7, 4, 64, torch.float8_e4m3fn)):
        assert other[0] is not q and other[0].data_ptr() != q.data_ptr()
    # another thread issuing on the same stream gets its own pair: its two launches may interleave with ours
    got = []
    t = threading.Thread(target=lambda: got.append(p.pair(7, 4, 64, torch.int8)))
    t.start()
    t.join()
    assert got[0][0] is not q and got[0][0].data_ptr() != q.data_ptr()


def test_large_pairs_are_not_kept_and_the_pool_is_bounded() -> None:
    p = ScratchPool(torch.device("cpu"), max_bytes=1024, max_entries=3)
    big = p.pair(0, 2, 1024, torch.int8)  # 2048 bytes: over the limit, fresh every call
    assert p.pair(0, 2, 1024, torch.int8)[0] is not big[0] and len(p) == 0
    first = p.pair(0, 1, 16, torch.int8)
    for m in (2, 3, 4):  # the fourth entry drops the oldest
        p.pair(0, m, 16, torch.int8)
    assert len(p) == 3 and p.pair(0, 1, 16, torch.int8)[0] is not first[0]


def test_split_workspace_per_stream_grows_keeping_old_buffers_and_zeroed_counters() -> None:
    """The split-K GEMM's partials and counters: one set per stream; a larger request replaces the partials but
    keeps the old buffer alive (a captured CUDA graph may point at it); counters start zeroed and are never
    replaced (every launch leaves them zeroed)."""
    from comfyquant.runtime.kernels.scratch import SPLIT_COUNTERS, SplitWorkspace

    w = SplitWorkspace(torch.device("cpu"))
    ws, cnt = w.buffers(1, 100)
    assert ws.dtype == torch.float32 and ws.numel() >= 100
    assert cnt.dtype == torch.int32 and cnt.numel() == SPLIT_COUNTERS and int(cnt.abs().sum()) == 0
    assert w.buffers(1, 50)[0] is ws and w.buffers(1, 50)[1] is cnt
    other = w.buffers(2, 100)
    assert other[0].data_ptr() != ws.data_ptr() and other[1].data_ptr() != cnt.data_ptr()
    bigger, cnt_again = w.buffers(1, ws.numel() + 1)
    assert bigger.numel() > ws.numel() and cnt_again is cnt
    assert any(t is ws for t in w._retired)  # the replaced partials stay referenced


def test_weight_workspace_shares_one_buffer_per_stream_and_keeps_what_it_replaced() -> None:
    """Layers of one stream and thread write their codes to one buffer (stream order makes that safe); a larger
    layer grows it, and the old buffer stays alive (a plan's TMA descriptor or a captured graph points at it)."""
    ws = WeightWorkspace(torch.device("cpu"))
    a = ws.codes(3, 48, 128)
    b = ws.codes(3, 16, 64)  # smaller: the same storage, its start
    assert a.shape == (48, 128) and b.shape == (16, 64) and b.dtype == torch.int8 and b.is_contiguous()
    assert b.data_ptr() == a.data_ptr() and ws.retired_bytes() == 0
    assert ws.codes(4, 16, 64).data_ptr() != a.data_ptr()  # another stream: its own buffer
    got = []
    t = threading.Thread(target=lambda: got.append(ws.codes(3, 16, 64)))
    t.start()
    t.join()
    assert got[0].data_ptr() != a.data_ptr()  # another thread on the same stream: its own buffer too
    c = ws.codes(3, 96, 128)  # larger: a new buffer, the old one retired and kept
    assert c.data_ptr() != a.data_ptr() and ws.retired_bytes() == 48 * 128
    assert ws.codes(3, 48, 128).data_ptr() == c.data_ptr()
